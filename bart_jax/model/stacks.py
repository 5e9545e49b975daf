"""BART's encoder and decoder stacks as Flax linen modules, and the helpers every head shares.

Parameters follow transformers' module names (`model/encoder/layers_0/self_attn/q_proj/weight`
for `model.encoder.layers.0.self_attn.q_proj.weight`, weights [out, in] as in PyTorch), so that
checkpoint conversion is a fixed table (bart_jax/checkpoints/conversion.py). Every module takes
`dtype` (computation) and `param_dtype`; softmax, LayerNorm statistics and losses run in float32.

Input ids are right-padded; positions are `past_length + arange(length)` (offset by 2 in the
position table, as in fairseq/transformers), never derived from the padding mask.

Three attributes of every module trade speed, compile time and memory, not results:
`scan_layers=True` runs each layer stack as one `nn.scan` over parameters stacked under
`layers` (leading layer axis; `checkpoints.conversion.stack_layers` / `unstack_layers` switch
layouts), `remat_policy` ("none", "full", "dots_saveable", ...) recomputes layer activations
in the backward pass instead of keeping them (see `layers.REMAT_POLICIES`), and `kernels`
("auto", "portable", "cpu", "tpu") chooses the backend formulations (bart_jax/model/kernels/).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bart_jax.config import BartConfig
from bart_jax.model import losses
from bart_jax.model.attention import combine_masks, make_causal_mask, padding_mask
from bart_jax.model.kernels.embedding import lookup
from bart_jax.model.layers import BartDecoderLayer, BartEncoderLayer, layer_norm, remat_layer, run_layer_stack
from bart_jax.model.outputs import DecoderOutput, EncoderOutput
from bart_jax.model.partitioning import HIDDEN, constrain

Array = jax.Array
Dtype = Any
POSITION_OFFSET = 2


def shift_tokens_right(input_ids: Array, pad_token_id: int, decoder_start_token_id: int) -> Array:
    """Decoder inputs from labels: prepend decoder_start_token_id, drop the last token, -100 -> pad.

    input_ids: [batch, length] -> [batch, length].
    """
    input_ids = jnp.asarray(input_ids)
    start = jnp.full((input_ids.shape[0], 1), decoder_start_token_id, dtype=input_ids.dtype)
    shifted = jnp.concatenate([start, input_ids[:, :-1]], axis=1)
    return jnp.where(shifted == losses.IGNORE_INDEX, pad_token_id, shifted)


def last_eos_index(input_ids: Array, eos_token_id: int) -> Array:
    """Position of the last EOS in each row (the classification head's pooling position).

    input_ids: [batch, length] -> [batch] int32. Rows without EOS give length - 1; callers
    validate that outside jit (see bart_jax.model.validation).
    """
    length = input_ids.shape[1]
    is_eos = (input_ids == eos_token_id)[:, ::-1]
    return (length - 1 - jnp.argmax(is_eos, axis=1)).astype(jnp.int32)


def token_embedding_init(std: float, padding_idx: int):
    """Normal(0, std) with the padding row zeroed, as transformers initialises `nn.Embedding(padding_idx=...)`."""

    def init(key, shape, dtype=jnp.float32):
        table = nn.initializers.normal(std)(key, shape, dtype)
        return table.at[padding_idx].set(0) if 0 <= padding_idx < shape[0] else table

    return init


def token_embedding(config: BartConfig, dtype: Dtype, param_dtype: Dtype) -> nn.Embed:
    return nn.Embed(
        config.vocab_size, config.d_model, embedding_init=token_embedding_init(config.init_std, config.pad_token_id),
        dtype=dtype, param_dtype=param_dtype,
    )


def _layerdrop(module: nn.Module, rate: float, deterministic: bool, skipped, computed):
    """LayerDrop (Fan et al., 2019): with probability `rate` keep the layer's input instead of its output.

    A traced random draw, not a Python branch, so it is jit-safe; the layer still runs.
    """
    if deterministic or rate == 0.0:
        return computed
    drop = jax.random.uniform(module.make_rng("dropout")) < rate
    return jax.tree_util.tree_map(lambda old, new: jnp.where(drop, old, new), skipped, computed)


def _head_mask_row(head_mask: Optional[Array], index: int) -> Optional[Array]:
    return None if head_mask is None else head_mask[index]


class BartModule(nn.Module):
    """The attributes every BART module takes: the config, the computation and parameter
    dtypes, and the compile-time/memory knobs (see bart_jax/model/layers.py)."""

    config: BartConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    # Which formulation of the backend-specific kernels runs: "auto", "portable", "cpu" or "tpu"
    # (bart_jax/model/kernels/). Results agree across them; speed and layouts differ.
    kernels: str = "auto"

    def options(self) -> dict[str, Any]:
        """These attributes, for a submodule that takes them all."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, scan_layers=self.scan_layers,
                    remat_policy=self.remat_policy, kernels=self.kernels)


