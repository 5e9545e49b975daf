"""bart_jax.model.kernels.top_k: the CPU top_k exactly lax.top_k's values and indices, the CPU argmax exactly
jnp.argmax's indices, ties (and NaN) included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bart_jax.model.kernels import top_k as top_k_module
from bart_jax.model.kernels.top_k import argmax_cpu as argmax
from bart_jax.model.kernels.top_k import top_k_cpu as top_k


def rows_with_ties(rows: int, length: int, seed: int) -> np.ndarray:
    """Few distinct values (many ties, some -inf), as masked beam-search scores have."""
    rng = np.random.default_rng(seed)
    values = rng.integers(-6, 3, size=(rows, length)).astype(np.float32)
    values[rng.random((rows, length)) < 0.3] = -np.inf
    return values


@pytest.mark.parametrize("k", [1, 3, 8, 10])
@pytest.mark.parametrize("seed", range(4))
def test_equals_lax_top_k_on_blocked_rows(k, seed):
    # Not a multiple of BLOCK, and long enough that the blocked path runs.
    length = top_k_module.MIN_BLOCKS_PER_K * k * top_k_module.BLOCK + 37
    for values in (rows_with_ties(3, length, seed),
                   np.random.default_rng(seed).standard_normal((3, length)).astype(np.float32)):
        expected = lax.top_k(jnp.asarray(values), k)
        ours = jax.jit(top_k, static_argnums=1)(jnp.asarray(values), k)
        np.testing.assert_array_equal(np.asarray(ours[1]), np.asarray(expected[1]), err_msg=f"k={k}: indices")
        np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(expected[0]), err_msg=f"k={k}: values")
        assert ours[1].dtype == jnp.int32


def test_ties_between_blocks_prefer_the_lower_index():
    # Every block holds the same maximum: the k best are the first k occurrences.
    k, length = 4, 64 * top_k_module.BLOCK
    values = np.zeros((2, length), np.float32)
    values[:, :: top_k_module.BLOCK // 2] = 1.0
    _, indices = top_k(jnp.asarray(values), k)
    expected = np.arange(k) * (top_k_module.BLOCK // 2)
    np.testing.assert_array_equal(np.asarray(indices), np.stack([expected, expected]))


def test_short_rows_use_lax_top_k():
    values = rows_with_ties(2, 50, seed=0)
    for k in (1, 5):
        expected = lax.top_k(jnp.asarray(values), k)
        ours = top_k(jnp.asarray(values), k)
        np.testing.assert_array_equal(np.asarray(ours[1]), np.asarray(expected[1]))


@pytest.mark.parametrize("seed", range(4))
def test_argmax_equals_jnp_argmax(seed):
    rng = np.random.default_rng(seed)
    ties = rows_with_ties(5, 1000, seed)
    ties[0] = -np.inf  # a fully masked row: index 0
    with_nan = rng.standard_normal((4, 1000)).astype(np.float32)
    with_nan[1, [7, 300]] = np.nan  # the first NaN wins, as in jnp.argmax
    with_nan[2, 999] = np.nan
    for values in (ties, with_nan, rng.standard_normal((3, 50265)).astype(np.float32)):
        expected = np.asarray(jnp.argmax(jnp.asarray(values), axis=-1))
        ours = jax.jit(argmax)(jnp.asarray(values))
        assert ours.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(ours), expected, err_msg=f"argmax of rows {values[:, :6]}...")
