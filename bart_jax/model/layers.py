"""BART's post-LayerNorm encoder and decoder layers (transformers' `BartEncoderLayer`,
`BartDecoderLayer`), parameter names as in transformers, and how a stack of them runs:
unrolled (`layers_0`, `layers_1`, ...) or as one `nn.scan` over stacked parameters (`layers`,
leading layer axis), optionally rematerialised in the backward pass."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bart_jax.config import BartConfig
from bart_jax.model.activations import get_activation
from bart_jax.model.attention import BartAttention
from bart_jax.model.layer_norm import LayerNorm
from bart_jax.model.linear import Linear
from bart_jax.model.partitioning import HIDDEN, MLP_HIDDEN, constrain

Array = jax.Array
Dtype = Any
LAYER_NORM_EPSILON = 1e-5

# Rematerialisation: what the backward pass may keep from each layer's forward pass (the rest
# is recomputed). "none" keeps everything (no remat); "full" keeps only the layer's inputs.
REMAT_SAVEABLE = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # matmul outputs
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_POLICIES = ("none",) + tuple(REMAT_SAVEABLE)


def layer_norm(dtype: Dtype, param_dtype: Dtype, kernels: str = "auto") -> LayerNorm:
    return LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, param_dtype=param_dtype, kernels=kernels)


class FeedForwardMixin:
    """fc1 -> activation -> dropout -> fc2, shared by both layer kinds (parameter names as transformers)."""

    def setup_feed_forward(self, ffn_dim: int):
        linear = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels,
                      weight_init=nn.initializers.normal(self.config.init_std))
        self.fc1 = Linear(ffn_dim, **linear)
        self.fc2 = Linear(self.config.d_model, **linear)
        self.activation_dropout = nn.Dropout(self.config.activation_dropout)

    def feed_forward(self, hidden_states: Array, deterministic: bool) -> Array:
        hidden_states = get_activation(self.config.activation_function)(self.fc1(hidden_states))
        hidden_states = constrain(hidden_states, MLP_HIDDEN)
        hidden_states = self.activation_dropout(hidden_states, deterministic=deterministic)
        return self.fc2(hidden_states)


class LayerModule(nn.Module):
    """The attributes of a layer: the config, the computation and parameter dtypes, the kernel
    policy (bart_jax/model/kernels/)."""

    config: BartConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: str = "auto"


class BartEncoderLayer(FeedForwardMixin, LayerModule):

    def setup(self):
        config = self.config
        self.self_attn = BartAttention(
            config.d_model, config.encoder_attention_heads, config.attention_dropout, config.init_std,
            dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels,
        )
        self.self_attn_layer_norm = layer_norm(self.dtype, self.param_dtype, self.kernels)
        self.setup_feed_forward(config.encoder_ffn_dim)
        self.final_layer_norm = layer_norm(self.dtype, self.param_dtype, self.kernels)
        self.residual_dropout = nn.Dropout(config.dropout)

    def __call__(
        self,
        hidden_states: Array,
        mask: Optional[Array],
        layer_head_mask: Optional[Array] = None,
        deterministic: bool = True,
        output_attentions: bool = False,
    ) -> tuple[Array, Optional[Array]]:
        """hidden_states [batch, length, d_model] -> (same shape, attention weights [batch, heads,
        length, length] with `output_attentions`, else None)."""
        residual = hidden_states
        hidden_states, weights, _ = self.self_attn(
            hidden_states, mask=mask, layer_head_mask=layer_head_mask, deterministic=deterministic,
            need_weights=output_attentions,
        )
        hidden_states = self.residual_dropout(hidden_states, deterministic=deterministic)
        hidden_states = self.self_attn_layer_norm(residual + hidden_states)

        residual = hidden_states
        hidden_states = self.feed_forward(hidden_states, deterministic)
        hidden_states = self.residual_dropout(hidden_states, deterministic=deterministic)
        hidden_states = constrain(self.final_layer_norm(residual + hidden_states), HIDDEN)
        return hidden_states, weights


class BartDecoderLayer(FeedForwardMixin, LayerModule):

    def setup(self):
        config = self.config
        attention = dict(
            embed_dim=config.d_model, num_heads=config.decoder_attention_heads, dropout=config.attention_dropout,
            init_std=config.init_std, dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels,
        )
        self.self_attn = BartAttention(**attention, causal=True)
        self.self_attn_layer_norm = layer_norm(self.dtype, self.param_dtype, self.kernels)
        self.encoder_attn = BartAttention(**attention)
        self.encoder_attn_layer_norm = layer_norm(self.dtype, self.param_dtype, self.kernels)
        self.setup_feed_forward(config.decoder_ffn_dim)
        self.final_layer_norm = layer_norm(self.dtype, self.param_dtype, self.kernels)
        self.residual_dropout = nn.Dropout(config.dropout)

    def project_cross_key_value(self, encoder_hidden_states: Array) -> dict[str, Array]:
        """encoder_hidden_states [batch, source, d_model] -> {"key", "value"} in the layout of the
        kernels (`BartAttention.project_key_value`)."""
        return self.encoder_attn.project_key_value(encoder_hidden_states)

    def __call__(
        self,
        hidden_states: Array,
        self_attention_mask: Optional[Array],
        encoder_hidden_states: Optional[Array] = None,
        cross_attention_mask: Optional[Array] = None,
        cross_key_value: Optional[dict[str, Array]] = None,
        cache: Optional[dict[str, Array]] = None,
        cache_index: Optional[Array] = None,
        ancestors: Optional[Array] = None,
        layer_head_mask: Optional[Array] = None,
        cross_attn_layer_head_mask: Optional[Array] = None,
        deterministic: bool = True,
        output_attentions: bool = False,
    ):
        """hidden_states [rows, length, d_model]; cross-attention uses `cross_key_value` when given,
        else `encoder_hidden_states`, and is skipped when both are None (decoder-only use).

        Returns (hidden_states, self-attention weights, cross-attention weights or None, new cache).
        """
        residual = hidden_states
        hidden_states, self_weights, new_cache = self.self_attn(
            hidden_states, mask=self_attention_mask, cache=cache, cache_index=cache_index, ancestors=ancestors,
            layer_head_mask=layer_head_mask, deterministic=deterministic, need_weights=output_attentions,
        )
        hidden_states = self.residual_dropout(hidden_states, deterministic=deterministic)
        hidden_states = self.self_attn_layer_norm(residual + hidden_states)

        cross_weights = None
        if encoder_hidden_states is not None or cross_key_value is not None:
            residual = hidden_states
            hidden_states, cross_weights, _ = self.encoder_attn(
                hidden_states, mask=cross_attention_mask, key_value_states=encoder_hidden_states,
                key_value=cross_key_value, layer_head_mask=cross_attn_layer_head_mask, deterministic=deterministic,
                need_weights=output_attentions,
            )
            hidden_states = self.residual_dropout(hidden_states, deterministic=deterministic)
            hidden_states = self.encoder_attn_layer_norm(residual + hidden_states)
        elif self.is_initializing():
            # transformers always creates the cross-attention weights, also for decoder-only use;
            # create them here too so that checkpoints convert with one fixed table.
            self.encoder_attn(hidden_states)
            self.encoder_attn_layer_norm(hidden_states)

        residual = hidden_states
        hidden_states = self.feed_forward(hidden_states, deterministic)
        hidden_states = self.residual_dropout(hidden_states, deterministic=deterministic)
        hidden_states = constrain(self.final_layer_norm(residual + hidden_states), HIDDEN)
        return hidden_states, self_weights, cross_weights, new_cache


def remat_layer(layer_class: type[nn.Module], policy: str, scanned: bool):
    """`layer_class` whose `__call__` is rematerialised by `policy` (one of `REMAT_POLICIES`).

    Its `deterministic` and `output_attentions` flags stay Python bools (static arguments), so
    callers must pass them positionally. Inside a scan the recomputation cannot be merged away, so common
    subexpression elimination may stay on there.
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {policy!r}; choose one of {REMAT_POLICIES}")
    if policy == "none":
        return layer_class
    parameters = list(inspect.signature(layer_class.__call__).parameters)  # self is 0
    static = tuple(parameters.index(name) for name in ("deterministic", "output_attentions"))
    return nn.remat(layer_class, policy=REMAT_SAVEABLE[policy], static_argnums=static, prevent_cse=not scanned)


def run_layer_stack(
    step: Callable[[nn.Module, Any, Any], tuple[Any, Any]],
    layers: nn.Module | Sequence[nn.Module],
    carry: Any,
    layer_inputs: Sequence[Any],
    scanned: bool,
) -> tuple[Any, list[Any]]:
    """Threads `carry` through the layers: `carry, output = step(layer, carry, layer_inputs[i])`.

    Unrolled, `layers` is a list of modules. Scanned, it is one module whose parameters carry a
    leading layer axis; the per-layer inputs are stacked for `nn.scan` and its stacked outputs
    split again, so both forms take and return the same per-layer lists.
    Returns (final carry, [output of each layer]).
    """
    if not scanned:
        outputs = []
        for layer, inputs in zip(layers, layer_inputs):
            carry, output = step(layer, carry, inputs)
            outputs.append(output)
        return carry, outputs
    num_layers = len(layer_inputs)
    stacked_inputs = jax.tree_util.tree_map(lambda *values: jnp.stack(values), *layer_inputs)
    scan = nn.scan(step, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   length=num_layers)
    carry, stacked_outputs = scan(layers, carry, stacked_inputs)
    return carry, [jax.tree_util.tree_map(lambda value: value[i], stacked_outputs) for i in range(num_layers)]
