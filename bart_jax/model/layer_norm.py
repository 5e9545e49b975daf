"""LayerNorm over the last axis, as `flax.linen.LayerNorm` computes it (parameters `scale` and
`bias`, statistics in float32), its normalisation behind the kernel seam
(bart_jax/model/kernels/layer_norm.py: two-pass statistics, or one variadic reduction on CPU)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bart_jax.model.kernels.layer_norm import normalize
from bart_jax.model.parameters import checked_param

Dtype = Any


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + epsilon) * scale + bias over the last axis. x: [..., features]."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        features = inputs.shape[-1]
        scale = checked_param(self, "scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = checked_param(self, "bias", nn.initializers.zeros, (features,), self.param_dtype)
        return normalize(inputs.astype(jnp.float32), scale, bias, self.epsilon, self.kernels).astype(self.dtype)
