"""BART's encoder, decoder and the five transformers heads as Flax linen modules.

Parameters follow transformers' module names (`model/encoder/layers_0/self_attn/q_proj/weight`
for `model.encoder.layers.0.self_attn.q_proj.weight`, weights [out, in] as in PyTorch), so that
checkpoint conversion is a fixed table (bart_jax/conversion.py). Every module takes `dtype` (computation) and
`param_dtype`; softmax, LayerNorm statistics and losses run in float32.

Input ids are right-padded; positions are `past_length + arange(length)` (offset by 2 in the
position table, as in fairseq/transformers), never derived from the padding mask.

Two attributes of every module trade compile time and memory, not results:
`scan_layers=True` runs each layer stack as one `nn.scan` over parameters stacked under
`layers` (leading layer axis; `conversion.stack_layers` / `unstack_layers` switch layouts),
and `remat_policy` ("none", "full", "dots_saveable", ...) recomputes layer activations in the
backward pass instead of keeping them (see `layers.REMAT_POLICIES`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bart_jax import losses
from bart_jax.attention import combine_masks, make_causal_mask, padding_mask
from bart_jax.config import BartConfig
from bart_jax.layers import BartDecoderLayer, BartEncoderLayer, layer_norm, remat_layer, run_layer_stack
from bart_jax.linear import Linear, VocabularyProjection, vocabulary_product
from bart_jax.outputs import CausalLMOutput, DecoderOutput, EncoderOutput, Seq2SeqOutput
from bart_jax.sharding import HIDDEN, LOGITS, constrain

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
    validate that outside jit (see bart_jax.validation).
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
    dtypes, and the compile-time/memory knobs (see bart_jax/layers.py)."""

    config: BartConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"


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
            self.layers = layer(config, self.dtype, self.param_dtype)
        else:
            self.layers = [layer(config, self.dtype, self.param_dtype) for _ in range(num_layers)]
        self.layernorm_embedding = layer_norm(self.dtype, self.param_dtype)
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
            token_embeds = self.token_embedding(input_ids)
            # nn.Embedding(padding_idx=pad) in transformers: looking up the padding token passes
            # no gradient to its row (the tied LM head still does).
            if self.config.pad_token_id is not None:
                token_embeds = jnp.where((input_ids == self.config.pad_token_id)[..., None],
                                         lax.stop_gradient(token_embeds), token_embeds)
            inputs_embeds = token_embeds * jnp.asarray(embed_scale, self.dtype)
        hidden_states = inputs_embeds.astype(self.dtype) + self.embed_positions(positions + POSITION_OFFSET)[None]
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
            computed = layer(hidden_states, mask, layer_head_mask, deterministic)
            hidden_states, weights = _layerdrop(
                layer if self.scan_layers else self, config.encoder_layerdrop, deterministic,
                (hidden_states, jnp.zeros_like(computed[1])), computed,
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

        encoder_hidden_states [batch, source, d_model] -> tuple over layers of
        {"key", "value"}: [batch, heads, source, head_dim].
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
        bart_jax.cache.init_cache; rows = its batch * beams) the new tokens are written at
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

        def step(layer, hidden_states, layer_inputs):
            cross_key_value, layer_cache, layer_head_mask, cross_layer_head_mask = layer_inputs
            # Positional arguments: a rematerialised layer keeps only positional ones static.
            computed = layer(hidden_states, self_mask, encoder_hidden_states, cross_mask, cross_key_value, layer_cache,
                             past_length, ancestors, layer_head_mask, cross_layer_head_mask, deterministic)
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


