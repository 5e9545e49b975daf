"""The decoder's preallocated self-attention cache, laid out for beam search.

A cache is {"layers": tuple over decoder layers of {"key", "value"}, "ancestors"}:

    key        [batch, heads, head_dim, max_length * beams]
    value      [batch, heads, max_length * beams, head_dim]
    ancestors  [batch, beams, max_length] int32

`beams` is the number of rows per input (beams in beam search, returned sequences in
sampling, 1 in greedy search); decoder rows are batch * beams, beams inner. The cache's slots
are time-major: slot `position * beams + beam` holds what row `beam` computed at `position`.
Decoding writes each step's keys/values as one contiguous block of slots at `cache_index`, so
shapes are static and the decode step compiles once. When beam search continues beam j in row
i, no keys or values move: `reorder_cache` only moves the rows of `ancestors`, which records,
for each row and position, the beam whose slot holds that position's keys/values.

The layout serves the attention matmuls as they run on every step: keys are stored transposed
(head_dim before slots) because the scores contract head_dim, values are not because the output
contracts slots, and heads lead so that (batch, heads) are the matmuls' batch dimensions. Each
step then reads the cache as stored (its written part only, see bart_jax/attention.py), never
transposing it or gathering it by beam.

A bfloat16 cache is kept as the uint16 bits of its values (`storage_dtype`; `from_storage`
reads them): XLA's CPU backend writes a step into integer buffers in place, but updates a
bfloat16 buffer through float32, rewriting all of it on every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bart_jax.config import BartConfig


def storage_dtype(dtype) -> jnp.dtype:
    """The dtype a cache of `dtype` values is kept in: uint16 bits for bfloat16."""
    return jnp.dtype(jnp.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def to_storage(values: jax.Array, stored: jnp.dtype) -> jax.Array:
    """Values as a cache of dtype `stored` keeps them."""
    if stored == jnp.uint16:
        return jax.lax.bitcast_convert_type(values.astype(jnp.bfloat16), jnp.uint16)
    return values.astype(stored)


def from_storage(stored: jax.Array) -> jax.Array:
    """The values a cache leaf holds (bfloat16 for uint16 bits)."""
    return jax.lax.bitcast_convert_type(stored, jnp.bfloat16) if stored.dtype == jnp.uint16 else stored


def cache_shapes(config: BartConfig, batch: int, max_length: int, beams: int = 1, dtype=jnp.float32):
    """The cache's structure as `jax.ShapeDtypeStruct`s, computed without allocating.
    `dtype`: the dtype of the cached keys/values (kept as `storage_dtype(dtype)`)."""
    heads = config.decoder_attention_heads
    head_dim, slots = config.d_model // heads, max_length * beams
    key = jax.ShapeDtypeStruct((batch, heads, head_dim, slots), storage_dtype(dtype))
    value = jax.ShapeDtypeStruct((batch, heads, slots, head_dim), storage_dtype(dtype))
    return {
        "layers": tuple({"key": key, "value": value} for _ in range(config.decoder_layers)),
        "ancestors": jax.ShapeDtypeStruct((batch, beams, max_length), jnp.int32),
    }


def init_cache(config: BartConfig, batch: int, max_length: int, beams: int = 1, dtype=jnp.float32):
    """A zero cache for `batch` inputs with `beams` rows each, up to `max_length` decoder tokens."""
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  cache_shapes(config, batch, max_length, beams, dtype))


def reorder_cache(cache, row_indices: jax.Array):
    """The cache after beam search keeps, in each row r, the hypothesis of row `row_indices[r]`.

    row_indices: [batch * beams], each within its own input's rows. Only `ancestors` moves.
    """
    ancestors = cache["ancestors"]  # [batch, beams, max_length]
    batch, beams, max_length = ancestors.shape
    moved = jnp.take(ancestors.reshape(batch * beams, max_length), row_indices, axis=0, mode="clip")
    return {**cache, "ancestors": moved.reshape(batch, beams, max_length)}
