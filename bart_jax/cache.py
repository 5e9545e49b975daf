"""The decoder's preallocated self-attention key/value cache.

A cache is a tuple over decoder layers of {"key", "value"} arrays of shape
[rows, max_length, heads, head_dim]; `rows` is batch * beams during beam search.
Decoding writes new keys/values at a position (`cache_index`) given by the caller, so
the cache has static shapes and the decode step compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bart_jax.config import BartConfig


def cache_shapes(config: BartConfig, rows: int, max_length: int, dtype=jnp.float32):
    """The cache's structure as `jax.ShapeDtypeStruct`s, computed without allocating."""
    head_dim = config.d_model // config.decoder_attention_heads
    layer = jax.ShapeDtypeStruct((rows, max_length, config.decoder_attention_heads, head_dim), jnp.dtype(dtype))
    return tuple({"key": layer, "value": layer} for _ in range(config.decoder_layers))


def init_cache(config: BartConfig, rows: int, max_length: int, dtype=jnp.float32):
    """A zero cache for `rows` sequences of up to `max_length` decoder tokens.

    Returns a tuple over decoder layers of {"key", "value"}: [rows, max_length, heads, head_dim].
    """
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(config, rows, max_length, dtype))


def reorder_cache(cache, row_indices: jax.Array):
    """Gathers cache rows (beam search keeps the cache of the beams it continues).

    row_indices: [rows] int, the source row of each new row.
    """
    return jax.tree_util.tree_map(lambda x: jnp.take(x, row_indices, axis=0), cache)
