"""uint8 x int8 -> int32 matrix products, as one StableHLO `dot_general` with mixed operand types.

`lax.dot_general` converts operands of different integer types to a common type (int32) before
multiplying, and an int32 product runs at a fraction of an int8 one. XLA itself multiplies
uint8 by int8 where the backend has units for it: its CPU backend hands the product to YNNPACK's
AVX512-VNNI / AMX kernels, which take an unsigned and a signed operand (`vpdpbusd`) and run
1.2-2.4x faster than its int8 x int8 kernels (docs/cpu-kernels.md). `uint8_int8_matmul` is a
primitive whose lowering emits that mixed-type `dot_general` directly.

The int8 x int8 products of kernels/quantized_linear.py use it on CPUs with those units: a signed
operand x in [-128, 127] is x + 128 in uint8, and

    x @ w.T = (x + 128) @ w.T - 128 * sum(w, axis=1),

exact in int32 arithmetic.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import batching, mlir

from bart_jax.model.kernels import with_second_row

uint8_int8_dot_p = Primitive("uint8_int8_dot")


def uint8_int8_matmul(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """lhs uint8 [m, k] @ rhs int8 [n, k].T -> int32 [m, n], exact (one mixed-type dot_general)."""
    if lhs.dtype != jnp.uint8 or rhs.dtype != jnp.int8:
        raise ValueError(f"uint8_int8_matmul takes uint8 and int8 operands, got {lhs.dtype} and {rhs.dtype}")
    if lhs.ndim != 2 or rhs.ndim != 2 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"uint8_int8_matmul takes [m, k] and [n, k] operands, got {lhs.shape} and {rhs.shape}")
    return uint8_int8_dot_p.bind(lhs, rhs)


def signed_matmul(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """lhs int8 [m, k] @ rhs int8 [n, k].T -> int32 [m, n] through `uint8_int8_matmul`: the
    same integers as `lax.dot_general(..., preferred_element_type=int32)`."""
    unsigned = (lhs.astype(jnp.int16) + 128).astype(jnp.uint8)
    # The sums by the same fast product with a row of ones: `jnp.sum(rhs, axis=1, dtype=int32)`
    # would convert the whole weight to int32 first, on every call.
    weight_sums = with_second_row(uint8_int8_matmul, jnp.ones((1, rhs.shape[1]), jnp.uint8), rhs)[0]
    return uint8_int8_matmul(unsigned, rhs) - 128 * weight_sums


@functools.cache
def host_has_int8_units() -> bool:
    """Whether this host's CPU has the unsigned x signed int8 units YNNPACK's fast kernels use
    (AVX512-VNNI, which AMX machines have too). Elsewhere YNNPACK multiplies uint8 x int8 with
    a portable loop, slower than its int8 x int8 kernels."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return "avx512_vnni" in line.split()
    except OSError:
        pass
    return False


def _abstract(lhs, rhs):
    return jax.core.ShapedArray((lhs.shape[0], rhs.shape[0]), jnp.int32)


def _lowering(ctx, lhs, rhs):
    numbers = stablehlo.DotDimensionNumbers.get(
        lhs_batching_dimensions=[], rhs_batching_dimensions=[],
        lhs_contracting_dimensions=[1], rhs_contracting_dimensions=[1])
    result_type = mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
    return [stablehlo.DotGeneralOp(result_type, lhs, rhs, numbers, precision_config=None).result]


def _batching(args, dims):
    lhs, rhs = args
    lhs_dim, rhs_dim = dims
    if rhs_dim is None:
        # Rows of every batch element multiply the same weight: one product over all rows.
        rows = jnp.moveaxis(lhs, lhs_dim, 0)
        outputs = uint8_int8_matmul(rows.reshape(-1, rows.shape[-1]), rhs)
        return outputs.reshape(rows.shape[:2] + (rhs.shape[0],)), 0
    # A batch of weights: the same integers by a batched int32 product.
    rhs = jnp.moveaxis(rhs, rhs_dim, 0)
    lhs = (jnp.broadcast_to(lhs, rhs.shape[:1] + lhs.shape) if lhs_dim is None
           else jnp.moveaxis(lhs, lhs_dim, 0))
    outputs = lax.dot_general(lhs.astype(jnp.int32), rhs.astype(jnp.int32), (((2,), (2,)), ((0,), (0,))),
                              preferred_element_type=jnp.int32)
    return outputs, 0


uint8_int8_dot_p.def_abstract_eval(_abstract)
# Eager calls run the lowering through jit (one compiled program per shape).
uint8_int8_dot_p.def_impl(jax.jit(uint8_int8_dot_p.bind))
mlir.register_lowering(uint8_int8_dot_p, _lowering)
batching.primitive_batchers[uint8_int8_dot_p] = _batching