class LayerStackMixin:
    """What the encoder and the decoder share: token embeddings (their own or the model's
    shared table), learned positions, `layernorm_embedding` and the layer stack."""

    def setup_stack(self, layer_class: type[nn.Module], num_layers: int) -> None:
        config = self.config
        if self.shared_embedding is None:
            self.embed_tokens = token_embedding(config, self.dtype, self.param_dtype)
        self.embed_positions = nn.Embed(
            config.max_position_embeddings + POSITION_OFFSET, config.d_model,
            embedding_init=nn.initializers.normal(config.init_std), dtype=self.dtype, param_dtype=self.param_dtype,
        )
        layer = remat_layer(layer_class, self.remat_policy, self.scan_layers)
        if self.scan_layers:
            self.layers = layer(config, self.dtype, self.param_dtype, self.kernels)
        else:
            self.layers = [layer(config, self.dtype, self.param_dtype, self.kernels) for _ in range(num_layers)]
        self.layernorm_embedding = layer_norm(self.dtype, self.param_dtype, self.kernels)
        self.embedding_dropout = nn.Dropout(config.dropout)

    @property
    def token_embedding(self) -> nn.Embed:
        return self.embed_tokens if self.shared_embedding is None else self.shared_embedding

    def embed(self, input_ids: Optional[Array], inputs_embeds: Optional[Array], positions: Array,
              deterministic: bool) -> Array:
        """Token (scaled by sqrt(d_model) with scale_embedding) plus position embeddings, then
        layernorm_embedding and dropout: [batch, length] ids -> [batch, length, d_model]."""
        if inputs_embeds is None:
            embed_scale = math.sqrt(self.config.d_model) if self.config.scale_embedding else 1.0
            token_embeds = lookup(self.token_embedding.embedding, input_ids, self.dtype, self.kernels)
            # nn.Embedding(padding_idx=pad) in transformers: looking up the padding token passes
            # no gradient to its row (the tied LM head still does).
            if self.config.pad_token_id is not None:
                token_embeds = jnp.where((input_ids == self.config.pad_token_id)[..., None],
                                         lax.stop_gradient(token_embeds), token_embeds)
            inputs_embeds = token_embeds * jnp.asarray(embed_scale, self.dtype)
        position_embeds = lookup(self.embed_positions.embedding, positions + POSITION_OFFSET, self.dtype, self.kernels)
        hidden_states = inputs_embeds.astype(self.dtype) + position_embeds[None]
        hidden_states = self.layernorm_embedding(hidden_states)
        return constrain(self.embedding_dropout(hidden_states, deterministic=deterministic), HIDDEN)


class BartEncoder(LayerStackMixin, BartModule):
    shared_embedding: Optional[nn.Embed] = None  # None: the encoder owns `embed_tokens` (untied embeddings)

    def setup(self):
        self.setup_stack(BartEncoderLayer, self.config.encoder_layers)

    def __call__(
        self,
        input_ids: Optional[Array] = None,
        attention_mask: Optional[Array] = None,
        inputs_embeds: Optional[Array] = None,
        head_mask: Optional[Array] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        deterministic: bool = True,
    ) -> EncoderOutput:
        """input_ids [batch, length] (or inputs_embeds [batch, length, d_model]); attention_mask
        [batch, length] 0/1; head_mask [encoder_layers, heads]."""
        config = self.config
        length = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        hidden_states = self.embed(input_ids, inputs_embeds, jnp.arange(length), deterministic)
        mask = padding_mask(attention_mask)

        def step(layer, hidden_states, layer_head_mask):
            computed = layer(hidden_states, mask, layer_head_mask, deterministic, output_attentions)
            hidden_states, weights = _layerdrop(
                layer if self.scan_layers else self, config.encoder_layerdrop, deterministic,
                (hidden_states, None if computed[1] is None else jnp.zeros_like(computed[1])), computed,
            )
            return hidden_states, (hidden_states if output_hidden_states else None,
                                   weights if output_attentions else None)

        all_hidden_states = (hidden_states,)
        head_masks = [_head_mask_row(head_mask, index) for index in range(config.encoder_layers)]
        hidden_states, outputs = run_layer_stack(step, self.layers, hidden_states, head_masks, self.scan_layers)
        all_hidden_states += tuple(output[0] for output in outputs)
        all_attentions = tuple(output[1] for output in outputs)
        return EncoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states if output_hidden_states else None,
            attentions=all_attentions if output_attentions else None,
        )


