"""The embedding lookups of bart_jax/model/kernels/embedding.py: the CPU formulation (16-bit tables
gathered as bits) against its portable twin, values and gradients, and the whole-table conversion
it avoids in a compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax.model.kernels.embedding import lookup, lookup_cpu, lookup_portable


@pytest.mark.parametrize("table_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_lookup_equals_portable_values_and_gradients(table_dtype, dtype):
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((50, 8)), table_dtype)
    ids = jnp.asarray(rng.integers(0, 50, (3, 7)), jnp.int32).at[0, :3].set(5)  # a row looked up thrice

    cpu, portable = lookup_cpu(table, ids, dtype), lookup_portable(table, ids, dtype)
    assert cpu.dtype == portable.dtype == jnp.dtype(dtype), f"dtypes {cpu.dtype} and {portable.dtype}"
    assert np.array_equal(np.asarray(cpu, np.float32), np.asarray(portable, np.float32)), "gathered rows differ"

    weights = jnp.asarray(rng.standard_normal((3, 7, 8)), jnp.float32)

    def loss(kernel):
        return lambda t: jnp.sum(kernel(t, ids, dtype).astype(jnp.float32) * weights)

    cpu_gradient = jax.grad(loss(lookup_cpu))(table)
    portable_gradient = jax.grad(loss(lookup_portable))(table)
    assert cpu_gradient.dtype == table.dtype, f"gradient dtype {cpu_gradient.dtype}, table {table.dtype}"
    np.testing.assert_allclose(np.asarray(cpu_gradient, np.float32), np.asarray(portable_gradient, np.float32),
                               rtol=1e-2 if table_dtype != jnp.float32 else 1e-6, atol=1e-2 if table_dtype != jnp.float32 else 1e-6,
                               err_msg="table gradients differ")


def test_cpu_lookup_of_a_bfloat16_table_converts_no_table():
    # The portable gather of a bfloat16 table becomes, on XLA's CPU backend, a gather from a
    # float32 copy of the whole table; the CPU formulation gathers the bits.
    table = jnp.zeros((1000, 16), jnp.bfloat16)
    ids = jnp.zeros((2, 3), jnp.int32)

    def converted_shapes(kernels):
        text = jax.jit(lambda t, i: lookup(t, i, jnp.bfloat16, kernels)).lower(table, ids).compile().as_text()
        return [line.strip()[:120] for line in text.splitlines() if "f32[1000,16]" in line and "convert(" in line]

    assert converted_shapes("cpu") == [], f"the CPU lookup converts the table: {converted_shapes('cpu')}"


@pytest.mark.parametrize("kernels", ["cpu", "portable"])
def test_int8_table_rows_equal_the_dequantized_table_rows_without_a_float_table(kernels):
    from bart_jax.model.kernels.quantized_linear import quantize_weight

    rng = np.random.default_rng(1)
    table = quantize_weight(jnp.asarray(rng.standard_normal((1000, 16)), jnp.float32))
    ids = jnp.asarray(rng.integers(0, 1000, (2, 5)), jnp.int32)
    rows = lookup(table, ids, jnp.float32, kernels)
    expected = np.asarray(table.__jax_array__())[np.asarray(ids)]
    assert np.array_equal(np.asarray(rows), expected), "int8 rows differ from the dequantized table's"
    text = jax.jit(lambda t, i: lookup(t, i, jnp.float32, kernels)).lower(table, ids).compile().as_text()
    floats = [line.strip()[:120] for line in text.splitlines() if "f32[1000,16]" in line]
    assert not floats, f"a float32 copy of the int8 table is made: {floats}"
