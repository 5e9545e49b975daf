"""Scaled dot-product attention over whole keys and values (encoder self-attention, training's
decoder, cross-attention), twice: portable and CPU-tuned.

Both take queries, keys and values as the projections give them, [batch, length, heads,
head_dim], queries already scaled by head_dim**-0.5, and a boolean mask broadcastable to
[batch, heads, query, key] (True = may attend). Scores, masking and softmax run in float32
whatever the compute dtype; a masked score is the most negative finite float32 (not -inf), so a
fully masked row stays finite, as in transformers' eager attention. Both return (output [batch,
query, heads, head_dim] float32, weights [batch, heads, query, key] float32 before dropout, as
transformers returns them).

Portable: two einsums and a softmax, every layout as the projections give it; where no weights
are returned and no attention dropout applies, `jax.nn.dot_product_attention` (cuDNN's fused
attention on GPU).

TPU (attention_tpu.py): where no weights are returned and no attention dropout applies, the
Pallas flash-attention kernel, for the masks and shapes it takes (`flash_applies`); the portable
path otherwise.

CPU (docs/cpu-kernels.md): heads lead ([batch, heads, ...]) and keys are transposed
([batch, heads, head_dim, key]) so that each matmul reads its operands as stored; the softmax's
normalisation applied to the output; a single query row padded with a zero second row; long
inputs attended one batch element at a time.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from bart_jax.model.kernels import dispatch, float32_precision
from bart_jax.model.kernels.attention_tpu import attend_flash, flash_applies
from bart_jax.model.kernels.linear import einsum_product, full_precision
from bart_jax.model.partitioning import sharding_active

Array = jax.Array
Dtype = Any

# Attention over at least this many queries per batch element runs element by element on CPU
# (see `attends_per_example`); a decoder over 128 targets in training gained nothing from it.
PER_EXAMPLE_MIN_QUERIES = 256
MASKED = float(jnp.finfo(jnp.float32).min)


def dropout(values: Array, rate: float, rng: Optional[Array]) -> Array:
    """Inverted dropout of `values` at `rate` (as `flax.linen.Dropout`); identity without `rng`."""
    if rng is None or rate == 0.0:
        return values
    if rate >= 1.0:
        return jnp.zeros_like(values)
    keep = jax.random.bernoulli(rng, 1.0 - rate, values.shape)
    return jnp.where(keep, values / (1.0 - rate), 0).astype(values.dtype)


def unnormalized_softmax(scores: Array) -> tuple[Array, Array, Array]:
    """(exp(scores - row maximum), its row sum [..., 1], the row maximum [..., 1]) of float32
    scores [..., k].

    The row maximum only keeps exp in range: softmax does not depend on it, so its derivative
    (an argmax mask XLA would keep for the backward pass) is left out.
    """
    maximum = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    unnormalized = jnp.exp(scores - maximum)
    return unnormalized, jnp.sum(unnormalized, axis=-1, keepdims=True), maximum


# --- portable -------------------------------------------------------------------------------
def attend_portable(query: Array, key: Array, value: Array, mask: Optional[Array], dtype: Dtype,
                    dropout_rate: float = 0.0, dropout_rng: Optional[Array] = None) -> tuple[Array, Array]:
    """softmax(query @ key.T, masked) @ value: query [b, q, h, d], key and value [b, k, h, d]."""
    scores = einsum_product("bqhd,bkhd->bhqk", query.astype(dtype), key.astype(dtype))
    if mask is not None:
        scores = jnp.where(mask, scores, MASKED)
    unnormalized, total, _ = unnormalized_softmax(scores)
    weights = unnormalized / total
    dropped = dropout(weights, dropout_rate, dropout_rng)
    output = einsum_product("bhqk,bkhd->bqhd", dropped.astype(dtype), value.astype(dtype))
    return output, weights


def attend_fused(query: Array, key: Array, value: Array, mask: Optional[Array], dtype: Dtype) -> Array:
    """`attend_portable`'s output alone, by `jax.nn.dot_product_attention`: on GPU cuDNN's fused
    (flash) attention where it applies, XLA's formulation elsewhere. No weights are formed outside
    the kernel, so it serves calls that return no attention weights and use no attention dropout.
    Returns output [b, q, h, d] float32."""
    # float32 products at full precision, as everywhere the portable path promises fp32 parity.
    highest = full_precision(dtype) and float32_precision() is not None
    with jax.default_matmul_precision("highest" if highest else jax.config.jax_default_matmul_precision):
        output = jax.nn.dot_product_attention(query.astype(dtype), key.astype(dtype), value.astype(dtype), mask=mask,
                                              scale=1.0)
    return output.astype(jnp.float32)


# --- CPU ------------------------------------------------------------------------------------
def scores_transposed(query: Array, key: Array, mask: Optional[Array]) -> Array:
    """Masked float32 scores: query [b, h, q, d], key [b, h, d, k] (transposed) -> [b, h, q, k]."""
    scores = einsum_product("bhqd,bhdk->bhqk", query, key.astype(query.dtype))
    return scores if mask is None else jnp.where(mask, scores, MASKED)


def weigh_values(scores: Array, value: Array, dtype: Dtype, dropout_rate: float = 0.0,
                 dropout_rng: Optional[Array] = None) -> tuple[Array, Array]:
    """softmax(scores) @ value: scores [b, h, q, k] float32 (-inf: weighs nothing; each row needs
    one finite score), value [b, h, k, d]. Returns (output [b, h, q, d] float32, weights [b, h, q, k]).
    """
    # Softmax with its normalisation applied to the output rather than to the weights: one
    # pass less over the [query, key] probabilities, the largest tensor of a long input.
    unnormalized, total, _ = unnormalized_softmax(scores)
    dropped = dropout(unnormalized, dropout_rate, dropout_rng)
    output = weights_times_values(dropped, value.astype(dtype)) / total
    return output, unnormalized / total


def weights_times_values(weights: Array, value: Array) -> Array:
    """weights [b, h, q, k] float32 @ value [b, h, k, d] -> float32 [b, h, q, d], the weights
    multiplied in the values' dtype.

    With a single query per (batch, head), as in every greedy decoding step, XLA's CPU backend
    runs this product as a matrix-vector product on one thread; with two query rows it goes to
    its matmul library, which reads the values about 1.7x faster (bart-base cross-attention,
    float32). A single row therefore gets a zero second row, dropped from the result, and is
    multiplied in float32: the matmul library's bfloat16 products of two rows by [keys, head_dim]
    run at a third of the float32 ones' rate, and cross-attention values, loop-invariant, are
    converted once before the decoding loop (as XLA already does with the keys, for want of a
    bfloat16 matrix-vector product). Greedy bf16 W2, bart-base 8 x 512: 12% faster. The decoder
    cache's chunks, written every step, are converted every step: measured no slower than their
    bfloat16 product (batch 1, 4 x 256 and 8 x 512).
    """
    single = weights.shape[-2] == 1
    if single:
        weights = jnp.pad(weights, [(0, 0), (0, 0), (0, 1), (0, 0)])
        value = value.astype(jnp.float32)
    weights = weights.astype(value.dtype)
    output = einsum_product("bhqk,bhkd->bhqd", weights, value)
    return output[:, :, :1] if single else output


def attend_transposed(query: Array, key: Array, value: Array, mask: Optional[Array], dtype: Dtype,
                      dropout_rate: float = 0.0, dropout_rng: Optional[Array] = None) -> tuple[Array, Array]:
    """Attention in the CPU layout: query [b, h, q, d], key [b, h, d, k], value [b, h, k, d].
    Returns (output [b, h, q, d] float32, weights [b, h, q, k] float32)."""
    return weigh_values(scores_transposed(query, key, mask), value, dtype, dropout_rate, dropout_rng)


def attends_per_example(batch: int, queries: int) -> bool:
    """Whether CPU attention runs one batch element at a time (`attend_per_example`).

    On CPU, an element's [heads, query, key] scores stay in the processor's caches while they
    are exponentiated and multiplied by the values; over the whole batch they do not (bart-base
    encoder, 512 tokens: 43 ms per layer against 86 ms in fp32, 69 ms in bf16). Sharded batches
    attend the whole batch at once: a sequential loop would serialise them.
    """
    return batch > 1 and queries >= PER_EXAMPLE_MIN_QUERIES and not sharding_active()


def attend_per_example(query: Array, key: Array, value: Array, mask: Optional[Array], dtype: Dtype,
                       dropout_rate: float = 0.0, dropout_rng: Optional[Array] = None) -> Array:
    """`attend_transposed`'s output, computed by a loop over the batch (`lax.map`). Same shapes."""
    per_example_mask = mask is not None and mask.shape[0] == query.shape[0]

    def attend_one(inputs):
        index, one_query, one_key, one_value = inputs
        one_mask = lax.dynamic_index_in_dim(mask, index) if per_example_mask else mask
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        output, _ = attend_transposed(one_query[None], one_key[None], one_value[None], one_mask, dtype,
                                      dropout_rate, rng)
        return output[0]

    # Rematerialised: the backward pass recomputes an element's scores rather than keeping the
    # whole batch's [heads, query, key] weights from the forward pass.
    return lax.map(jax.checkpoint(attend_one), (jnp.arange(query.shape[0]), query, key, value))


