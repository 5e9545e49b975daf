"""The products of bart_jax/model/kernels/linear.py: values and gradients of the CPU formulation
(weight-first, 2-D) and of the low-precision product, and the CPU one against its portable twin."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax.model.kernels.linear import (ACCUMULATION_BLOCKS, WEIGHT_FIRST_ROWS, low_precision_product, project_cpu, project_portable,
                                           vocabulary_cpu, vocabulary_product)


@pytest.mark.parametrize("rows", [1, 8, WEIGHT_FIRST_ROWS, WEIGHT_FIRST_ROWS + 1])
def test_float32_product_with_bias_matches_numpy_on_both_sides_of_weight_first_rows(rows):
    # Up to WEIGHT_FIRST_ROWS rows the product runs weight-first; the values and gradients must not show it.
    rng = np.random.default_rng(rows)
    inputs = rng.standard_normal((rows, 1, 24)).astype(np.float32)
    weight = rng.standard_normal((40, 24)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)

    output = project_cpu(jnp.asarray(inputs), jnp.asarray(weight), jnp.asarray(bias), jnp.float32)
    expected = inputs.astype(np.float64) @ weight.T.astype(np.float64) + bias
    assert output.shape == (rows, 1, 40), f"output shape {output.shape}"
    np.testing.assert_allclose(np.asarray(output), expected, atol=1e-4, err_msg=f"{rows} rows: product + bias differs")

    def loss(inputs, weight, bias):
        return jnp.sum(jnp.sin(project_cpu(inputs, weight, bias, jnp.float32)))

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
    assert rows_gradient.dtype == weight_gradient.dtype == jnp.bfloat16, "gradients keep the operand dtype"
    np.testing.assert_allclose(as_float(rows_gradient), as_float((rounded @ as_float(weight)).astype(jnp.bfloat16)),
                               rtol=1e-2, err_msg="d rows differs from gradient @ weight")
    np.testing.assert_allclose(as_float(weight_gradient), as_float((rounded.T @ as_float(rows)).astype(jnp.bfloat16)),
                               rtol=1e-2, err_msg="d weight differs from gradient.T @ rows")


def test_cpu_product_gradients_close_to_float32_in_bfloat16():
    rng = np.random.default_rng(1)
    inputs = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((8, 16)) * 0.1, jnp.float32)

    def loss(inputs, weight, dtype):
        return jnp.sum(jnp.tanh(project_cpu(inputs, weight, None, dtype)))

    for ours, reference, name in zip(jax.grad(loss, argnums=(0, 1))(inputs, weight, jnp.bfloat16),
                                     jax.grad(loss, argnums=(0, 1))(inputs, weight, jnp.float32), ("inputs", "weight")):
        assert ours.dtype == jnp.float32, f"d {name}: gradient of float32 parameters is {ours.dtype}"
        np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=0.05,
                                   err_msg=f"d {name}: bfloat16 gradient far from the float32 one")


@pytest.mark.parametrize("rows", [1, 8, WEIGHT_FIRST_ROWS + 1, 300])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_product_equals_its_portable_twin(rows, dtype, with_bias):
    rng = np.random.default_rng(rows)
    inputs = jnp.asarray(rng.standard_normal((rows, 2, 24)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(40), jnp.float32) if with_bias else None
    # Sums over up to 600 rows in another order: float32 rounding reaches about 1e-5.
    tolerance = 1e-4 if dtype == "float32" else 1e-2

    def loss(product, inputs, weight):
        return jnp.sum(jnp.sin(product(inputs, weight, bias, jnp.dtype(dtype))))

    products = (project_cpu, project_portable)
    for name, cpu, portable in (
        ("values", project_cpu(inputs, weight, bias, jnp.dtype(dtype)),
         project_portable(inputs, weight, bias, jnp.dtype(dtype))),
        ("d inputs", *(jax.grad(loss, argnums=1)(product, inputs, weight) for product in products)),
        ("d weight", *(jax.grad(loss, argnums=2)(product, inputs, weight) for product in products)),
    ):
        np.testing.assert_allclose(np.asarray(cpu), np.asarray(portable), rtol=tolerance, atol=tolerance,
                                   err_msg=f"{name}: CPU product differs from the portable one ({rows} rows, {dtype})")


@pytest.mark.parametrize("rows", [3, 300])  # weight-first up to FEW_ROWS rows
def test_cpu_vocabulary_product_equals_its_portable_twin(rows):
    rng = np.random.default_rng(rows)
    inputs = jnp.asarray(rng.standard_normal((rows, 1, 16)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((99, 16)), jnp.float32)
    np.testing.assert_allclose(np.asarray(vocabulary_cpu(inputs, weight, jnp.float32)),
                               np.asarray(project_portable(inputs, weight, None, jnp.float32)), rtol=1e-5, atol=1e-5,
                               err_msg=f"{rows} rows: the CPU LM head product differs from x @ W.T")


def test_portable_float32_products_run_at_highest_precision_unless_the_user_chooses():
    """fp32 parity needs true float32 products on TPU/GPU; `jax.default_matmul_precision` is the
    documented fast setting and then applies."""
    inputs, weight = jnp.ones((2, 8)), jnp.ones((4, 8))

    def jaxpr():
        return str(jax.make_jaxpr(lambda x, w: project_portable(x, w, None, jnp.float32))(inputs, weight))

    assert "HIGHEST" in jaxpr(), "float32 products without an explicit precision"
    with jax.default_matmul_precision("tensorfloat32"):
        assert "HIGHEST" not in jaxpr(), "the user's matmul precision was overridden"
    bf16 = str(jax.make_jaxpr(lambda x, w: project_portable(x, w, None, jnp.bfloat16))(inputs, weight))
    assert "HIGHEST" not in bf16, "bfloat16 products forced to HIGHEST"


def test_portable_float32_product_sums_in_blocks_on_cpu_only_and_more_accurately():
    # On a CPU the portable product sums its contraction in ACCUMULATION_BLOCKS blocks (XLA's CPU
    # kernels accumulate long runs sequentially); other platforms get one product.
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((64, 1024)).astype(np.float32)
    weight = (0.05 * rng.standard_normal((256, 1024))).astype(np.float32)
    exact = inputs.astype(np.float64) @ weight.T.astype(np.float64)

    def run(x, w):
        return project_portable(x, w, None, jnp.float32)

    blocked = np.asarray(jax.jit(run)(inputs, weight))
    single = np.asarray(jax.jit(lambda x, w: x @ w.T)(inputs, weight))
    blocked_error, single_error = np.abs(blocked - exact).mean(), np.abs(single - exact).mean()
    assert blocked_error < single_error, (
        f"blocked sums: mean error {blocked_error:.3g} against float64, one product {single_error:.3g}")
    texts = {platform: jax.export.export(jax.jit(run), platforms=[platform])(inputs, weight).mlir_module()
             for platform in ("cpu", "cuda", "tpu")}
    counts = {platform: text.count("stablehlo.dot_general") for platform, text in texts.items()}
    assert counts == {"cpu": ACCUMULATION_BLOCKS, "cuda": 1, "tpu": 1}, f"dot_general ops by platform: {counts}"


@pytest.mark.parametrize("product", ["project", "vocabulary"])
def test_single_bfloat16_row_takes_the_bfloat16_matmul_with_the_portable_values(product):
    # One bfloat16 row is multiplied as two (a zero row added): XLA's CPU backend would otherwise
    # convert the whole weight to float32 for a matrix-vector product.
    rng = np.random.default_rng(3)
    rows = jnp.asarray(rng.standard_normal((1, 1, 64)), jnp.bfloat16)
    weight = jnp.asarray(rng.standard_normal((512, 64)), jnp.bfloat16)

    def cpu(x, w):
        return project_cpu(x, w, None, jnp.bfloat16) if product == "project" else vocabulary_cpu(x, w, jnp.bfloat16)

    expected = np.asarray(project_portable(rows, weight, None, jnp.bfloat16))
    output = np.asarray(jax.jit(cpu)(rows, weight))
    assert output.shape == (1, 1, 512), f"shape {output.shape}"
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5, err_msg="one bfloat16 row differs from portable")
    text = jax.jit(cpu).lower(rows, weight).compile().as_text()
    converted = [line.strip()[:120] for line in text.splitlines() if "f32[512,64]" in line and "convert(" in line]
    assert not converted, f"the weight is converted to float32: {converted}"


@pytest.mark.parametrize("product", ["project", "vocabulary"])
def test_single_row_times_an_int8_weight_converts_no_weight(product):
    from bart_jax.model.kernels import quantized_linear

    rng = np.random.default_rng(4)
    weight = quantized_linear.quantize_weight(jnp.asarray(rng.standard_normal((512, 64)), jnp.float32))
    rows = jnp.asarray(rng.standard_normal((1, 64)), jnp.float32)

    def cpu(x, w):
        if product == "project":
            return quantized_linear.project_cpu(x, w, None, jnp.float32)
        return vocabulary_product(x, w, jnp.float32, "cpu")

    expected = np.asarray(quantized_linear.project_portable(rows, weight, None, jnp.float32))
    np.testing.assert_allclose(np.asarray(jax.jit(cpu)(rows, weight)), expected, rtol=1e-5, atol=1e-4,
                               err_msg="one row times an int8 weight differs from portable")
    text = jax.jit(cpu).lower(rows, weight).compile().as_text()
    converted = [line.strip()[:120] for line in text.splitlines() if "[512,64]" in line and "convert(" in line]
    assert not converted, f"the int8 weight is converted: {converted}"
