"""The linear layer of every BART projection, with PyTorch's weight layout.

`Linear` keeps `weight` [out_features, in_features], as `torch.nn.Linear` does, and `bias`
[out_features]. Checkpoints then convert by name alone, and XLA's CPU matmuls read a weight in
this layout faster than Flax's [in, out] kernel when few rows multiply it, as in every decoding
step (bart-base's fc1 with 32 rows: 0.8 ms against 1.4 ms; equal with 4096 rows).

Products accumulate in float32 whatever the compute dtype: more accurate in bfloat16, and
faster too, since XLA's CPU backend runs bf16 x bf16 -> f32 products on the processor's bf16
matrix units where it has them (AMX, AVX512-BF16; about 3x fp32 here) but computes a
bf16 -> bf16 product in fp32 after converting both operands.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bart_jax.parameters import checked_param

Dtype = Any

# Up to this many rows (batch x beams x tokens), `vocabulary_product` multiplies weight-first.
FEW_ROWS = 256
# Up to this many rows, float32 products with a bias multiply weight-first (see `_weight_by_rows_plus_bias`).
WEIGHT_FIRST_ROWS = 128


def _rows_by_weight(rows: jax.Array, weight: jax.Array) -> jax.Array:
    """rows [n, in] @ weight [out, in].T -> float32 [n, out]."""
    return lax.dot_general(rows, weight, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def low_precision_product(rows: jax.Array, weight: jax.Array) -> jax.Array:
    """`_rows_by_weight` of bfloat16/float16 operands whose backward products are low precision too.

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
    rows_gradient = lax.dot_general(gradient, weight, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    weight_gradient = lax.dot_general(gradient, rows, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return rows_gradient.astype(rows.dtype), weight_gradient.astype(weight.dtype)


low_precision_product.defvjp(_low_precision_product_forward, _low_precision_product_backward)


def dot_transposed(inputs: jax.Array, weight: jax.Array, dtype: Dtype, bias: jax.Array | None = None) -> jax.Array:
    """inputs [..., in] @ weight [out, in].T (+ bias [out]) with operands in `dtype`: float32 [..., out]."""
    # A 2-D product: with more input dimensions, XLA's CPU backend rewrites the product around a
    # transposed copy of the weight, which it then reads 1.6x slower (bfloat16, 32 rows).
    rows = inputs.reshape(-1, inputs.shape[-1]).astype(dtype)
    weight = weight.astype(dtype)
    full_precision = jnp.dtype(dtype).itemsize >= 4
    if full_precision and bias is not None and rows.shape[0] <= WEIGHT_FIRST_ROWS:
        outputs = _weight_by_rows_plus_bias(rows, weight, bias)
    else:
        outputs = (_rows_by_weight if full_precision else low_precision_product)(rows, weight)
        if bias is not None:
            outputs = outputs + bias.astype(jnp.float32)
    return outputs.reshape(inputs.shape[:-1] + weight.shape[:1])


def _weight_by_rows_plus_bias(rows: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    """float32 rows [n, in] @ weight [out, in].T + bias as (weight @ rows.T + bias).T: [n, out].

    XLA's CPU matmul reads a float32 weight about twice as fast when the weight's rows are the
    product's long side and the few input rows its short side (bart-base's fc1 + fc2 with 8 rows:
    5.6 ms against 11.4 ms for six layers; 1.5x with 32 rows, 1.2x with 128, slower from ~192;
    bfloat16 products are 3-5x slower that way). The bias is added before transposing back because XLA
    folds a transpose that directly follows the product into the product, undoing the order.
    """
    outputs = lax.dot_general(weight, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (outputs + bias.astype(jnp.float32)[:, None]).T


def vocabulary_product(inputs: jax.Array, weight: jax.Array, dtype: Dtype) -> jax.Array:
    """The LM head's `dot_transposed(inputs, weight, dtype)`: inputs [..., in], weight [vocab, in]
    -> float32 [..., vocab].

    For few rows (decoding steps) it runs as weight @ inputs.T, then transposed: as inputs @
    weight.T, XLA's CPU backend fuses the product with the reductions of the log-softmax that
    follows, and runs that fusion about 2x slower (32 rows of bart-base in bf16: 8.8 ms against
    3.7 ms, plus 3 ms to transpose). With many rows (training) the transpose would cost more
    than it saves.
    """
    if math.prod(inputs.shape[:-1]) > FEW_ROWS:
        return dot_transposed(inputs, weight, dtype)
    outputs = lax.dot_general(weight.astype(dtype), inputs.astype(dtype), (((1,), (inputs.ndim - 1,)), ((), ())),
                              preferred_element_type=jnp.float32)
    return jnp.moveaxis(outputs, 0, -1)


class Linear(nn.Module):
    """y = x @ weight.T + bias. x: [..., in_features] -> [..., features]."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    weight_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        weight = checked_param(self, "weight", self.weight_init, (self.features, inputs.shape[-1]), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = checked_param(self, "bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        return self.multiply(inputs, weight, bias).astype(self.dtype)

    def multiply(self, inputs: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
        """float32 inputs @ weight.T (+ bias)."""
        return dot_transposed(inputs, weight, self.dtype, bias)


class VocabularyProjection(Linear):
    """An LM head with its own weight [vocab, in] (untied embeddings), multiplied as
    `vocabulary_product`; bias-free by default, as transformers' `lm_head`."""

    use_bias: bool = False

    def multiply(self, inputs: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
        logits = vocabulary_product(inputs, weight, self.dtype)
        return logits if bias is None else logits + bias.astype(jnp.float32)