class BartDecoder(LayerStackMixin, BartModule):
    shared_embedding: Optional[nn.Embed] = None  # None: the decoder owns `embed_tokens` (BartForCausalLM)

    def setup(self):
        self.setup_stack(BartDecoderLayer, self.config.decoder_layers)

    def project_cross_key_values(self, encoder_hidden_states: Array) -> tuple[dict[str, Array], ...]:
        """Each layer's cross-attention keys/values, computed once per source.

        encoder_hidden_states [batch, source, d_model] -> tuple over layers of {"key", "value"},
        in the layout of the kernels: portable [batch, source, heads, head_dim]; CPU keys
        [batch, heads, head_dim, source] and values [batch, heads, source, head_dim].
        """
        def step(layer, carry, _):
            return carry, layer.project_cross_key_value(encoder_hidden_states)

        no_inputs = [None] * self.config.decoder_layers
        return tuple(run_layer_stack(step, self.layers, None, no_inputs, self.scan_layers)[1])

    def __call__(
        self,
        input_ids: Optional[Array] = None,
        attention_mask: Optional[Array] = None,
        encoder_hidden_states: Optional[Array] = None,
        encoder_attention_mask: Optional[Array] = None,
        inputs_embeds: Optional[Array] = None,
        head_mask: Optional[Array] = None,
        cross_attn_head_mask: Optional[Array] = None,
        cross_key_values: Optional[tuple[dict[str, Array], ...]] = None,
        cache: Optional[tuple[dict[str, Array], ...]] = None,
        cache_index: Optional[Array] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        deterministic: bool = True,
    ) -> DecoderOutput:
        """input_ids [rows, length] (or inputs_embeds); attention_mask [rows, key_length] 0/1 where
        key_length is `length` without a cache and the cache's max_length with one.

        Cross-attention reads `cross_key_values` (from `project_cross_key_values`) when given,
        else projects `encoder_hidden_states` [batch, source, d_model]; `rows` may be a multiple
        of `batch` (beams). `encoder_attention_mask`: [batch, source]. With `cache` (from
        bart_jax.model.cache.init_cache; rows = its batch * beams) the new tokens are written at
        `cache_index` and attend to every earlier cached position.
        """
        config = self.config
        length = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        past_length = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
        query_positions = past_length + jnp.arange(length)
        hidden_states = self.embed(input_ids, inputs_embeds, query_positions, deterministic)

        ancestors = None
        if cache is None:
            key_length = length
        else:
            key_length = cache["ancestors"].shape[2]
            # Positions written now belong to each row's own cache slot.
            batch, beams = cache["ancestors"].shape[:2]
            own_slots = jnp.broadcast_to(jnp.arange(beams, dtype=jnp.int32)[None, :, None], (batch, beams, length))
            ancestors = jax.lax.dynamic_update_slice(cache["ancestors"], own_slots, (0, 0, past_length))
        self_mask = combine_masks(make_causal_mask(query_positions, key_length), padding_mask(attention_mask))
        cross_mask = padding_mask(encoder_attention_mask)
        # No cache index for self-attention neither cached nor offset: its mask is then plainly causal.
        layer_cache_index = None if cache is None and cache_index is None else past_length

        def step(layer, hidden_states, layer_inputs):
            cross_key_value, layer_cache, layer_head_mask, cross_layer_head_mask = layer_inputs
            # Positional arguments: a rematerialised layer keeps only positional ones static.
            computed = layer(hidden_states, self_mask, encoder_hidden_states, cross_mask, cross_key_value, layer_cache,
                             layer_cache_index, ancestors, layer_head_mask, cross_layer_head_mask, deterministic,
                             output_attentions)
            skipped = (hidden_states,) + tuple(
                None if value is None else jnp.zeros_like(value) for value in computed[1:3]
            ) + (layer_cache,)
            hidden_states, self_weights, cross_weights, layer_cache = _layerdrop(
                layer if self.scan_layers else self, config.decoder_layerdrop, deterministic, skipped, computed
            )
            return hidden_states, (hidden_states if output_hidden_states else None,
                                   self_weights if output_attentions else None,
                                   cross_weights if output_attentions else None, layer_cache)

        layer_inputs = [
            (None if cross_key_values is None else cross_key_values[index],
             None if cache is None else cache["layers"][index],
             _head_mask_row(head_mask, index), _head_mask_row(cross_attn_head_mask, index))
            for index in range(config.decoder_layers)
        ]
        all_hidden_states = (hidden_states,)
        hidden_states, outputs = run_layer_stack(step, self.layers, hidden_states, layer_inputs, self.scan_layers)
        all_hidden_states += tuple(output[0] for output in outputs)
        all_self_attentions = tuple(output[1] for output in outputs)
        all_cross_attentions = tuple(output[2] for output in outputs)
        new_cache = tuple(output[3] for output in outputs)
        has_cross = encoder_hidden_states is not None or cross_key_values is not None
        return DecoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states if output_hidden_states else None,
            attentions=all_self_attentions if output_attentions else None,
            cross_attentions=all_cross_attentions if output_attentions and has_cross else None,
            cache=None if cache is None else {"layers": new_cache, "ancestors": ancestors},
        )