class BartModel(BartModule):
    """The bare encoder-decoder (transformers' `BartModel`): returns the decoder's last hidden state."""

    def setup(self):
        config = self.config
        self.shared = token_embedding(config, self.dtype, self.param_dtype)
        # transformers 5 unties the encoder's and decoder's token embeddings from `shared` (and
        # from each other) when tie_word_embeddings is False; `shared` is then unused by the forward pass.
        tied = self.shared if config.tie_word_embeddings else None
        stack = dict(dtype=self.dtype, param_dtype=self.param_dtype, scan_layers=self.scan_layers,
                     remat_policy=self.remat_policy, shared_embedding=tied)
        self.encoder = BartEncoder(config, **stack)
        self.decoder = BartDecoder(config, **stack)

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, head_mask=None,
               output_attentions=False, output_hidden_states=False, deterministic=True) -> EncoderOutput:
        """Runs the encoder alone; see `BartEncoder.__call__`."""
        if self.is_initializing() and not self.config.tie_word_embeddings:
            self.shared(jnp.zeros((1, 1), jnp.int32))  # create the unused `shared` table that checkpoints hold
        return self.encoder(input_ids, attention_mask, inputs_embeds, head_mask, output_attentions,
                            output_hidden_states, deterministic)

    def decode(self, decoder_input_ids=None, encoder_hidden_states=None, encoder_attention_mask=None,
               decoder_attention_mask=None, decoder_inputs_embeds=None, decoder_head_mask=None,
               cross_attn_head_mask=None, cross_key_values=None, cache=None, cache_index=None,
               output_attentions=False, output_hidden_states=False, deterministic=True) -> DecoderOutput:
        """Runs the decoder alone; see `BartDecoder.__call__`."""
        return self.decoder(
            decoder_input_ids, decoder_attention_mask, encoder_hidden_states, encoder_attention_mask,
            decoder_inputs_embeds, decoder_head_mask, cross_attn_head_mask, cross_key_values, cache, cache_index,
            output_attentions, output_hidden_states, deterministic,
        )

    def __call__(
        self,
        input_ids: Optional[Array] = None,
        attention_mask: Optional[Array] = None,
        decoder_input_ids: Optional[Array] = None,
        decoder_attention_mask: Optional[Array] = None,
        head_mask: Optional[Array] = None,
        decoder_head_mask: Optional[Array] = None,
        cross_attn_head_mask: Optional[Array] = None,
        encoder_outputs: Optional[EncoderOutput] = None,
        inputs_embeds: Optional[Array] = None,
        decoder_inputs_embeds: Optional[Array] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        deterministic: bool = True,
    ) -> Seq2SeqOutput:
        """The full encoder-decoder pass with transformers' argument names.

        Without decoder_input_ids/decoder_inputs_embeds, the decoder reads input_ids shifted right.
        """
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass decoder_input_ids or decoder_inputs_embeds, or input_ids to shift right")
            decoder_input_ids = shift_tokens_right(
                input_ids, self.config.pad_token_id, self.config.decoder_start_token_id
            )
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask, inputs_embeds, head_mask, output_attentions,
                                          output_hidden_states, deterministic)
        decoder_outputs = self.decode(
            decoder_input_ids, encoder_outputs.last_hidden_state, attention_mask, decoder_attention_mask,
            decoder_inputs_embeds, decoder_head_mask, cross_attn_head_mask,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            deterministic=deterministic,
        )
        return Seq2SeqOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


