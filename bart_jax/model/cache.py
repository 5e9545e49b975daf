"""The decoder's preallocated self-attention cache, laid out for beam search.

A cache is {"layers": tuple over decoder layers of {"key", "value"}, "ancestors"}:

    ancestors    [batch, beams, max_length] int32

and each layer's keys and values in one of two layouts, chosen when the cache is created by the
kernel policy (bart_jax/model/kernels/cache.py):

    portable     key, value  [batch, max_length * beams, heads, head_dim]
    cpu          key[c]      [batch, heads, head_dim, n_c * beams]   a tuple over chunks c of
                 value[c]    [batch, heads, n_c * beams, head_dim]   n_c positions (bf16 as uint16 bits)

`beams` is the number of rows per input (beams in beam search, returned sequences in
sampling, 1 in greedy search); decoder rows are batch * beams, beams inner. Slots are
time-major: slot `position * beams + beam` holds what row `beam` computed at `position`.
Decoding writes each step's keys/values as one contiguous block of slots at `cache_index`, so
shapes are static and the decode step compiles once. When beam search continues beam j in row
i, no keys or values move: `reorder_cache` only moves the rows of `ancestors`, which records,
for each row and position, the beam whose slot holds that position's keys/values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bart_jax.config import BartConfig
from bart_jax.model.kernels import layout as kernels_layout
from bart_jax.model.kernels.cache import layer_layout, layer_shapes


def cache_shapes(config: BartConfig, batch: int, max_length: int, beams: int = 1, dtype=jnp.float32,
                 kernels: str = "auto"):
    """The cache's structure as `jax.ShapeDtypeStruct`s, computed without allocating.
    `dtype`: the dtype of the cached keys/values; `kernels`: the policy whose layout it takes
    ("auto": that of the platform it will be used on, see `bart_jax.model.kernels.layout`)."""
    heads = config.decoder_attention_heads
    layer = layer_shapes(batch, heads, config.d_model // heads, max_length, beams, dtype, kernels_layout(kernels))
    return {
        "layers": tuple(layer for _ in range(config.decoder_layers)),
        "ancestors": jax.ShapeDtypeStruct((batch, beams, max_length), jnp.int32),
    }


def init_cache(config: BartConfig, batch: int, max_length: int, beams: int = 1, dtype=jnp.float32,
               kernels: str = "auto"):
    """A zero cache for `batch` inputs with `beams` rows each, up to `max_length` decoder tokens,
    in the layout of `kernels` (the policy of the model that will read it)."""
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  cache_shapes(config, batch, max_length, beams, dtype, kernels))


def cache_layout(cache) -> str:
    """The layout ("portable" or "cpu") of a cache, or of one layer's {"key", "value"}."""
    return layer_layout(cache["layers"][0] if "layers" in cache else cache)


def reorder_cache(cache, row_indices: jax.Array):
    """The cache after beam search keeps, in each row r, the hypothesis of row `row_indices[r]`.

    row_indices: [batch * beams], each within its own input's rows. Only `ancestors` moves.
    """
    ancestors = cache["ancestors"]  # [batch, beams, max_length]
    batch, beams, max_length = ancestors.shape
    moved = jnp.take(ancestors.reshape(batch * beams, max_length), row_indices, axis=0, mode="clip")
    return {**cache, "ancestors": moved.reshape(batch, beams, max_length)}
