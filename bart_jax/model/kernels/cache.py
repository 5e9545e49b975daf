"""The two layouts of the decoder's self-attention cache, and how a step is written into them.

Both keep, per decoder layer, keys and values for `max_length * beams` slots, time-major: slot
`position * beams + beam` holds what row `beam` of an input computed at `position` (see
bart_jax/model/cache.py for the ancestry table that lets beam search leave them in place).

Portable layout, one buffer per tensor, as every backend reads it:

    key, value   [batch, max_length * beams, heads, head_dim]

written with one `dynamic_update_slice` per step and read whole, the positions not written yet
masked out: no data-dependent control flow, so an accelerator never waits on its host.

CPU layout (docs/cpu-kernels.md), each tensor a tuple over chunks of positions
(`chunk_bounds`), chunk c holding n_c positions:

    key[c]       [batch, heads, head_dim, n_c * beams]   (transposed: the scores contract head_dim)
    value[c]     [batch, heads, n_c * beams, head_dim]

so that a step reads only the chunks written so far, each as stored (a prefix sliced from one
buffer is copied out before every product). A bfloat16 CPU cache is kept as the uint16 bits of
its values (`storage_dtype`): XLA's CPU backend writes a step into integer buffers in place,
but updates a bfloat16 buffer through float32, rewriting all of it on every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# At most CACHE_CHUNKS chunks of at least MIN_CHUNK_POSITIONS positions. Each chunk costs
# compilation (bart-base W1, 142 positions: about 0.3 s a chunk) and fewer read more unwritten
# slots: 3-5 chunks ran W1 with about 7% less CPU time than one buffer read by its written
# prefix, two chunks 5% more than three, and three compile as fast as that buffer did.
CACHE_CHUNKS = 3
MIN_CHUNK_POSITIONS = 16


def layer_layout(layer_cache: dict) -> str:
    """"cpu" for a layer cache whose tensors are tuples of chunks, else "portable"."""
    return "cpu" if isinstance(layer_cache["key"], (tuple, list)) else "portable"


def layer_shapes(batch: int, heads: int, head_dim: int, max_length: int, beams: int, dtype,
                 layout: str) -> dict:
    """One layer's {"key", "value"} as `jax.ShapeDtypeStruct`s in `layout`."""
    if layout == "portable":
        slots = jax.ShapeDtypeStruct((batch, max_length * beams, heads, head_dim), jnp.dtype(dtype))
        return {"key": slots, "value": slots}
    stored = storage_dtype(dtype)
    sizes = [(end - start) * beams for start, end in chunk_bounds(max_length)]
    return {"key": tuple(jax.ShapeDtypeStruct((batch, heads, head_dim, n), stored) for n in sizes),
            "value": tuple(jax.ShapeDtypeStruct((batch, heads, n, head_dim), stored) for n in sizes)}


# --- portable -------------------------------------------------------------------------------
def write_portable(layer_cache: dict, key: jax.Array, value: jax.Array, position: jax.Array, beams: int) -> dict:
    """`layer_cache` with keys and values [batch, t * beams, heads, head_dim] (slot-ordered) of
    positions `position`..`position` + t - 1 written."""
    slot = position * beams
    return {name: jax.lax.dynamic_update_slice_in_dim(layer_cache[name], block.astype(layer_cache[name].dtype),
                                                      slot, axis=1)
            for name, block in (("key", key), ("value", value))}


# --- CPU ------------------------------------------------------------------------------------
def storage_dtype(dtype) -> jnp.dtype:
    """The dtype a CPU cache of `dtype` values is kept in: uint16 bits for bfloat16."""
    return jnp.dtype(jnp.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def to_storage(values: jax.Array, stored: jnp.dtype) -> jax.Array:
    """Values as a CPU cache of dtype `stored` keeps them."""
    if stored == jnp.uint16:
        return jax.lax.bitcast_convert_type(values.astype(jnp.bfloat16), jnp.uint16)
    return values.astype(stored)


def from_storage(stored: jax.Array) -> jax.Array:
    """The values a CPU cache leaf holds (bfloat16 for uint16 bits)."""
    return jax.lax.bitcast_convert_type(stored, jnp.bfloat16) if stored.dtype == jnp.uint16 else stored


def chunk_bounds(max_length: int) -> tuple[tuple[int, int], ...]:
    """(start, end) positions of a CPU cache's chunks for `max_length` positions."""
    size = max(MIN_CHUNK_POSITIONS, -(-max_length // CACHE_CHUNKS))
    return tuple((start, min(start + size, max_length)) for start in range(0, max_length, size))


def write_cpu(layer_cache: dict, key: jax.Array, value: jax.Array, position: jax.Array, beams: int) -> dict:
    """A CPU layer cache with the keys [batch, heads, head_dim, t * beams] and values [batch,
    heads, t * beams, head_dim] (storage dtype, slot-ordered) of positions `position`..`position`
    + t - 1 written."""
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