class BartForConditionalGeneration(BartModule):
    """BART with the language-modelling head (tied to the shared embedding) and `final_logits_bias`."""

    def setup(self):
        config = self.config
        self.model = BartModel(config, self.dtype, self.param_dtype, self.scan_layers, self.remat_policy)
        self.final_logits_bias = self.param(
            "final_logits_bias", nn.initializers.zeros, (1, config.vocab_size), self.param_dtype
        )
        if not config.tie_word_embeddings:
            self.lm_head = VocabularyProjection(config.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                                weight_init=nn.initializers.normal(config.init_std))

    def lm_logits(self, hidden_states: Array) -> Array:
        """hidden_states [..., d_model] -> logits [..., vocab] in the compute dtype."""
        if self.config.tie_word_embeddings:
            logits = vocabulary_product(hidden_states, self.model.shared.embedding, self.dtype)
        else:
            logits = self.lm_head(hidden_states)
        # A buffer in transformers, never trained: no gradient flows into it (nor is one computed).
        logits = logits + jax.lax.stop_gradient(self.final_logits_bias[0]).astype(logits.dtype)
        return constrain(logits.astype(self.dtype), LOGITS)

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, head_mask=None,
               output_attentions=False, output_hidden_states=False, deterministic=True) -> EncoderOutput:
        """Runs the encoder alone: input_ids [batch, source] -> EncoderOutput."""
        return self.model.encode(input_ids, attention_mask, inputs_embeds, head_mask, output_attentions,
                                 output_hidden_states, deterministic)

    def project_cross_key_values(self, encoder_hidden_states: Array) -> tuple[dict[str, Array], ...]:
        """encoder_hidden_states [batch, source, d_model] -> per layer {"key","value"} [batch, heads, source, head_dim]."""
        return self.model.decoder.project_cross_key_values(encoder_hidden_states)

    def decode_step(
        self,
        decoder_input_ids: Array,
        cache: tuple[dict[str, Array], ...],
        cache_index: Array,
        cross_key_values: tuple[dict[str, Array], ...],
        encoder_attention_mask: Optional[Array] = None,
    ) -> tuple[Array, tuple[dict[str, Array], ...]]:
        """One incremental decoder call over a static cache.

        decoder_input_ids [rows, length] written at positions cache_index.. cache_index+length-1;
        cross_key_values per layer [batch, heads, source, head_dim] with rows = batch * beams;
        encoder_attention_mask [batch, source]. Returns (float32 logits [rows, length, vocab], new cache).
        """
        outputs = self.model.decode(
            decoder_input_ids, encoder_attention_mask=encoder_attention_mask, cross_key_values=cross_key_values,
            cache=cache, cache_index=cache_index,
        )
        return self.lm_logits(outputs.last_hidden_state).astype(jnp.float32), outputs.cache

    def decode(self, decoder_input_ids=None, encoder_hidden_states=None, encoder_attention_mask=None,
               decoder_attention_mask=None, **kwargs) -> CausalLMOutput:
        """Decoder plus LM head: returns CausalLMOutput(logits [rows, length, vocab], ...)."""
        outputs = self.model.decode(decoder_input_ids, encoder_hidden_states, encoder_attention_mask,
                                    decoder_attention_mask, **kwargs)
        return CausalLMOutput(
            logits=self.lm_logits(outputs.last_hidden_state), hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, cross_attentions=outputs.cross_attentions, cache=outputs.cache,
        )

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None, encoder_outputs=None,
                 inputs_embeds=None, decoder_inputs_embeds=None, labels=None, output_attentions=False,
                 output_hidden_states=False, deterministic=True) -> Seq2SeqOutput:
        """transformers' forward: labels [batch, target] (-100 ignored) give `loss`; without
        decoder inputs, the decoder reads the labels shifted right."""
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        outputs = self.model(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, head_mask, decoder_head_mask,
            cross_attn_head_mask, encoder_outputs, inputs_embeds, decoder_inputs_embeds, output_attentions,
            output_hidden_states, deterministic,
        )
        logits = self.lm_logits(outputs.last_hidden_state)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return outputs.replace(loss=loss, logits=logits, last_hidden_state=None)


class BartClassificationHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> out_proj, on the pooled hidden state."""

    config: BartConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        config = self.config
        init = nn.initializers.normal(config.init_std)
        self.dense = Linear(config.d_model, dtype=self.dtype, param_dtype=self.param_dtype, weight_init=init)
        self.out_proj = Linear(config.num_labels, dtype=self.dtype, param_dtype=self.param_dtype, weight_init=init)
        self.dropout = nn.Dropout(config.classifier_dropout)

    def __call__(self, pooled: Array, deterministic: bool = True) -> Array:
        """pooled [batch, d_model] -> logits [batch, num_labels]."""
        hidden = self.dropout(pooled, deterministic=deterministic)
        hidden = jnp.tanh(self.dense(hidden))
        hidden = self.dropout(hidden, deterministic=deterministic)
        return self.out_proj(hidden)


class BartForSequenceClassification(BartModule):
    """Classifies from the decoder state at the last EOS of each row (transformers' pooling)."""

    def setup(self):
        self.model = BartModel(self.config, self.dtype, self.param_dtype, self.scan_layers, self.remat_policy)
        self.classification_head = BartClassificationHead(self.config, self.dtype, self.param_dtype)

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None, encoder_outputs=None,
                 decoder_inputs_embeds=None, labels=None, output_attentions=False, output_hidden_states=False,
                 deterministic=True) -> Seq2SeqOutput:
        """input_ids [batch, length] (needed for EOS pooling); labels [batch] ids, [batch] or
        [batch, num_labels] floats, per `problem_type`. Returns logits [batch, num_labels]."""
        outputs = self.model(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, head_mask, decoder_head_mask,
            cross_attn_head_mask, encoder_outputs, None, decoder_inputs_embeds, output_attentions,
            output_hidden_states, deterministic,
        )
        hidden_states = outputs.last_hidden_state
        rows = jnp.arange(hidden_states.shape[0])
        pooled = hidden_states[rows, last_eos_index(input_ids, self.config.eos_token_id)]
        logits = self.classification_head(pooled, deterministic)
        loss = None
        if labels is not None:
            problem_type = losses.classification_problem_type(self.config.problem_type, self.config.num_labels, labels)
            loss = losses.sequence_classification_loss(logits, labels, problem_type)
        return outputs.replace(loss=loss, logits=logits, last_hidden_state=None)