def attend_cpu(query: Array, key: Array, value: Array, mask: Optional[Array], dtype: Dtype,
               dropout_rate: float = 0.0, dropout_rng: Optional[Array] = None) -> tuple[Array, Array]:
    """`attend_portable` as XLA's CPU backend runs it fastest (same arguments and results)."""
    query = query.astype(dtype).transpose(0, 2, 1, 3)  # [b, h, q, d]
    key = key.astype(dtype).transpose(0, 2, 3, 1)  # [b, h, d, k]
    value = value.astype(dtype).transpose(0, 2, 1, 3)  # [b, h, k, d]
    if attends_per_example(query.shape[0], query.shape[2]):
        output = attend_per_example(query, key, value, mask, dtype, dropout_rate, dropout_rng)
        # The weights, for output_attentions only: XLA removes this whole-batch pass otherwise.
        _, weights = attend_transposed(query, key, value, mask, dtype)
    else:
        output, weights = attend_transposed(query, key, value, mask, dtype, dropout_rate, dropout_rng)
    return output.transpose(0, 2, 1, 3), weights


# --- the seam -------------------------------------------------------------------------------
def attend(query: Array, key: Array, value: Array, mask: Optional[Array], dtype: Dtype, dropout_rate: float = 0.0,
           dropout_rng: Optional[Array] = None, kernels: str = "auto") -> tuple[Array, Array]:
    """Attention of query [b, q, h, d] (scaled) over key, value [b, k, h, d]; mask broadcastable
    to [b, h, q, k]. Returns (output [b, q, h, d] float32, weights [b, h, q, k] float32)."""

    def run(implementation):
        return lambda q, k, v: implementation(q, k, v, mask, dtype, dropout_rate, dropout_rng)

    return dispatch(kernels, run(attend_cpu), run(attend_portable), query, key, value)


