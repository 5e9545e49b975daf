"""Embedding lookups: rows of a table [rows, features] gathered by integer ids, in the compute
dtype.

Portable: `jnp.take(table, ids, axis=0).astype(dtype)`. The gathered rows are cast, not the
table: the same values as casting the table first (as flax's `nn.Embed` does), without
converting a whole vocabulary table in every call.

CPU: a bfloat16/float16 table is gathered as its 16-bit patterns. XLA's CPU backend computes a
bfloat16 gather on a float32 copy of the table, and since the table does not change inside the
decoding loop, it converts the whole table before the loop: in every generation call, bart-base's
50265 x 768 table (about 65 ms on 2 cores) for a few rows. Gathering bits is exact.

A table stored as int8 (`QuantizedWeight`, both formulations) is gathered as int8 rows and their
scales, then dequantized: the values of dequantizing the table and gathering, without a float32
copy of the table (bart-large's: 206 MB, which XLA otherwise makes before the decoding loop).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bart_jax.model.kernels import dispatch
from bart_jax.model.kernels.quantized_linear import QuantizedWeight

Dtype = Any


def lookup_portable(table: jax.Array | QuantizedWeight, ids: jax.Array, dtype: Dtype) -> jax.Array:
    """table [rows, features], ids [...] (int) -> [..., features] in `dtype`."""
    if isinstance(table, QuantizedWeight):
        return _quantized_rows(table, ids).astype(dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)


def _quantized_rows(table: QuantizedWeight, ids: jax.Array) -> jax.Array:
    """Rows `ids` of an int8 table, dequantized (int8 value x its row's scale): float32 [..., features]."""
    qvalue = jnp.take(table.array.qvalue, ids, axis=0)
    scale = jnp.take(table.array.scale, ids, axis=0)
    return qvalue.astype(scale.dtype) * scale


@jax.custom_vjp
def _gather_bits(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids] of a 16-bit float table, gathered as uint16 patterns: [..., features]."""
    bits = jnp.take(lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0)
    return lax.bitcast_convert_type(bits, table.dtype)


def _gather_bits_forward(table, ids):
    # The table is a parameter, alive anyway: keeping it costs no memory.
    return _gather_bits(table, ids), (table, ids)


def _gather_bits_backward(residuals, output_gradient):
    # The gather's own transpose: each row's gradient is the sum of its lookups' gradients.
    table, ids = residuals
    gradient = jnp.zeros(table.shape, jnp.float32)
    gradient = gradient.at[ids.reshape(-1)].add(output_gradient.reshape(-1, table.shape[-1]).astype(jnp.float32))
    return gradient.astype(table.dtype), None


_gather_bits.defvjp(_gather_bits_forward, _gather_bits_backward)


def lookup_cpu(table: jax.Array, ids: jax.Array, dtype: Dtype) -> jax.Array:
    """`lookup_portable`, with 16-bit float tables gathered as bits."""
    if not isinstance(table, QuantizedWeight) and jnp.dtype(table.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return _gather_bits(table, ids).astype(dtype)
    return lookup_portable(table, ids, dtype)


def lookup(table: jax.Array, ids: jax.Array, dtype: Dtype, kernels: str = "auto") -> jax.Array:
    """Rows `ids` [...] of `table` [rows, features] in `dtype`: [..., features]."""
    return dispatch(kernels, lambda t, i: lookup_cpu(t, i, dtype), lambda t, i: lookup_portable(t, i, dtype),
                    table, ids)
