"""The linear layer of every BART projection, with PyTorch's weight layout.

`Linear` keeps `weight` [out_features, in_features], as `torch.nn.Linear` does, and `bias`
[out_features]. Checkpoints then convert by name alone, and XLA's CPU matmuls read a weight in
this layout faster than Flax's [in, out] kernel when few rows multiply it, as in every decoding
step (bart-base's fc1 with 32 rows: 0.8 ms against 1.4 ms; equal with 4096 rows).

Products accumulate in float32 whatever the compute dtype: more accurate in bfloat16, and
faster too, since XLA's CPU backend runs bf16 x bf16 -> f32 products on the processor's bf16
matrix units where it has them (AMX, AVX512-BF16; about 3x fp32 here) but computes a
bf16 -> bf16 product in fp32 after converting both operands. How the product runs on each
backend is the kernel seam's choice (bart_jax/model/kernels/linear.py).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bart_jax.model.kernels.linear import project, vocabulary_product
from bart_jax.model.parameters import checked_param

Dtype = Any


class Linear(nn.Module):
    """y = x @ weight.T + bias. x: [..., in_features] -> [..., features]."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    weight_init: Callable = nn.initializers.normal(0.02)
    kernels: str = "auto"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        weight = checked_param(self, "weight", self.weight_init, (self.features, inputs.shape[-1]), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = checked_param(self, "bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        return self.multiply(inputs, weight, bias).astype(self.dtype)

    def multiply(self, inputs: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
        """float32 inputs @ weight.T (+ bias)."""
        return project(inputs, weight, bias, self.dtype, self.kernels)


class VocabularyProjection(Linear):
    """An LM head with its own weight [vocab, in] (untied embeddings), multiplied as
    `vocabulary_product`; bias-free, as transformers' `lm_head`."""

    use_bias: bool = False

    def multiply(self, inputs: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
        return vocabulary_product(inputs, weight, self.dtype, self.kernels)
