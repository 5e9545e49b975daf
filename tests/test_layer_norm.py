"""bart_jax's LayerNorm against flax.linen.LayerNorm: same parameters, values and gradients."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax.layer_norm import LayerNorm


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_flax(dtype):
    inputs = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 24)) * 3 + 1, dtype)
    ours, reference = LayerNorm(epsilon=1e-5, dtype=dtype), nn.LayerNorm(epsilon=1e-5, dtype=dtype)
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
