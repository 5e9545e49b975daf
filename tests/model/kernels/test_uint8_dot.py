"""The uint8 x int8 product (kernels/uint8_dot.py) and the CPU int8 products built on it
(kernels/quantized_linear.py): exact integers, the same floats as the portable twin, and a
mixed-type dot_general that reaches the compiler without a weight converted to int32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax.model.kernels import quantized_linear
from bart_jax.model.kernels.uint8_dot import signed_matmul, uint8_int8_matmul


def _int8(rng, shape):
    return rng.integers(-128, 128, shape).astype(np.int8)


def _exact(lhs, rhs, subscripts="mk,nk->mn"):
    return np.einsum(subscripts, lhs.astype(np.int64), rhs.astype(np.int64))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rows, size, columns", [(1, 8, 3), (5, 64, 7), (33, 4096, 16)])
def test_signed_product_is_exact(seed, rows, size, columns):
    rng = np.random.default_rng(seed)
    lhs, rhs = _int8(rng, (rows, size)), _int8(rng, (columns, size))
    if seed == 0:  # the extremes, where int16 sums would saturate and the +128 shift is largest
        lhs[:], rhs[:] = -128, -128
        rhs[0] = 127
    outputs = np.asarray(jax.jit(signed_matmul)(lhs, rhs))
    expected = _exact(lhs, rhs)
    assert outputs.dtype == np.int32
    assert np.array_equal(outputs, expected), f"{np.sum(outputs != expected)} of {expected.size} entries differ"


def test_unsigned_product_is_exact_eagerly_and_under_jit():
    rng = np.random.default_rng(5)
    lhs, rhs = rng.integers(0, 256, (6, 96)).astype(np.uint8), _int8(rng, (10, 96))
    expected = _exact(lhs, rhs)
    assert np.array_equal(np.asarray(uint8_int8_matmul(lhs, rhs)), expected)
    assert np.array_equal(np.asarray(jax.jit(uint8_int8_matmul)(lhs, rhs)), expected)


@pytest.mark.parametrize("in_axes, subscripts", [((0, None), "bmk,nk->bmn"), ((None, 0), "mk,bnk->bmn"),
                                                 ((0, 0), "bmk,bnk->bmn")])
def test_batched_products_are_exact(in_axes, subscripts):
    rng = np.random.default_rng(6)
    lhs = _int8(rng, (3, 5, 32) if in_axes[0] == 0 else (5, 32))
    rhs = _int8(rng, (3, 7, 32) if in_axes[1] == 0 else (7, 32))
    outputs = np.asarray(jax.jit(jax.vmap(signed_matmul, in_axes=in_axes))(lhs, rhs))
    assert np.array_equal(outputs, _exact(lhs, rhs, subscripts))


@pytest.mark.parametrize("lhs, rhs, message", [
    (np.zeros((2, 4), np.int8), np.zeros((3, 4), np.int8), "uint8 and int8"),
    (np.zeros((2, 4), np.uint8), np.zeros((3, 5), np.int8), r"\[m, k\] and \[n, k\]"),
    (np.zeros((1, 2, 4), np.uint8), np.zeros((3, 4), np.int8), r"\[m, k\] and \[n, k\]"),
])
def test_bad_operands_raise_value_error(lhs, rhs, message):
    with pytest.raises(ValueError, match=message):
        uint8_int8_matmul(lhs, rhs)


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_lowers_to_one_mixed_type_dot_general_for_every_platform(platform):
    lhs, rhs = np.zeros((4, 64), np.uint8), np.zeros((16, 64), np.int8)
    text = jax.export.export(jax.jit(uint8_int8_matmul), platforms=[platform])(lhs, rhs).mlir_module()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) == 1 and "ui8" in dots[0] and "xi8>" in dots[0], f"dot_general ops: {dots}"
    assert "stablehlo.convert" not in text, "an operand is converted before the product"


def test_cpu_compiler_multiplies_the_weight_as_stored():
    lhs, rhs = np.zeros((32, 64), np.int8), np.zeros((512, 64), np.int8)
    text = jax.jit(signed_matmul).lower(lhs, rhs).compile().as_text()
    converted = [line.strip()[:120] for line in text.splitlines() if "[512,64]" in line and "convert(" in line]
    assert not converted, f"the int8 weight is converted: {converted}"


@pytest.mark.parametrize("fast_units", [True, False])
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 20), (300,)])
def test_cpu_int8_product_equals_its_portable_twin(monkeypatch, fast_units, rows):
    # Bit-equal: the same int32 products, the scales applied in the same order.
    monkeypatch.setattr(quantized_linear, "host_has_int8_units", lambda: fast_units)
    rng = np.random.default_rng(7)
    inputs = jnp.asarray(rng.standard_normal((*rows, 96)), jnp.float32)
    weight = quantized_linear.quantize_weight(jnp.asarray(rng.standard_normal((40, 96)), jnp.float32))
    bias = jnp.asarray(rng.standard_normal(40), jnp.float32)
    cpu = np.asarray(jax.jit(lambda x, w, b: quantized_linear.project_cpu(x, w, b, jnp.float32))(inputs, weight, bias))
    portable = np.asarray(jax.jit(lambda x, w, b: quantized_linear.project_portable(x, w, b, jnp.float32))(
        inputs, weight, bias))
    assert cpu.shape == portable.shape == (*rows, 40)
    np.testing.assert_array_equal(cpu, portable, err_msg="the CPU int8 product differs from the portable one")
