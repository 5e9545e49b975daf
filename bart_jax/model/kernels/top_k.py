"""`top_k` and `argmax` over long rows, as search takes them over the whole vocabulary.

Portable: `lax.top_k` and `jnp.argmax`.

CPU (docs/cpu-kernels.md): XLA's CPU top-k walks all of a row's entries one by one (bart-base beam search: [8, 4 x 50265]
per step, about 3 ms). Taking the k best blocks by their maximum first, then the k best entries
of those blocks, reads the row once in a vectorised reduction and sorts only k blocks' entries
(a shorter last block is reduced on its own rather than padded: a pad is a copy of the row).
XLA's argmax is a reduction over (value, index) pairs that its CPU backend does not vectorise
either (greedy search, [8, 50265]: about 0.9 ms a step); two vectorised reductions take 0.2 ms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bart_jax.model.kernels import dispatch

# Entries per block; rows shorter than MIN_BLOCKS_PER_K * k blocks use lax.top_k directly.
BLOCK = 256
MIN_BLOCKS_PER_K = 4


def top_k_cpu(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k(values, k)` for values [rows, n]: (top values [rows, k], their indices [rows, k]).

    Same result as lax.top_k, ties included (the lower index first): a block whose maximum ranks
    below the k best block maxima holds no entry of the top k, because each better-ranked block
    holds a distinct entry that ranks before any of its own.
    """
    rows, length = values.shape
    blocks = -(-length // BLOCK)
    if blocks < MIN_BLOCKS_PER_K * k:
        return top_k_portable(values, k)
    # Computed once and stored: XLA would otherwise fuse the producer (log-softmax, logits
    # processors, beam scores) into both reads below and compute it twice (bart-base W1: 6.8 ms
    # a step against 2 ms, the pad to whole blocks this replaces included).
    values = lax.optimization_barrier(values)
    full = length // BLOCK  # whole blocks; the last one may be shorter
    maxima = jnp.max(values[:, : full * BLOCK].reshape(rows, full, BLOCK), axis=-1)  # [rows, full]
    if full < blocks:
        maxima = jnp.concatenate([maxima, jnp.max(values[:, full * BLOCK:], axis=-1, keepdims=True)], axis=1)
    # Blocks in index order, so that the entries gathered keep their relative order for ties.
    best_blocks = jnp.sort(lax.top_k(maxima, k)[1], axis=-1)  # [rows, k]
    positions = (best_blocks[:, :, None] * BLOCK + jnp.arange(BLOCK)).reshape(rows, k * BLOCK)
    candidates = jnp.take_along_axis(values, jnp.minimum(positions, length - 1), axis=1)
    # Positions past the row's end (in a shorter last block) rank last, as -inf padding would.
    candidates = jnp.where(positions < length, candidates, -jnp.inf)  # [rows, k * BLOCK]
    top_values, picked = lax.top_k(candidates, k)  # [rows, k]
    return top_values, jnp.take_along_axis(positions, picked, axis=1).astype(jnp.int32)


def argmax_cpu(values: jax.Array) -> jax.Array:
    """`jnp.argmax(values, axis=-1)` for values [rows, n]: indices [rows] int32.

    The same result, ties and NaN included: the first index holding the row's maximum, or
    its first NaN (a row's maximum is NaN when it holds one).
    """
    best = jnp.max(values, axis=-1, keepdims=True)
    is_best = (values == best) | jnp.isnan(values)
    positions = lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
    return jnp.min(jnp.where(is_best, positions, values.shape[-1]), axis=-1)


def top_k_portable(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k(values, k)`: values [rows, n] -> (top values [rows, k], indices [rows, k] int32)."""
    top_values, indices = lax.top_k(values, k)
    return top_values, indices.astype(jnp.int32)


def argmax_portable(values: jax.Array) -> jax.Array:
    """`jnp.argmax(values, axis=-1)`: values [rows, n] -> indices [rows] int32."""
    return jnp.argmax(values, axis=-1).astype(jnp.int32)


def top_k(values: jax.Array, k: int, kernels: str = "auto") -> tuple[jax.Array, jax.Array]:
    """The k largest entries of each row, ties to the lower index: values [rows, n] ->
    (top values [rows, k], their indices [rows, k] int32)."""
    return dispatch(kernels, lambda v: top_k_cpu(v, k), lambda v: top_k_portable(v, k), values)


def argmax(values: jax.Array, kernels: str = "auto") -> jax.Array:
    """The first index of each row's maximum (or its first NaN): values [rows, n] -> [rows] int32."""
    return dispatch(kernels, argmax_cpu, argmax_portable, values)
