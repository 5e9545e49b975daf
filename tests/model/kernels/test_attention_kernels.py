"""Attention: the CPU formulations do the portable math, and the two agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax.model.attention import BartAttention
from bart_jax.model.kernels import attention as kernels_attention
from bart_jax.model.kernels.attention import (attend, attend_cpu, attend_fused, attend_per_example, attend_portable,
                                              attend_transposed, attends_per_example, weigh_values)


@pytest.mark.parametrize("queries", [1, 2, 5])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weigh_values_is_softmax_times_values(queries, dtype):
    """One query per (batch, head) — a greedy decoding step — included: there the product runs
    with a padded second row, in float32 whatever the values' dtype (so as exact as float32)."""
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
    tolerance = 1e-5 if dtype == "float32" or queries == 1 else 3e-2
    np.testing.assert_allclose(np.asarray(output), expected, atol=tolerance, rtol=tolerance,
                               err_msg=f"{queries} queries, {dtype}")
    np.testing.assert_allclose(np.asarray(weights), expected_weights, atol=1e-6)


@pytest.mark.parametrize("mask_shape", [None, (3, 1, 1, 70), (1, 1, 70, 70), (3, 1, 70, 70)])
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_per_example_attention_equals_whole_batch(mask_shape, rate):
    rng = np.random.default_rng(5)
    query, value = (jnp.asarray(rng.standard_normal((3, 2, 70, 8)), jnp.float32) for _ in range(2))
    key = jnp.asarray(rng.standard_normal((3, 2, 8, 70)), jnp.float32)
    mask = None if mask_shape is None else jnp.asarray(rng.random(mask_shape) > 0.3)
    dropout_rng = jax.random.PRNGKey(3) if rate else None
    ours = attend_per_example(query, key, value, mask, jnp.float32, rate, dropout_rng)
    for index in range(3):
        one_mask = None if mask is None else mask[index:index + 1] if mask.shape[0] == 3 else mask
        example_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        expected, _ = attend_transposed(query[index:index + 1], key[index:index + 1], value[index:index + 1],
                                        one_mask, jnp.float32, rate, example_rng)
        np.testing.assert_allclose(np.asarray(ours[index]), np.asarray(expected[0]), atol=1e-5,
                                   err_msg=f"example {index} differs from attending it alone")
    if rate == 0.0:
        whole, _ = attend_transposed(query, key, value, mask, jnp.float32)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(whole), atol=1e-5,
                                   err_msg="per-example attention differs from whole-batch attention")


@pytest.mark.parametrize("queries, keys", [(1, 9), (5, 9), (300, 260)])  # 300: the CPU kernel's per-example path
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_cpu_attention_equals_its_portable_twin(queries, keys, dtype, rate):
    rng = np.random.default_rng(queries)
    query = jnp.asarray(rng.standard_normal((2, queries, 3, 8)), dtype)
    key, value = (jnp.asarray(rng.standard_normal((2, keys, 3, 8)), dtype) for _ in range(2))
    mask = jnp.asarray(rng.random((2, 1, queries, keys)) > 0.2)
    mask = mask.at[0, 0, 0].set(False)  # a fully masked row stays finite in both
    per_example = attends_per_example(2, queries)
    dropout_rng = None if rate == 0.0 or per_example else jax.random.PRNGKey(1)  # per-example folds its own keys
    cpu = attend_cpu(query, key, value, mask, jnp.dtype(dtype), rate, dropout_rng)
    portable = attend_portable(query, key, value, mask, jnp.dtype(dtype), rate, dropout_rng)
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    for name, ours, twin in zip(("output", "weights"), cpu, portable):
        assert ours.shape == twin.shape and ours.dtype == twin.dtype == jnp.float32, (name, ours.shape, twin.shape)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(twin), atol=tolerance, rtol=tolerance,
                                   err_msg=f"{name}: CPU attention differs from the portable one "
                                           f"({queries} queries, {dtype}, dropout {rate})")


def test_auto_attention_lowers_to_each_platforms_kernel():
    """"auto" keeps the CPU kernel when lowering for the CPU, the portable one for a TPU."""
    shape = jax.ShapeDtypeStruct((2, 300, 2, 8), jnp.float32)

    def run(query, key, value):
        return attend(query, key, value, None, jnp.float32, kernels="auto")

    cpu_text = jax.jit(run).lower(shape, shape, shape).as_text()
    tpu_text = jax.export.export(jax.jit(run), platforms=["tpu"])(shape, shape, shape).mlir_module()
    # The CPU kernel attends 300 queries example by example, in a loop; the portable one does not.
    assert "stablehlo.while" in cpu_text, "lowering for the CPU did not keep the CPU kernel"
    assert "stablehlo.while" not in tpu_text, "lowering for a TPU kept the CPU kernel"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mask_shape", [None, (2, 1, 1, 9), (2, 1, 5, 9)])
