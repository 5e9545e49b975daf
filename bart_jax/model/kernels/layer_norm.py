"""LayerNorm's normalisation over the last axis in float32: (x - mean) / sqrt(var + epsilon) *
scale + bias.

Portable: two passes, the mean and then the mean of squared deviations, as PyTorch computes
them: accurate when the mean is large against the deviations.

CPU (docs/cpu-kernels.md): both statistics in one variadic reduction, variance as
E[y^2] - E[y]^2 of the row y shifted by an estimate of its mean. XLA's CPU backend fuses a norm's reductions into the matmul that produces its
input (out_proj, fc2 and the residual before each norm of BART's post-norm layers), and that
fusion runs the matmul slower (bart-base fc2 + residual + norm, 4096 rows, fp32: 64 ms against
58 ms); a variadic reduction is left out of the fusion, and reads its input once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bart_jax.model.kernels import dispatch

# Entries of a row whose mean shifts it before the CPU statistics (see `normalize_cpu`).
SHIFT_ENTRIES = 16


def normalize_portable(values: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """values [..., features] float32, scale and bias [features] -> float32 [..., features]."""
    mean = jnp.mean(values, axis=-1, keepdims=True)
    centered = values - mean
    variance = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return centered * lax.rsqrt(variance + epsilon) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


@jax.custom_jvp
def sum_and_sum_of_squares(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """values [..., features] -> (sum, sum of squares), each [...], in one pass."""
    zero = jnp.zeros((), values.dtype)
    return lax.reduce((values, values * values), (zero, zero),
                      lambda a, b: (a[0] + b[0], a[1] + b[1]), (values.ndim - 1,))


@sum_and_sum_of_squares.defjvp
def _sum_and_sum_of_squares_jvp(primals, tangents):
    # Plain sums: JAX's derivative of a variadic reduction would trace a far slower backward pass.
    (values,), (tangent,) = primals, tangents
    return sum_and_sum_of_squares(values), (jnp.sum(tangent, axis=-1), jnp.sum(2 * values * tangent, axis=-1))


def normalize_cpu(values: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """`normalize_portable` with one-pass statistics (one variadic reduction).

    The statistics are taken of each row shifted by the mean of its first `SHIFT_ENTRIES`
    entries, close to the row's mean: E[y^2] - E[y]^2 then cancels at the rows' spread, not at
    their mean (docs/cpu-kernels.md has the errors against float64). The shift is a constant of
    the derivative: the statistics do not depend on it.
    """
    features = values.shape[-1]
    shift = lax.stop_gradient(jnp.mean(values[..., :SHIFT_ENTRIES], axis=-1, keepdims=True))
    total, total_of_squares = sum_and_sum_of_squares(values - shift)
    shifted_mean = total / features
    variance = jnp.maximum(total_of_squares / features - shifted_mean * shifted_mean, 0.0)
    factor = lax.rsqrt(variance + epsilon)[..., None] * scale.astype(jnp.float32)
    return (values - shift - shifted_mean[..., None]) * factor + bias.astype(jnp.float32)


def normalize(values: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
              kernels: str = "auto") -> jax.Array:
    """LayerNorm of float32 values [..., features] with scale, bias [features] -> float32."""
    return dispatch(kernels, lambda v, s, b: normalize_cpu(v, s, b, epsilon),
                    lambda v, s, b: normalize_portable(v, s, b, epsilon), values, scale, bias)
