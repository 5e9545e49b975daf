"""Attention over whole keys and values on TPU: the Pallas flash-attention kernel that ships with
JAX (`jax.experimental.pallas.ops.tpu.flash_attention`), the TPU twin of `attend_fused`.

The kernel walks the keys block by block with an online softmax, so the [batch, heads, query,
key] scores and probabilities are never stored: neither in the forward pass nor for the
backward pass, which recomputes them block by block from the saved row statistics.

What it takes, and how BART's attention is put into that form:
- Layout [batch, heads, length, head_dim]; the projections' [batch, length, heads, head_dim]
  is transposed on the way in and out.
- Masks are segment ids: a key may be attended where its segment equals the query's. Every
  query gets segment 1, each key the value of its key mask (1 real token, 0 padding), so a key
  mask [batch or 1, 1, 1, key] (encoder self-attention, cross-attention) is represented exactly.
  Decoder self-attention without a cache (`causal=True`) is the kernel's own causal mask
  combined with a key mask, which is the mask's last query row: with as many queries as keys,
  causality hides nothing from the last query.
- Both lengths are padded to a multiple of the kernel's block (`BLOCK`); padded keys get segment
  0, which no query has, and padded query rows are dropped.
- BART scales queries (by head_dim**-0.5, in the compute dtype) before the product, as the
  portable path receives them, so the kernel's own scale is 1.
- Scores are float32 products of operands in the compute dtype and the softmax runs in float32,
  as in `attend_portable`; the probabilities are cast to the compute dtype before the product
  with the values, as there (unnormalised, the normalisation applied to the float32 output).
  float32 products run at full precision (`float32_precision`) in the forward kernel: the
  precision Mosaic gives a product is fixed when the kernel is traced, and its backward kernels,
  traced by differentiation, take the global setting. A masked score is pushed down by
  -0.7 * float32 max rather than replaced, which gives the same zero weight. A row that may
  attend no key at all (an input of padding alone) averages every key it is shown, padded ones
  included: finite, but not `attend_portable`'s average, and meaningless in both.

Under `activation_sharding` (bart_jax/model/partitioning.py) the kernel runs inside
`jax.shard_map`: each device attends its own batch rows and heads (the rules' "activation_batch"
and "activation_heads" axes), since a Pallas call is one device's program.

What it cannot take is decided while tracing (`flash_applies`): masks that are neither a key
mask nor causal-and-key, and head_dim above 128 that is not a multiple of 128; the callers keep
attention weights (output_attentions) and attention dropout on the portable path.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from bart_jax.model import partitioning
from bart_jax.model.kernels import float32_precision
from bart_jax.model.kernels.linear import full_precision

Array = jax.Array
Dtype = Any

# The kernel's default block along queries and keys (and of its backward pass): lengths are
# padded to a multiple of it. Segment ids need key blocks of a multiple of 128 lanes.
BLOCK = 128
LANES = 128
# The logical axes of the kernel's [batch, heads, length, head_dim] operands.
HEADS_MAJOR = ("activation_batch", "activation_heads", None, None)


def round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def kernel_precision(dtype: Dtype) -> str:
    """The matmul precision to trace the kernel under: Mosaic takes "highest" (float32 products
    in float32) or "default" (its own choice) and rejects the others ("tensorfloat32", ...)."""
    chosen = jax.config.jax_default_matmul_precision
    highest = float32_precision() is not None or chosen in ("highest", "float32")
    return "highest" if full_precision(dtype) and highest else "default"


def flash_applies(query_shape: Sequence[int], key_shape: Sequence[int], mask_shape: Optional[Sequence[int]],
                  causal: bool = False) -> bool:
    """Whether `attend_flash` takes query [b, q, h, d] over key [b, k, h, d] with a mask of
    `mask_shape` (None: no mask): a static decision, made while tracing."""
    batch, queries, heads, head_dim = query_shape
    keys = key_shape[1]
    if head_dim > LANES and head_dim % LANES:
        return False
    if mask_shape is None:
        return True
    if len(mask_shape) != 4 or mask_shape[0] not in (1, batch) or mask_shape[1] != 1 or mask_shape[3] != keys:
        return False
    return mask_shape[2] == 1 or (causal and mask_shape[2] == queries == keys)


def key_segments(mask: Optional[Array], batch: int, keys: int, padded_keys: int, causal: bool) -> Array:
    """int32 [batch, padded_keys] segment ids of the keys: 1 where `mask` (see `flash_applies`)
    lets queries attend, 0 for masked and padded keys."""
    if mask is None:
        visible = jnp.ones((batch, keys), jnp.int32)
    else:
        # A key mask's only row, or a causal mask's last row (which causality does not restrict).
        row = mask[:, 0, 0, :] if mask.shape[2] == 1 or not causal else mask[:, 0, -1, :]
        visible = jnp.broadcast_to(row, (batch, keys)).astype(jnp.int32)
    return jnp.pad(visible, [(0, 0), (0, padded_keys - keys)])


def flash_heads_major(query: Array, key: Array, value: Array, query_segments: Array, key_segments_: Array,
                      causal: bool) -> Array:
    """The Pallas kernel on one device's share: query [b, h, q, d], key and value [b, h, k, d],
    segments [b, q] and [b, k] (lengths multiples of `BLOCK`). Returns [b, h, q, d] in the
    operands' dtype."""
    # Imported here: Pallas' TPU modules are needed only where this formulation is traced.
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    return pallas_flash.flash_attention(query, key, value, segment_ids=pallas_flash.SegmentIds(q=query_segments,
                                                                                             kv=key_segments_),
                                        causal=causal, sm_scale=1.0)


