"""Attention helpers whose CPU-specific formulation must not change the math."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax.attention import weigh_values


@pytest.mark.parametrize("queries", [1, 2, 5])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weigh_values_is_softmax_times_values(queries, dtype):
    """One query per (batch, head) — a greedy decoding step — included: there the product runs
    with a padded second row."""
    rng = np.random.default_rng(queries)
    scores = rng.standard_normal((2, 3, queries, 17)).astype(np.float32)
    scores[0, 1, :, 5:] = -np.inf  # slots not written yet
    value = rng.standard_normal((2, 3, 17, 8)).astype(np.float32)
    output, weights = weigh_values(jnp.asarray(scores), jnp.asarray(value, dtype), jnp.dtype(dtype))
    expected_weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected_weights /= expected_weights.sum(-1, keepdims=True)
    value_used = np.asarray(jnp.asarray(value, dtype).astype(jnp.float32))
    expected = expected_weights @ value_used
    assert output.shape == (2, 3, queries, 8) and output.dtype == jnp.float32
    tolerance = 1e-5 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(np.asarray(output), expected, atol=tolerance, rtol=tolerance,
                               err_msg=f"{queries} queries, {dtype}")
    np.testing.assert_allclose(np.asarray(weights), expected_weights, atol=1e-6)