class BartForQuestionAnswering(BartModule):
    """Span extraction: start/end logits over the decoder states."""

    def setup(self):
        self.model = BartModel(self.config, self.dtype, self.param_dtype, self.scan_layers, self.remat_policy)
        self.qa_outputs = Linear(2, dtype=self.dtype, param_dtype=self.param_dtype,
                                 weight_init=nn.initializers.normal(self.config.init_std))

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None, encoder_outputs=None,
                 start_positions=None, end_positions=None, inputs_embeds=None, decoder_inputs_embeds=None,
                 output_attentions=False, output_hidden_states=False, deterministic=True) -> Seq2SeqOutput:
        """Returns start_logits, end_logits [batch, length]; with start/end_positions [batch], the loss."""
        outputs = self.model(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, head_mask, decoder_head_mask,
            cross_attn_head_mask, encoder_outputs, inputs_embeds, decoder_inputs_embeds, output_attentions,
            output_hidden_states, deterministic,
        )
        logits = self.qa_outputs(outputs.last_hidden_state)
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = losses.span_loss(start_logits, end_logits, start_positions, end_positions)
        return outputs.replace(loss=loss, start_logits=start_logits, end_logits=end_logits, last_hidden_state=None)


class BartDecoderWrapper(BartModule):
    """Holds the decoder under `model/decoder`, the layout of transformers' BartForCausalLM."""

    def setup(self):
        self.decoder = BartDecoder(self.config, self.dtype, self.param_dtype, self.scan_layers, self.remat_policy)

    def __call__(self, *args, **kwargs) -> DecoderOutput:
        return self.decoder(*args, **kwargs)


class BartForCausalLM(BartModule):
    """The decoder alone with an LM head tied to its own token embedding."""

    def setup(self):
        config = self.config
        self.model = BartDecoderWrapper(config, self.dtype, self.param_dtype, self.scan_layers, self.remat_policy)
        if not config.tie_word_embeddings:
            self.lm_head = VocabularyProjection(config.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                                weight_init=nn.initializers.normal(config.init_std))

    def __call__(self, input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                 inputs_embeds=None, head_mask=None, cross_attn_head_mask=None, labels=None, cache=None,
                 cache_index=None, output_attentions=False, output_hidden_states=False,
                 deterministic=True) -> CausalLMOutput:
        """input_ids [batch, length]; labels [batch, length] are NOT shifted (as transformers 5):
        labels[:, i] is the target of logits[:, i]."""
        outputs = self.model(
            input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, inputs_embeds, head_mask,
            cross_attn_head_mask, None, cache, cache_index, output_attentions, output_hidden_states, deterministic,
        )
        if self.config.tie_word_embeddings:
            logits = vocabulary_product(outputs.last_hidden_state, self.model.decoder.embed_tokens.embedding,
                                        self.dtype).astype(self.dtype)
        else:
            logits = self.lm_head(outputs.last_hidden_state)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return CausalLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions, cache=outputs.cache,
        )


HEADS = {module.__name__: module for module in (
    BartModel, BartForConditionalGeneration, BartForSequenceClassification, BartForQuestionAnswering, BartForCausalLM,
)}


def head_class(name: str) -> type[nn.Module]:
    """The module class for a transformers architecture name such as "BartForConditionalGeneration"."""
    try:
        return HEADS[name]
    except KeyError:
        raise ValueError(f"unknown BART head {name!r}; choose one of {sorted(HEADS)}") from None
