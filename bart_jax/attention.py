"""Multi-head attention as BART uses it: encoder self-attention, causal decoder
self-attention over a static key/value cache, and cross-attention over keys/values that
may have been projected once per source row.

Masks are boolean (True = may attend) and broadcast to [batch, heads, query, key]. Scores,
masking and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bart_jax.sharding import CACHE, PER_HEAD, constrain

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


def attention_weights(query: Array, key: Array, mask: Optional[Array]) -> Array:
    """Softmax attention probabilities in float32.

    query: [batch, query_length, heads, head_dim], already scaled by head_dim**-0.5.
    key: [batch, key_length, heads, head_dim]. mask: broadcastable to [batch, heads, q, k].
    Returns [batch, heads, query_length, key_length].
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    if mask is not None:
        # The most negative finite value (not -inf) keeps a fully masked row finite, as transformers' eager path.
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


class BartAttention(nn.Module):
    """q/k/v/out projections and scaled dot-product attention (transformers' `BartAttention`)."""

    embed_dim: int
    num_heads: int
    dropout: float = 0.0
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def setup(self):
        def dense():
            return nn.Dense(
                self.embed_dim,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.initializers.normal(self.init_std),
            )

        self.q_proj = dense()
        self.k_proj = dense()
        self.v_proj = dense()
        self.out_proj = dense()
        self.attention_dropout = nn.Dropout(self.dropout)

    def _split_heads(self, x: Array) -> Array:
        return constrain(x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim)), PER_HEAD)

    def project_key_value(self, states: Array) -> dict[str, Array]:
        """states [batch, key_length, d_model] -> {"key", "value"}: [batch, key_length, heads, head_dim]."""
        return {"key": self._split_heads(self.k_proj(states)), "value": self._split_heads(self.v_proj(states))}

    def __call__(
        self,
        hidden_states: Array,
        mask: Optional[Array] = None,
        key_value_states: Optional[Array] = None,
        key_value: Optional[dict[str, Array]] = None,
        cache: Optional[dict[str, Array]] = None,
        cache_index: Optional[Array] = None,
        layer_head_mask: Optional[Array] = None,
        deterministic: bool = True,
    ) -> tuple[Array, Array, Optional[dict[str, Array]]]:
        """Attention of `hidden_states` [rows, query_length, d_model] over one of:

        - itself (self-attention; with `cache` and `cache_index`, new keys/values are first
          written into the cache [rows, max_length, heads, head_dim] and the whole cache is attended),
        - `key_value_states` [batch, key_length, d_model] (cross-attention), or
        - precomputed `key_value` from `project_key_value` (cross-attention during decoding).

        For cross-attention `rows` may be a multiple of the keys' batch (beams of a row share
        that row's keys/values; beams are the inner dimension of rows).
        `mask`: boolean, broadcastable to [batch, heads, query, key]. `layer_head_mask`: [heads].
        Returns (output [rows, query_length, d_model], weights [rows, heads, query, key], new cache).
        """
        query = self._split_heads(self.q_proj(hidden_states)) * jnp.asarray(self.head_dim**-0.5, self.dtype)
        new_cache = None
        if key_value is None:
            key_value = self.project_key_value(hidden_states if key_value_states is None else key_value_states)
        key, value = key_value["key"], key_value["value"]
        if cache is not None:
            start = (0, cache_index, 0, 0)
            new_cache = {
                name: constrain(lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype), start), CACHE)
                for name, new in (("key", key), ("value", value))
            }
            key, value = new_cache["key"].astype(self.dtype), new_cache["value"].astype(self.dtype)

        rows, query_length = query.shape[:2]
        groups = rows // key.shape[0]
        # Fold beams into the query axis so that shared keys/values are not repeated per beam.
        query = query.reshape((key.shape[0], groups * query_length) + query.shape[2:])
        weights = attention_weights(query, key, mask)  # [batch, heads, groups * query, key]
        if layer_head_mask is not None:
            weights = weights * layer_head_mask[None, :, None, None].astype(weights.dtype)
        dropped = self.attention_dropout(weights, deterministic=deterministic)
        output = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(self.dtype), value)
        output = output.reshape((rows, query_length, self.embed_dim))
        output = self.out_proj(output)

        heads, key_length = weights.shape[1], weights.shape[-1]
        weights = weights.reshape(key.shape[0], heads, groups, query_length, key_length)
        weights = weights.transpose(0, 2, 1, 3, 4).reshape(rows, heads, query_length, key_length)
        return output, weights, new_cache
