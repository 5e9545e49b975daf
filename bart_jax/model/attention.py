"""Multi-head attention as BART uses it: encoder self-attention, causal decoder self-attention
over a static key/value cache, and cross-attention over keys/values that may have been projected
once per source row.

Masks are boolean (True = may attend) and broadcast to [batch, heads, query, key]. Queries, keys
and values are projected into [batch, length, heads, head_dim]; the attention itself, and the
layout of the cache and of projected cross-attention keys/values, belong to the kernel seam
(bart_jax/model/kernels/): `kernels` chooses the portable, the CPU or the TPU formulation.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bart_jax.model import kernels as kernel_policy
from bart_jax.model.cache import cache_layout
from bart_jax.model.kernels.attention import attend, attend_output, attend_transposed
from bart_jax.model.kernels.cache_attention import CACHE_ATTENTION
from bart_jax.model.linear import Linear
from bart_jax.model.partitioning import KEYS, PER_HEAD, TIME_MAJOR, constrain

Array = jax.Array
Dtype = Any


def make_causal_mask(query_positions: Array, key_length: int) -> Array:
    """[1, 1, query, key] mask: query position p may attend to keys 0..p.

    query_positions: [query] absolute decoder positions.
    """
    keys = jnp.arange(key_length)
    return (keys[None, :] <= query_positions[:, None])[None, None]


def padding_mask(attention_mask: Optional[Array]) -> Optional[Array]:
    """[batch, key] 0/1 padding mask -> [batch, 1, 1, key] boolean mask (None stays None)."""
    if attention_mask is None:
        return None
    return attention_mask.astype(bool)[:, None, None, :]


def combine_masks(*masks: Optional[Array]) -> Optional[Array]:
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    combined = masks[0]
    for mask in masks[1:]:
        combined = jnp.logical_and(combined, mask)
    return combined


class BartAttention(nn.Module):
    """q/k/v/out projections and scaled dot-product attention (transformers' `BartAttention`)."""

    embed_dim: int
    num_heads: int
    dropout: float = 0.0
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: str = "auto"
    # Decoder self-attention: without a cache or a cache index its mask is the causal mask
    # combined with a key mask, which kernels may apply as such (the TPU flash kernel).
    causal: bool = False

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def setup(self):
        def dense():
            return Linear(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels,
                          weight_init=nn.initializers.normal(self.init_std))

        self.q_proj = dense()
        self.k_proj = dense()
        self.v_proj = dense()
        self.out_proj = dense()

    def _heads(self, x: Array) -> Array:
        """[batch, length, d_model] -> [batch, length, heads, head_dim] (a reshape, no copy)."""
        return constrain(x.reshape(x.shape[:2] + (self.num_heads, self.head_dim)), TIME_MAJOR)

    def project_key_value(self, states: Array) -> dict[str, Array]:
        """Cross-attention keys/values of states [batch, source, d_model], projected once per
        source, in the layout of this module's kernels (`bart_jax.model.kernels.layout`):
        portable {"key", "value"} [batch, source, heads, head_dim]; CPU {"key": [batch, heads,
        head_dim, source], "value": [batch, heads, source, head_dim]}."""
        key, value = self._heads(self.k_proj(states)), self._heads(self.v_proj(states))
        if kernel_policy.layout(self.kernels) == "portable":
            return {"key": key, "value": value}
        return {"key": constrain(key.transpose(0, 2, 3, 1), KEYS), "value": constrain(value.transpose(0, 2, 1, 3),
                                                                                        PER_HEAD)}

    def __call__(
        self,
        hidden_states: Array,
        mask: Optional[Array] = None,
        key_value_states: Optional[Array] = None,
        key_value: Optional[dict[str, Array]] = None,
        cache: Optional[dict[str, Array]] = None,
        cache_index: Optional[Array] = None,
        ancestors: Optional[Array] = None,
        layer_head_mask: Optional[Array] = None,
        deterministic: bool = True,
        need_weights: bool = True,
    ) -> tuple[Array, Optional[Array], Optional[dict[str, Array]]]:
        """Attention of `hidden_states` [rows, query_length, d_model] over one of:

        - itself (self-attention); with a `cache` (see bart_jax/model/cache.py) the new keys/values
          are written at `cache_index` and every cached position is attended, read through `ancestors`;
        - `key_value_states` [batch, key_length, d_model] (cross-attention), or
        - precomputed `key_value` from `project_key_value` (cross-attention during decoding).

        `rows` may be a multiple of the keys' batch: the beams (or samples) of an input, inner
        in `rows`, share that input's cross-attention keys/values.
        `mask`: boolean, broadcastable to [rows, heads, query, key]; with `causal` and neither a
        cache nor a `cache_index`, the causal mask combined with a key mask. `layer_head_mask`: [heads].
        Returns (output [rows, query_length, d_model], weights [rows, heads, query, key] or None
        without `need_weights`, new cache). Without weights and attention dropout, the portable
        kernels attend with `jax.nn.dot_product_attention` (fused on GPU).
        """
        rows, query_length = hidden_states.shape[:2]
        query = self._heads(self.q_proj(hidden_states)) * jnp.asarray(self.head_dim**-0.5, self.dtype)
        rate = 0.0 if deterministic else self.dropout
        dropout_rng = self.make_rng("dropout") if rate > 0.0 else None
        new_cache = None
        if cache is not None:
            layout, expected = cache_layout(cache), kernel_policy.layout(self.kernels)
            if layout != expected:
                raise ValueError(f"the cache has the {layout} layout, but this model's kernels={self.kernels!r} "
                                 f"read the {expected} one; create it with init_cache(..., kernels={self.kernels!r})")
            batch = ancestors.shape[0]
            queries = query.reshape(batch, -1, self.num_heads, self.head_dim)  # an input's beams side by side
            key = self._heads(self.k_proj(hidden_states))
            value = self._heads(self.v_proj(hidden_states))
            output, weights, new_cache = CACHE_ATTENTION[layout](queries, key, value, cache, cache_index, ancestors,
                                                                 mask, self.dtype, rate, dropout_rng)
        else:
            if key_value is None:
                states = hidden_states if key_value_states is None else key_value_states
                key_value = {"key": self._heads(self.k_proj(states)), "value": self._heads(self.v_proj(states))}
                layout = None  # as projected: either kernel runs
            else:
                layout = kernel_policy.layout(self.kernels)
            batch = key_value["key"].shape[0]
            # Fold beams into the query axis, so that shared keys/values are not repeated per beam.
            queries = query.reshape(batch, -1, self.num_heads, self.head_dim)
            policy = layout or self.kernels  # precomputed keys/values take the kernel of their layout
            # Queries at positions 0.. over keys at 0..: self-attention neither cached nor offset.
            causal = self.causal and key_value_states is None and layout is None and cache_index is None
            if not need_weights and rate == 0.0 and layout != "cpu":
                output, weights = attend_output(queries, key_value["key"], key_value["value"], mask, self.dtype,
                                                policy, causal), None
            elif layout == "cpu":
                output, weights = attend_transposed(queries.astype(self.dtype).transpose(0, 2, 1, 3),
                                                    key_value["key"], key_value["value"], mask, self.dtype, rate,
                                                    dropout_rng)
                output = output.transpose(0, 2, 1, 3)
            else:
                output, weights = attend(queries, key_value["key"], key_value["value"], mask, self.dtype, rate,
                                         dropout_rng, policy)
            if need_weights:
                weights = weights.reshape(batch, self.num_heads, rows // batch, query_length, -1)
                weights = weights.transpose(0, 2, 1, 3, 4).reshape(rows, self.num_heads, query_length, -1)
        if not need_weights:
            weights = None
        if layer_head_mask is not None:
            # Linear in the weights: scaling a head's output equals scaling its weights.
            output = output * layer_head_mask[:, None].astype(output.dtype)
            if weights is not None:
                weights = weights * layer_head_mask[:, None, None].astype(weights.dtype)
        output = output.astype(self.dtype).reshape(rows, query_length, self.embed_dim)
        return self.out_proj(output), weights, new_cache