def attend_tpu(query: Array, key: Array, value: Array, mask: Optional[Array], dtype: Dtype,
               causal: bool = False) -> Array:
    """`attend_fused`'s output on TPU: the Pallas flash-attention kernel where it takes these
    shapes and mask (`flash_applies`, decided while tracing), `attend_fused` otherwise.
    Returns output [b, q, h, d] float32."""
    if flash_applies(query.shape, key.shape, None if mask is None else mask.shape, causal):
        return attend_flash(query, key, value, mask, dtype, causal)
    return attend_fused(query, key, value, mask, dtype)


def attend_output(query: Array, key: Array, value: Array, mask: Optional[Array], dtype: Dtype,
                  kernels: str = "auto", causal: bool = False) -> Array:
    """`attend`'s output alone, for calls that need no weights and no dropout: the portable
    policy runs the fused `attend_fused`, the TPU one `attend_tpu`. `causal`: the mask is a
    causal mask combined with a key mask (self-attention without a cache, as many queries as
    keys), which lets the TPU kernel apply it as such; the other kernels just apply the mask.
    Returns output [b, q, h, d] float32."""

    def run(implementation):
        return lambda q, k, v: implementation(q, k, v, mask, dtype)

    return dispatch(kernels, lambda q, k, v: attend_cpu(q, k, v, mask, dtype)[0], run(attend_fused),
                    query, key, value, tpu=lambda q, k, v: attend_tpu(q, k, v, mask, dtype, causal))
