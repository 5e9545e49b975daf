"""The decoder's preallocated self-attention cache, laid out for beam search.

A cache is {"layers": tuple over decoder layers of {"key", "value"}, "ancestors"}, where each
layer's "key" and "value" are tuples over the cache's chunks (`chunk_bounds`): chunk c holds
the positions [start_c, end_c), n_c = end_c - start_c of them:

    key[c]     [batch, heads, head_dim, n_c * beams]
    value[c]   [batch, heads, n_c * beams, head_dim]
    ancestors  [batch, beams, max_length] int32

`beams` is the number of rows per input (beams in beam search, returned sequences in
sampling, 1 in greedy search); decoder rows are batch * beams, beams inner. Slots are
time-major: slot `(position - start_c) * beams + beam` of chunk c holds what row `beam` computed
at `position`. Decoding writes each step's keys/values as one contiguous block of slots at
`cache_index` (`write_position`), so shapes are static and the decode step compiles once. When
beam search continues beam j in row i, no keys or values move: `reorder_cache` only moves the
rows of `ancestors`, which records, for each row and position, the beam whose slot holds that
position's keys/values.

The layout serves the attention matmuls as they run on every step: keys are stored transposed
(head_dim before slots) because the scores contract head_dim, values are not because the output
contracts slots, and heads lead so that (batch, heads) are the matmuls' batch dimensions. The
chunks let a step read only the written part of the cache without copying it: attention skips
the chunks not written yet and multiplies the others as they are stored (bart_jax/attention.py),
whereas a prefix sliced from one long buffer is copied out before every product.

A bfloat16 cache is kept as the uint16 bits of its values (`storage_dtype`; `from_storage`
reads them): XLA's CPU backend writes a step into integer buffers in place, but updates a
bfloat16 buffer through float32, rewriting all of it on every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bart_jax.config import BartConfig

# At most CACHE_CHUNKS chunks of at least MIN_CHUNK_POSITIONS positions. Each chunk costs
# compilation (bart-base W1, 142 positions: about 0.3 s a chunk) and fewer read more unwritten
# slots: 3-5 chunks ran W1 with about 7% less CPU time than one buffer read by its written
# prefix, two chunks 5% more than three, and three compile as fast as that buffer did.
CACHE_CHUNKS = 3
MIN_CHUNK_POSITIONS = 16


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


def chunk_bounds(max_length: int) -> tuple[tuple[int, int], ...]:
    """(start, end) positions of a cache's chunks for `max_length` positions."""
    size = max(MIN_CHUNK_POSITIONS, -(-max_length // CACHE_CHUNKS))
    return tuple((start, min(start + size, max_length)) for start in range(0, max_length, size))


def cache_shapes(config: BartConfig, batch: int, max_length: int, beams: int = 1, dtype=jnp.float32):
    """The cache's structure as `jax.ShapeDtypeStruct`s, computed without allocating.
    `dtype`: the dtype of the cached keys/values (kept as `storage_dtype(dtype)`)."""
    heads = config.decoder_attention_heads
    head_dim, stored = config.d_model // heads, storage_dtype(dtype)
    slots = [(end - start) * beams for start, end in chunk_bounds(max_length)]
    key = tuple(jax.ShapeDtypeStruct((batch, heads, head_dim, n), stored) for n in slots)
    value = tuple(jax.ShapeDtypeStruct((batch, heads, n, head_dim), stored) for n in slots)
    return {
        "layers": tuple({"key": key, "value": value} for _ in range(config.decoder_layers)),
        "ancestors": jax.ShapeDtypeStruct((batch, beams, max_length), jnp.int32),
    }


def init_cache(config: BartConfig, batch: int, max_length: int, beams: int = 1, dtype=jnp.float32):
    """A zero cache for `batch` inputs with `beams` rows each, up to `max_length` decoder tokens."""
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  cache_shapes(config, batch, max_length, beams, dtype))


def write_position(layer_cache: dict, key: jax.Array, value: jax.Array, position: jax.Array, beams: int) -> dict:
    """A layer's cache {"key", "value"} with the keys [batch, heads, head_dim, t * beams] and values
    [batch, heads, t * beams, head_dim] (storage dtype, slot-ordered) of positions
    `position`..`position` + t - 1 written."""
    slot = position * beams
    one_position = key.shape[-1] == beams
    return {"key": _write_slots(layer_cache["key"], key, slot, 3, one_position),
            "value": _write_slots(layer_cache["value"], value, slot, 2, one_position)}


def _write_slots(chunks: tuple, block: jax.Array, slot: jax.Array, axis: int, within_one_chunk: bool) -> tuple:
    """`chunks` (a slot axis `axis` split in chunks) with `block` written from slot `slot`.

    A block within one chunk (one position: chunks hold whole positions) is written into every
    chunk in place, those it misses rewriting their own slots; a longer block, as a prompt
    decoded at once, goes through the whole axis.
    """
    width = block.shape[axis]
    sizes = [chunk.shape[axis] for chunk in chunks]
    starts = [sum(sizes[:index]) for index in range(len(chunks))]
    if not within_one_chunk:
        whole = jax.lax.dynamic_update_slice_in_dim(jnp.concatenate(chunks, axis), block, slot, axis)
        return tuple(jax.lax.slice_in_dim(whole, start, start + size, axis=axis) for start, size in zip(starts, sizes))
    written = []
    for start, size, chunk in zip(starts, sizes, chunks):
        local = slot - start
        offset = jnp.clip(local, 0, size - width)
        kept = jax.lax.dynamic_slice_in_dim(chunk, offset, width, axis)
        inside = (local >= 0) & (local < size)
        written.append(jax.lax.dynamic_update_slice_in_dim(chunk, jnp.where(inside, block, kept), offset, axis))
    return tuple(written)


def reorder_cache(cache, row_indices: jax.Array):
    """The cache after beam search keeps, in each row r, the hypothesis of row `row_indices[r]`.

    row_indices: [batch * beams], each within its own input's rows. Only `ancestors` moves.
    """
    ancestors = cache["ancestors"]  # [batch, beams, max_length]
    batch, beams, max_length = ancestors.shape
    moved = jnp.take(ancestors.reshape(batch * beams, max_length), row_indices, axis=0, mode="clip")
    return {**cache, "ancestors": moved.reshape(batch, beams, max_length)}
