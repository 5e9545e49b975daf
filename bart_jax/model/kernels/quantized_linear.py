"""Products with int8 weights: inputs [..., in] @ weight [out, in].T where the weight is a
`QuantizedWeight`, int8 values with a float32 scale per output row (a qwix `QArray`).

Two ways to multiply, named by the weight's static `activations` field:

    "int8"   the inputs are quantized too, each row to int8 with its own scale (dynamic
             quantization); the int8 x int8 product accumulates in int32 and both scales are
             applied to the result. Fast where the backend has int8 units: XLA's CPU backend
             (AVX512-VNNI), TPU's MXU, GPU tensor cores.
    "float"  weight-only: the int8 values are dequantized inside the product and multiplied by
             inputs in the compute dtype. On TPU and GPU XLA fuses the conversion into the
             matmul; XLA's CPU backend converts the whole weight first (docs/cpu-kernels.md).

Portable: `qwix.dot_general`, which takes `QArray` operands, one product over the inputs' leading
axes. CPU: the product made 2-D (as every CPU product is) and a single row multiplied as two
(`with_second_row`: for one row XLA's CPU backend converts the int8 weight to int32 before the
decoding loop); on CPUs with AVX512-VNNI the int8 x int8 product runs as uint8 x int8
(kernels/uint8_dot.py: 1.2-2.4x faster, the same int32 values) and the scales are applied as qwix
applies them, so the results equal the portable ones.

A `QuantizedWeight` converts to its dequantized float32 value wherever plain JAX code reads it as
an array (`__jax_array__`); the token embedding lookup (kernels/embedding.py) gathers int8 rows
and scales instead, so that only the looked-up rows are dequantized.
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import qwix

from bart_jax.model.kernels import dispatch, float32_precision, with_second_row
from bart_jax.model.kernels.uint8_dot import host_has_int8_units, signed_matmul

Dtype = Any

ACTIVATIONS = ("int8", "float")


@flax.struct.dataclass
class QuantizedWeight:
    """A weight [out, in] as int8 values `array.qvalue` [out, in] and float32 scales
    `array.scale` [out, 1] (a qwix `QArray`, symmetric per output channel); `activations`
    ("int8" or "float", static) says how products with it run."""

    array: qwix.QArray
    activations: str = flax.struct.field(pytree_node=False, default="int8")

    shape = property(lambda self: self.array.qvalue.shape)
    ndim = property(lambda self: self.array.qvalue.ndim)
    dtype = property(lambda self: self.array.scale.dtype)

    def __jax_array__(self) -> jax.Array:
        return qwix.dequantize(self.array)


def quantize_weight(weight: jax.Array, activations: str = "int8") -> QuantizedWeight:
    """weight [out, in] (float) -> `QuantizedWeight`: int8 values, one float32 absmax scale per
    output row (row r is stored as round(weight[r] / scale[r]), scale[r] = max|weight[r]| / 127)."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if jnp.ndim(weight) != 2:
        raise ValueError(f"quantize_weight takes a 2-D [out, in] weight, got shape {jnp.shape(weight)}")
    array = qwix.quantize(jnp.asarray(weight, jnp.float32), jnp.int8, channelwise_axes=[0], scale_dtype=jnp.float32)
    return QuantizedWeight(array, activations)


def from_values(qvalue: jax.Array, scale: jax.Array, activations: str = "int8") -> QuantizedWeight:
    """The `QuantizedWeight` of stored int8 values [..., out, in] and scales [..., out, 1]."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    return QuantizedWeight(qwix.QArray(qvalue, scale, qtype=jnp.int8), activations)


def _contract_last(lhs_ndim: int) -> tuple:
    return ((lhs_ndim - 1,), (1,)), ((), ())


def _quantized_rows(inputs: jax.Array) -> qwix.QArray:
    """inputs [..., in] as int8 with one float32 scale per row [..., 1] (dynamic, absmax)."""
    return qwix.quantize(inputs, jnp.int8, channelwise_axes=range(inputs.ndim - 1), scale_dtype=jnp.float32)


def _rows_by_weight(inputs: jax.Array, weight: QuantizedWeight, dtype: Dtype) -> jax.Array:
    """inputs [..., in] @ weight [out, in].T as the weight's `activations` say: float32 [..., out]."""
    if weight.activations == "int8":
        return qwix.dot_general(_quantized_rows(inputs), weight.array, _contract_last(inputs.ndim),
                                preferred_element_type=jnp.float32)
    # Weight-only: qwix dequantizes the weight to the scales' dtype inside the product.
    rows = inputs.astype(dtype)
    array = weight.array.astype(dtype)
    precision = float32_precision() if jnp.dtype(dtype).itemsize >= 4 else None
    return qwix.dot_general(rows, array, _contract_last(rows.ndim), precision=precision,
                            preferred_element_type=jnp.float32).astype(jnp.float32)


def _plus_bias(outputs: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    return outputs if bias is None else outputs + bias.astype(jnp.float32)


# --- portable -------------------------------------------------------------------------------
def project_portable(inputs: jax.Array, weight: QuantizedWeight, bias: Optional[jax.Array],
                     dtype: Dtype) -> jax.Array:
    """inputs [..., in] @ weight [out, in].T (+ bias [out]): float32 [..., out]."""
    return _plus_bias(_rows_by_weight(inputs, weight, dtype), bias)


# --- CPU ------------------------------------------------------------------------------------
def _rows_by_int8_weight_cpu(rows: jax.Array, weight: QuantizedWeight) -> jax.Array:
    """rows [n, in] @ weight [out, in].T with int8 activations: float32 [n, out], equal to
    `_rows_by_weight`'s. The int32 product runs as uint8 x int8 where the host has the units for
    it; the scales are applied in qwix's order (row scales, then the weight's)."""
    if not host_has_int8_units():
        return _rows_by_weight(rows, weight, jnp.float32)
    quantized = _quantized_rows(rows)
    products = signed_matmul(quantized.qvalue, weight.array.qvalue)
    return ((products * quantized.scale) * weight.array.scale.T).astype(jnp.float32)


def project_cpu(inputs: jax.Array, weight: QuantizedWeight, bias: Optional[jax.Array], dtype: Dtype) -> jax.Array:
    """`project_portable` made 2-D: XLA's CPU backend multiplies a transposed copy of the weight
    when the inputs have more than two dimensions. Rows-first at every row count: the LM head's
    decoding steps too (the weight-first product that helps float weights, kernels/linear.py,
    is slower here)."""
    if weight.activations == "int8":
        product = _rows_by_int8_weight_cpu
    else:
        product = lambda x, w: _rows_by_weight(x, w, dtype)  # noqa: E731
    rows = inputs.reshape(-1, inputs.shape[-1])
    outputs = _plus_bias(with_second_row(product, rows, weight), bias)
    return outputs.reshape(inputs.shape[:-1] + weight.shape[:1])


# --- the seam -------------------------------------------------------------------------------
def project(inputs: jax.Array, weight: QuantizedWeight, bias: Optional[jax.Array], dtype: Dtype,
            kernels: str = "auto") -> jax.Array:
    """inputs [..., in] @ weight [out, in].T (+ bias [out]) with an int8 weight: float32 [..., out]."""
    if bias is None:
        return dispatch(kernels, lambda x, w: project_cpu(x, w, None, dtype),
                        lambda x, w: project_portable(x, w, None, dtype), inputs, weight)
    return dispatch(kernels, lambda x, w, b: project_cpu(x, w, b, dtype),
                    lambda x, w, b: project_portable(x, w, b, dtype), inputs, weight, bias)

