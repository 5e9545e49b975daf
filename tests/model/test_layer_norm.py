"""bart_jax's LayerNorm against flax.linen.LayerNorm (same parameters, values and gradients) under
both kernel policies, and the CPU statistics against the portable ones."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax.model.kernels.layer_norm import normalize_cpu, normalize_portable
from bart_jax.model.layer_norm import LayerNorm


@pytest.mark.parametrize("kernels", ["portable", "cpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_flax(dtype, kernels):
    inputs = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 24)) * 3 + 1, dtype)
    ours, reference = LayerNorm(epsilon=1e-5, dtype=dtype, kernels=kernels), nn.LayerNorm(epsilon=1e-5, dtype=dtype)
    params = ours.init(jax.random.PRNGKey(0), inputs)
    assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(
        jnp.shape, reference.init(jax.random.PRNGKey(0), inputs)), "parameter trees differ"
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape) * 0.1, p.dtype), params)
    atol = 1e-5 if dtype == jnp.float32 else 2e-2
    out, expected = ours.apply(params, inputs), reference.apply(params, inputs)
    assert out.dtype == expected.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=atol)

    def loss(module, params, inputs):
        return jnp.sum(jnp.sin(module.apply(params, inputs).astype(jnp.float32)))

    grads = jax.grad(loss, argnums=(1, 2))(ours, params, inputs)
    expected_grads = jax.grad(loss, argnums=(1, 2))(reference, params, inputs)
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected_grads)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol * 10,
                                   err_msg="gradients differ from flax's LayerNorm")


@pytest.mark.parametrize("offset", [0.0, 3.0, 30.0, 100.0])
def test_cpu_statistics_are_as_accurate_as_the_portable_ones(offset):
    """Against float64, for rows whose mean is up to 50 deviations: the CPU kernel's one-pass
    statistics are shifted by an estimate of the mean, so they do not cancel at the mean."""
    rng = np.random.default_rng(2)
    values = jnp.asarray(rng.standard_normal((4, 7, 768)) * 2 + offset, jnp.float32)
    scale, bias = (jnp.asarray(rng.standard_normal(768), jnp.float32) for _ in range(2))
    exact = np.asarray(values, np.float64)
    exact = (exact - exact.mean(-1, keepdims=True)) / np.sqrt(exact.var(-1, keepdims=True) + 1e-5)
    exact = exact * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)
    for normalize in (normalize_cpu, normalize_portable):
        error = np.abs(np.asarray(normalize(values, scale, bias, 1e-5)) - exact).max()
        assert error <= 3e-5, f"{normalize.__name__}: {error:.3g} from float64 at mean {offset}, deviation 2"