def sharded(function, query: Array, key: Array, value: Array, query_segments: Array, key_segments_: Array,
            causal: bool) -> Array:
    """`function(query, key, value, query_segments, key_segments_, causal)` per device under
    `activation_sharding` (batch and heads split as the rules say), directly outside it."""
    active = partitioning.active_sharding()
    if active is None:
        return function(query, key, value, query_segments, key_segments_, causal)
    mesh, rules = active
    spec = partitioning.logical_to_spec(HEADS_MAJOR, query.shape, mesh, rules, indivisible="replicate")
    segments_spec = PartitionSpec(spec[0], None)
    # check_vma=False: the Pallas call declares no varying-axes types of its own.
    return jax.shard_map(lambda *operands: function(*operands, causal), mesh=mesh,
                         in_specs=(spec, spec, spec, segments_spec, segments_spec), out_specs=spec,
                         check_vma=False)(query, key, value, query_segments, key_segments_)


def attend_flash(query: Array, key: Array, value: Array, mask: Optional[Array], dtype: Dtype,
                 causal: bool = False) -> Array:
    """`attend_portable`'s output by the Pallas TPU flash-attention kernel: query [b, q, h, d]
    (scaled), key and value [b, k, h, d], mask as `flash_applies` accepts it (with `causal`, a
    causal mask combined with a key mask). Returns output [b, q, h, d] float32."""
    if not flash_applies(query.shape, key.shape, None if mask is None else mask.shape, causal):
        raise ValueError(f"the flash-attention kernel cannot take query {query.shape}, key {key.shape} and mask "
                         f"{None if mask is None else mask.shape} (causal={causal}); see flash_applies")
    batch, queries = query.shape[:2]
    keys = key.shape[1]
    causal = causal and mask is not None and mask.shape[2] != 1  # a key mask alone restricts nothing more
    padded_queries, padded_keys = round_up(queries, BLOCK), round_up(keys, BLOCK)

    def heads_major(x: Array, padded: int) -> Array:  # [b, n, h, d] -> [b, h, padded, d]
        x = x.astype(dtype).transpose(0, 2, 1, 3)
        return jnp.pad(x, [(0, 0), (0, 0), (0, padded - x.shape[2]), (0, 0)])

    query_segments = jnp.ones((batch, padded_queries), jnp.int32)
    with jax.default_matmul_precision(kernel_precision(dtype)):
        output = sharded(flash_heads_major, heads_major(query, padded_queries), heads_major(key, padded_keys),
                         heads_major(value, padded_keys), query_segments,
                         key_segments(mask, batch, keys, padded_keys, causal), causal)
    return output[:, :, :queries].transpose(0, 2, 1, 3).astype(jnp.float32)