def test_fused_attention_equals_the_portable_one(dtype, mask_shape):
    """jax.nn.dot_product_attention (cuDNN's fused attention on GPU) gives the portable output."""
    rng = np.random.default_rng(7)
    query = jnp.asarray(rng.standard_normal((2, 5, 3, 8)) * 0.35, dtype)
    key, value = (jnp.asarray(rng.standard_normal((2, 9, 3, 8)), dtype) for _ in range(2))
    mask = None if mask_shape is None else jnp.asarray(rng.random(mask_shape) > 0.3).at[..., 0].set(True)
    fused = attend_fused(query, key, value, mask, jnp.dtype(dtype))
    portable, _ = attend_portable(query, key, value, mask, jnp.dtype(dtype))
    tolerance = 1e-6 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(fused), np.asarray(portable), atol=tolerance, rtol=tolerance,
                               err_msg=f"fused attention differs from the portable one ({dtype}, mask {mask_shape})")


@pytest.mark.parametrize("case", ["plain", "weights", "dropout", "head_mask"])
def test_portable_attention_takes_the_fused_kernel_unless_probabilities_are_needed(monkeypatch, case):
    """Returned weights (output_attentions) and attention dropout need the probabilities: those
    calls fall back to the einsum attention; a head mask scales outputs and stays fused."""
    calls = []
    original = kernels_attention.attend_fused
    monkeypatch.setattr(kernels_attention, "attend_fused", lambda *args: calls.append(1) or original(*args))
    module = BartAttention(embed_dim=16, num_heads=4, dropout=0.5 if case == "dropout" else 0.0, kernels="portable")
    hidden = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 16)), jnp.float32)
    params = module.init(jax.random.PRNGKey(0), hidden)
    head_mask = jnp.asarray([1.0, 0.0, 1.0, 0.5]) if case == "head_mask" else None
    output, weights, _ = module.apply(params, hidden, layer_head_mask=head_mask, deterministic=case != "dropout",
                                      need_weights=case == "weights", rngs={"dropout": jax.random.PRNGKey(1)})
    assert bool(calls) == (case in ("plain", "head_mask")), f"{case}: fused kernel used: {bool(calls)}"
    assert (weights is not None) == (case == "weights"), f"{case}: weights returned: {weights is not None}"
    if case in ("plain", "head_mask"):
        expected, _, _ = module.apply(params, hidden, layer_head_mask=head_mask, need_weights=True)
        np.testing.assert_allclose(np.asarray(output), np.asarray(expected), atol=1e-6,
                                   err_msg=f"{case}: the fused path differs from the einsum path")


def _dot_operand_dtypes(jaxpr) -> list[tuple]:
    """The operand dtypes of every dot_general in `jaxpr` and the jaxprs nested in it."""
    found = []
    for equation in jaxpr.eqns:
        if equation.primitive.name == "dot_general":
            found.append(tuple(str(var.aval.dtype) for var in equation.invars))
        for sub in jax.core.subjaxprs(equation) if hasattr(jax.core, "subjaxprs") else []:
            found += _dot_operand_dtypes(sub)
        for value in equation.params.values():
            for candidate in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(candidate, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    found += _dot_operand_dtypes(inner)
                elif hasattr(candidate, "eqns"):
                    found += _dot_operand_dtypes(candidate)
    return found


@pytest.mark.parametrize("implementation", ["cpu", "portable"])
def test_bfloat16_attention_backward_products_stay_bfloat16(implementation):
    """In mixed-precision training every product of attention's backward pass multiplies
    bfloat16 operands (accumulating in float32), as the linear layers' do; the gradients stay
    close to float32 ones."""
    rng = np.random.default_rng(3)
    query, key, value = (jnp.asarray(rng.standard_normal((2, 7, 3, 8)) * 0.5, jnp.float32) for _ in range(3))
    attend_with = attend_cpu if implementation == "cpu" else attend_portable

    def loss(query, key, value, dtype):
        output, _ = attend_with(query.astype(dtype), key.astype(dtype), value.astype(dtype), None, dtype)
        return jnp.sum(jnp.sin(output))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    jaxpr = jax.make_jaxpr(lambda q, k, v: grad(q, k, v, jnp.dtype(jnp.bfloat16)))(query, key, value)
    operands = _dot_operand_dtypes(jaxpr.jaxpr)
    assert len(operands) >= 6, f"expected the forward and backward products, found {operands}"
    assert all(dtypes == ("bfloat16", "bfloat16") for dtypes in operands), (
        f"a product of the bfloat16 forward or backward pass has a float32 operand: {operands}")
    for name, ours, reference in zip(("query", "key", "value"), grad(query, key, value, jnp.dtype(jnp.bfloat16)),
                                     grad(query, key, value, jnp.dtype(jnp.float32))):
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(reference), atol=0.05,
                                   err_msg=f"d {name}: bfloat16 gradient far from the float32 one")
