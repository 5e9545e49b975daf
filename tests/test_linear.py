"""The products of bart_jax/linear.py: values and gradients of the weight-first and low-precision products."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax.linear import WEIGHT_FIRST_ROWS, Linear, dot_transposed, low_precision_product


@pytest.mark.parametrize("rows", [1, 8, WEIGHT_FIRST_ROWS, WEIGHT_FIRST_ROWS + 1])
def test_float32_product_with_bias_matches_numpy_on_both_sides_of_weight_first_rows(rows):
    # Up to WEIGHT_FIRST_ROWS rows the product runs weight-first; the values and gradients must not show it.
    rng = np.random.default_rng(rows)
    inputs = rng.standard_normal((rows, 1, 24)).astype(np.float32)
    weight = rng.standard_normal((40, 24)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)

    output = dot_transposed(jnp.asarray(inputs), jnp.asarray(weight), jnp.float32, jnp.asarray(bias))
    expected = inputs.astype(np.float64) @ weight.T.astype(np.float64) + bias
    assert output.shape == (rows, 1, 40), f"output shape {output.shape}"
    np.testing.assert_allclose(np.asarray(output), expected, atol=1e-4, err_msg=f"{rows} rows: product + bias differs")

    def loss(inputs, weight, bias):
        return jnp.sum(jnp.sin(dot_transposed(inputs, weight, jnp.float32, bias)))

    gradients = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(inputs), jnp.asarray(weight), jnp.asarray(bias))
    cosine = np.cos(expected)
    for ours, reference, name in zip(gradients, (cosine @ weight, np.einsum("rto,rti->oi", cosine, inputs),
                                                 cosine.sum((0, 1))), ("inputs", "weight", "bias")):
        np.testing.assert_allclose(np.asarray(ours), reference, rtol=1e-4, atol=1e-3,
                                   err_msg=f"{rows} rows: d {name} differs")


def test_low_precision_product_gradients_are_bfloat16_products_of_the_rounded_gradient():
    rng = np.random.default_rng(0)
    rows = jnp.asarray(rng.standard_normal((6, 5)), jnp.bfloat16)
    weight = jnp.asarray(rng.standard_normal((4, 5)), jnp.bfloat16)
    output_gradient = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)

    output, backward = jax.vjp(low_precision_product, rows, weight)
    rows_gradient, weight_gradient = backward(output_gradient)

    as_float = lambda x: np.asarray(x, np.float32)  # noqa: E731
    rounded = as_float(output_gradient.astype(jnp.bfloat16))
    np.testing.assert_allclose(as_float(output), as_float(rows) @ as_float(weight).T, rtol=1e-6,
                               err_msg="forward product differs from rows @ weight.T")
    assert rows_gradient.dtype == jnp.bfloat16 and weight_gradient.dtype == jnp.bfloat16, "gradients keep the operand dtype"
    np.testing.assert_allclose(as_float(rows_gradient), as_float((rounded @ as_float(weight)).astype(jnp.bfloat16)),
                               rtol=1e-2, err_msg="d rows differs from gradient @ weight")
    np.testing.assert_allclose(as_float(weight_gradient), as_float((rounded.T @ as_float(rows)).astype(jnp.bfloat16)),
                               rtol=1e-2, err_msg="d weight differs from gradient.T @ rows")


def test_dot_transposed_gradients_close_to_float32_in_bfloat16():
    rng = np.random.default_rng(1)
    inputs = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((8, 16)) * 0.1, jnp.float32)

    def loss(inputs, weight, dtype):
        return jnp.sum(jnp.tanh(dot_transposed(inputs, weight, dtype)))

    for ours, reference, name in zip(jax.grad(loss, argnums=(0, 1))(inputs, weight, jnp.bfloat16),
                                     jax.grad(loss, argnums=(0, 1))(inputs, weight, jnp.float32), ("inputs", "weight")):
        assert ours.dtype == jnp.float32, f"d {name}: gradient of float32 parameters is {ours.dtype}"
        np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=0.05,
                                   err_msg=f"d {name}: bfloat16 gradient far from the float32 one")


@pytest.mark.parametrize("name, shape", [("weight", (40, 25)), ("bias", (41,))])
def test_given_parameter_of_another_shape_is_refused_by_name(name, shape):
    # Linear checks given parameters' shapes itself (bart_jax/parameters.py), not through flax.
    module = Linear(40)
    inputs = jnp.ones((2, 24))
    params = module.init(jax.random.PRNGKey(0), inputs)["params"]
    assert params["weight"].shape == (40, 24) and params["bias"].shape == (40,)
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, inputs)),
                               np.asarray(inputs @ params["weight"].T + params["bias"]), atol=1e-5)
    wrong = dict(params, **{name: jnp.zeros(shape)})
    with pytest.raises(ValueError, match=re.escape(f"parameter {name} has shape {shape}, expected")):
        module.apply({"params": wrong}, inputs)
