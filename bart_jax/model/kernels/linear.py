"""The products of BART's linear layers and LM head: inputs [..., in] @ weight [out, in].T, with
the weight in PyTorch's [out, in] layout, accumulated in float32 whatever the operands' dtype.

Portable: one `dot_general` contracting the last axes, float32 operands at full precision
(`bart_jax.model.kernels.float32_precision`: TPUs and recent GPUs would otherwise multiply
float32 in one bfloat16 pass or TF32, and the fp32 parity with transformers would not hold there).

CPU (docs/cpu-kernels.md): every product made 2-D, since with more input dimensions XLA's CPU
backend multiplies a transposed copy of the weight (1.6x slower in bf16, 32 rows); float32
products of up to `WEIGHT_FIRST_ROWS` rows multiplied weight-first, `weight @ rows.T`; the LM
head weight-first up to `FEW_ROWS` rows.

A weight stored as int8 (`QuantizedWeight`, `load_pretrained(..., quantize=...)`) is multiplied
by the quantized twins of kernels/quantized_linear.py.

Both share `low_precision_product` for bfloat16/float16 operands: the backward products in the
operands' dtype, as mixed-precision training does, and as fast accelerators need too.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from bart_jax.model.kernels import dispatch, float32_precision, quantized_linear, with_second_row

Dtype = Any

# Up to this many rows (batch x beams x tokens: the decoding steps) the CPU LM head multiplies
# weight-first.
FEW_ROWS = 256
# Up to this many rows, CPU float32 products with a bias multiply weight-first.
WEIGHT_FIRST_ROWS = 128
# The portable float32 product on a CPU sums contractions of at least MIN_BLOCKED_SIZE terms in
# this many blocks (`_rows_by_weight_in_blocks`).
ACCUMULATION_BLOCKS = 4
MIN_BLOCKED_SIZE = 128


def full_precision(dtype: Dtype) -> bool:
    """Whether operands of `dtype` multiply at float32 precision or above."""
    return jnp.dtype(dtype).itemsize >= 4


def _precision(dtype: Dtype) -> Optional[lax.Precision]:
    return float32_precision() if full_precision(dtype) else None


def _rows_by_weight(rows: jax.Array, weight: jax.Array) -> jax.Array:
    """rows [..., in] @ weight [out, in].T -> float32 [..., out]."""
    return lax.dot_general(rows, weight, (((rows.ndim - 1,), (1,)), ((), ())), precision=_precision(rows.dtype),
                           preferred_element_type=jnp.float32)


@jax.custom_vjp
def low_precision_product(rows: jax.Array, weight: jax.Array) -> jax.Array:
    """`rows [..., in] @ weight [out, in].T` (float32 [..., out]) of bfloat16/float16 operands
    whose backward products are low precision too.

    JAX's own derivative multiplies the float32 output gradient by a low-precision operand, a
    float32 product (both operands converted): the backward pass would run at float32 speed.
    Here the output gradient is rounded to the operands' dtype first, as mixed-precision training
    does, and both backward products accumulate in float32.
    """
    return _rows_by_weight(rows, weight)


def _low_precision_product_forward(rows, weight):
    return _rows_by_weight(rows, weight), (rows, weight)


def _low_precision_product_backward(residuals, output_gradient):
    rows, weight = residuals
    gradient = output_gradient.astype(rows.dtype)
    batch_axes = tuple(range(rows.ndim - 1))
    rows_gradient = lax.dot_general(gradient, weight, (((rows.ndim - 1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
    weight_gradient = lax.dot_general(gradient, rows, ((batch_axes, batch_axes), ((), ())),
                                      preferred_element_type=jnp.float32)
    return rows_gradient.astype(rows.dtype), weight_gradient.astype(weight.dtype)


low_precision_product.defvjp(_low_precision_product_forward, _low_precision_product_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def low_precision_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, a, b)` of bfloat16/float16 operands, accumulated in float32, whose backward
    products round the output gradient to the operands' dtype first, as `low_precision_product`
    does (attention's products in mixed-precision training). `spec` names two operands and every
    index of each operand also in the other or in the output, as attention's products do."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _low_precision_einsum_forward(spec, a, b):
    return low_precision_einsum(spec, a, b), (a, b)


def _low_precision_einsum_backward(spec, residuals, output_gradient):
    a, b = residuals
    operands, output = spec.split("->")
    a_indices, b_indices = operands.split(",")
    gradient = output_gradient.astype(a.dtype)
    # Results in the operands' dtype (accumulated in float32 by the backends' matmuls): XLA's CPU
    # runtime has no bfloat16 x bfloat16 -> float32 product for some of these operand orders.
    a_gradient = jnp.einsum(f"{output},{b_indices}->{a_indices}", gradient, b, preferred_element_type=a.dtype)
    b_gradient = jnp.einsum(f"{a_indices},{output}->{b_indices}", a, gradient, preferred_element_type=b.dtype)
    return a_gradient, b_gradient


low_precision_einsum.defvjp(_low_precision_einsum_forward, _low_precision_einsum_backward)


def einsum_product(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """A two-operand einsum accumulated in float32: float32 operands at full precision,
    bfloat16/float16 ones with low-precision backward products (`low_precision_einsum`)."""
    if full_precision(a.dtype):
        return jnp.einsum(spec, a, b, precision=_precision(a.dtype), preferred_element_type=jnp.float32)
    return low_precision_einsum(spec, a, b)


def _product(rows: jax.Array, weight: jax.Array) -> jax.Array:
    return (_rows_by_weight if full_precision(rows.dtype) else low_precision_product)(rows, weight)


def _rows_by_weight_in_blocks(rows: jax.Array, weight: jax.Array) -> jax.Array:
    """`_rows_by_weight` with the contraction summed in `ACCUMULATION_BLOCKS` blocks, each its
    own product, the partial products added: float32 [..., out].

    XLA's CPU kernels accumulate a product's terms in long sequential runs, with 1.3-1.6x the
    rounding error of PyTorch's (docs/parity.md); four shorter runs bring the portable model below
    transformers' error against float64. 1.1-1.4x the time of one product with hundreds of rows,
    up to 4x with a few rows; only the portable path on a CPU pays it."""
    size = rows.shape[-1]
    if size < MIN_BLOCKED_SIZE or size % ACCUMULATION_BLOCKS:
        return _rows_by_weight(rows, weight)
    block = size // ACCUMULATION_BLOCKS
    partial_products = [_rows_by_weight(lax.slice_in_dim(rows, start, start + block, axis=rows.ndim - 1),
                                        lax.slice_in_dim(weight, start, start + block, axis=1))
                        for start in range(0, size, block)]
    return functools.reduce(jnp.add, partial_products)


# --- portable -------------------------------------------------------------------------------
def project_portable(inputs: jax.Array, weight: jax.Array, bias: Optional[jax.Array], dtype: Dtype) -> jax.Array:
    """inputs [..., in] @ weight [out, in].T (+ bias [out]) with operands in `dtype`: float32 [..., out].

    float32 products compiled for a CPU sum their contraction in blocks (`_rows_by_weight_in_blocks`),
    for accuracy, not speed; other platforms multiply in one product."""
    rows, weight = inputs.astype(dtype), weight.astype(dtype)
    if full_precision(dtype):
        outputs = lax.platform_dependent(rows, weight, cpu=_rows_by_weight_in_blocks, default=_rows_by_weight)
    else:
        outputs = low_precision_product(rows, weight)
    return outputs if bias is None else outputs + bias.astype(jnp.float32)


# --- CPU ------------------------------------------------------------------------------------
def project_cpu(inputs: jax.Array, weight: jax.Array, bias: Optional[jax.Array], dtype: Dtype) -> jax.Array:
    """`project_portable` as XLA's CPU backend runs it fastest: 2-D, and weight-first for few
    float32 rows with a bias."""
    rows = inputs.reshape(-1, inputs.shape[-1]).astype(dtype)
    weight = weight.astype(dtype)
    if full_precision(dtype) and bias is not None and rows.shape[0] <= WEIGHT_FIRST_ROWS:
        outputs = _weight_by_rows_plus_bias(rows, weight, bias)
    else:
        outputs = _low_precision_single_row_padded(_product, rows, weight)
        if bias is not None:
            outputs = outputs + bias.astype(jnp.float32)
    return outputs.reshape(inputs.shape[:-1] + weight.shape[:1])


def _low_precision_single_row_padded(product, rows: jax.Array, weight: jax.Array) -> jax.Array:
    """`product(rows, weight)` of rows [n, in]; a single bfloat16/float16 row multiplied as two
    (`with_second_row`: XLA's CPU backend would convert every decoder weight to float32 before
    the decoding loop, in every call; bart-base greedy search at batch 1: about 0.2 s a call)."""
    if full_precision(rows.dtype):
        return product(rows, weight)
    return with_second_row(product, rows, weight)


def _weight_by_rows_plus_bias(rows: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    """float32 rows [n, in] @ weight [out, in].T + bias as (weight @ rows.T + bias).T: [n, out].

    XLA's CPU matmul reads a float32 weight about twice as fast when the weight's rows are the
    product's long side and the few input rows its short side (bart-base's fc1 + fc2 with 8 rows:
    5.6 ms against 11.4 ms for six layers; 1.5x with 32 rows, 1.2x with 128, slower from ~192;
    bfloat16 products are 3-5x slower that way). The bias is added before transposing back
    because XLA folds a transpose that directly follows the product into the product, undoing the order.
    """
    outputs = lax.dot_general(weight, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (outputs + bias.astype(jnp.float32)[:, None]).T


def vocabulary_cpu(inputs: jax.Array, weight: jax.Array, dtype: Dtype) -> jax.Array:
    """The LM head's product on CPU: inputs [..., in], weight [vocab, in] -> float32 [..., vocab].

    For few rows (decoding steps) it runs as weight @ inputs.T, then transposed: as inputs @
    weight.T, XLA's CPU backend fuses the product with the reductions of the log-softmax that
    follows, and runs that fusion about 2x slower (32 rows of bart-base in bf16: 8.8 ms against
    3.7 ms, plus 3 ms to transpose). With many rows (training) the transpose would cost more
    than it saves.
    """
    if math.prod(inputs.shape[:-1]) > FEW_ROWS:
        return project_cpu(inputs, weight, None, dtype)
    rows = inputs.reshape(-1, inputs.shape[-1]).astype(dtype)
    outputs = _low_precision_single_row_padded(
        lambda rows, weight: lax.dot_general(weight, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).T,
        rows, weight.astype(dtype))
    return outputs.reshape(inputs.shape[:-1] + weight.shape[:1])


# --- the seam -------------------------------------------------------------------------------
def project(inputs: jax.Array, weight: jax.Array, bias: Optional[jax.Array], dtype: Dtype,
            kernels: str = "auto") -> jax.Array:
    """inputs [..., in] @ weight [out, in].T (+ bias [out]), operands in `dtype`: float32 [..., out]."""
    if isinstance(weight, quantized_linear.QuantizedWeight):
        return quantized_linear.project(inputs, weight, bias, dtype, kernels)
    if bias is None:
        return dispatch(kernels, lambda x, w: project_cpu(x, w, None, dtype),
                        lambda x, w: project_portable(x, w, None, dtype), inputs, weight)
    return dispatch(kernels, lambda x, w, b: project_cpu(x, w, b, dtype),
                    lambda x, w, b: project_portable(x, w, b, dtype), inputs, weight, bias)


def vocabulary_product(inputs: jax.Array, weight: jax.Array, dtype: Dtype, kernels: str = "auto") -> jax.Array:
    """The LM head's product: inputs [..., in] @ weight [vocab, in].T -> float32 [..., vocab]."""
    if isinstance(weight, quantized_linear.QuantizedWeight):
        return quantized_linear.project(inputs, weight, None, dtype, kernels)
    return dispatch(kernels, lambda x, w: vocabulary_cpu(x, w, dtype),
                    lambda x, w: project_portable(x, w, None, dtype), inputs, weight)
