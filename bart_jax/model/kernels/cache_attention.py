"""Decoder self-attention over the beam cache, one function per cache layout
(bart_jax/model/kernels/cache.py): the layout a cache was created in decides which runs.

Beam search never moves cached keys/values: position p of row g's hypothesis lives in the slot
of beam `ancestors[b, g, p]` (the beam that computed it). Each query scores the slots of all
beams of its input (beams x the attention math, which is small next to reading the cache) and
masks out those of other beams, cheaper than gathering the whole cache every step. Slots of
other beams and positions not written yet (absent from transformers' cache) weigh exactly
nothing (-inf), even in a fully masked row.

Both take:
    queries      [batch, beams * t, heads, head_dim], scaled, an input's beams side by side
    key, value   [batch * beams, t, heads, head_dim], the step's projections
    mask         boolean, [rows | batch, 1 | heads, t, max_length] (rows = batch * beams)
and return (output [batch, beams * t, heads, head_dim] float32, weights per position
[rows, heads, t, max_length] float32, the layer cache with the step written).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from bart_jax.model.kernels.attention import (MASKED, dropout, scores_transposed, unnormalized_softmax,
                                              weights_times_values)
from bart_jax.model.kernels.cache import from_storage, to_storage, write_cpu, write_portable
from bart_jax.model.kernels.linear import einsum_product
from bart_jax.model.partitioning import TIME_MAJOR, KEYS, PER_HEAD, constrain

Array = jax.Array
Dtype = Any


def _beam_major_mask(mask: Optional[Array], batch: int, beams: int) -> Optional[Array]:
    """A mask [rows | batch, m, t, k] as [batch, m, beams | 1, t, k] (rows = batch * beams, beams inner)."""
    if mask is None:
        return None
    if mask.shape[0] == batch * beams and beams > 1:
        return mask.reshape((batch, beams) + mask.shape[1:]).transpose(0, 2, 1, 3, 4)
    return mask[:, :, None]


def _mask_slots(scores: Array, mask: Optional[Array], owner: Array) -> Array:
    """scores [b, h, beams, t, positions, beams] with the attention mask (positions) and the slot
    owners [b, beams, positions, beams] applied."""
    if mask is not None:
        scores = jnp.where(mask[..., None], scores, MASKED)
    return jnp.where(owner[:, None, :, None], scores, -jnp.inf)


def _per_position(weights: Array, batch: int, heads: int, beams: int, length: int) -> Array:
    """Slot weights [b, h, beams * t, positions * beams] summed per position: [rows, h, t, positions]."""
    positions = weights.shape[-1] // beams
    weights = weights.reshape(batch, heads, beams, length, positions, beams).sum(axis=-1)
    return weights.transpose(0, 2, 1, 3, 4).reshape(batch * beams, heads, length, positions)


# --- portable -------------------------------------------------------------------------------
def attend_cache_portable(queries: Array, key: Array, value: Array, layer_cache: dict, cache_index: Array,
                          ancestors: Array, mask: Optional[Array], dtype: Dtype, dropout_rate: float = 0.0,
                          dropout_rng: Optional[Array] = None) -> tuple[Array, Array, dict]:
    """Attention over the whole portable cache, positions not written yet masked out."""
    batch, beams, max_length = ancestors.shape
    length, heads, head_dim = key.shape[1:]

    def slots(x):  # [rows, t, h, d] -> [batch, t * beams, h, d], slot-ordered
        return x.reshape(batch, beams, length, heads, head_dim).transpose(0, 2, 1, 3, 4).reshape(
            batch, length * beams, heads, head_dim)

    new_cache = write_portable(layer_cache, slots(key), slots(value), cache_index, beams)
    new_cache = {name: constrain(tensor, TIME_MAJOR) for name, tensor in new_cache.items()}
    scores = einsum_product("bqhd,bshd->bhqs", queries.astype(dtype), new_cache["key"].astype(dtype))
    written = jnp.arange(max_length) < cache_index + length
    owner = (ancestors[..., None] == jnp.arange(beams)) & written[:, None]  # [b, beams, positions, beams]
    scores = _mask_slots(scores.reshape(batch, heads, beams, length, max_length, beams),
                         _beam_major_mask(mask, batch, beams), owner)
    unnormalized, total, _ = unnormalized_softmax(scores.reshape(batch, heads, beams * length, max_length * beams))
    weights = unnormalized / total
    output = einsum_product("bhqs,bshd->bqhd", dropout(weights, dropout_rate, dropout_rng).astype(dtype),
                            new_cache["value"].astype(dtype))
    return output, _per_position(weights, batch, heads, beams, length), new_cache


# --- CPU ------------------------------------------------------------------------------------
def attend_cache_cpu(queries: Array, key: Array, value: Array, layer_cache: dict, cache_index: Array,
                     ancestors: Array, mask: Optional[Array], dtype: Dtype, dropout_rate: float = 0.0,
                     dropout_rng: Optional[Array] = None) -> tuple[Array, Array, dict]:
    """Attention over the chunked CPU cache: the chunks not written yet are skipped
    (`lax.cond`), the others multiplied as stored, then merged as one softmax."""
    batch, beams, max_length = ancestors.shape
    length, heads, head_dim = key.shape[1:]
    queries_per_input = beams * length
    per_beam = (batch, beams, length, heads, head_dim)
    stored = layer_cache["key"][0].dtype
    # New keys [b, h, d, t * beams] and values [b, h, t * beams, d], slot-ordered.
    new_key = to_storage(key.reshape(per_beam).transpose(0, 3, 4, 2, 1).reshape(batch, heads, head_dim, -1), stored)
    new_value = to_storage(value.reshape(per_beam).transpose(0, 3, 2, 1, 4).reshape(batch, heads, -1, head_dim),
                           stored)
    new_cache = write_cpu(layer_cache, new_key, new_value, cache_index, beams)
    new_cache = {"key": tuple(constrain(chunk, KEYS) for chunk in new_cache["key"]),
                 "value": tuple(constrain(chunk, PER_HEAD) for chunk in new_cache["value"])}
    queries = queries.astype(dtype).transpose(0, 2, 1, 3)  # [b, h, beams * t, d]
    mask = _beam_major_mask(mask, batch, beams)
    written = cache_index + length

    def attend_chunk(index, chunk_key, chunk_value, chunk_mask, owner, written_in_chunk):
        """Attention over one chunk alone: (scores [b, h, beams * t, slots], their row maximum m
        [..., 1], row sum of exp(scores - m) [..., 1], exp(scores - m) @ values [b, h, beams * t, d])."""
        positions = chunk_key.shape[-1] // beams
        scores = scores_transposed(queries, from_storage(chunk_key), None)
        owner = owner & (jnp.arange(positions) < written_in_chunk)[:, None]
        scores = _mask_slots(scores.reshape(batch, heads, beams, length, positions, beams), chunk_mask, owner)
        scores = scores.reshape(batch, heads, queries_per_input, positions * beams)
        unnormalized, total, maximum = unnormalized_softmax(scores)
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        dropped = dropout(unnormalized, dropout_rate, rng)
        product = weights_times_values(dropped, from_storage(chunk_value).astype(dtype))
        return scores, maximum, total, product

    def unwritten(slots):
        rows_shape = (batch, heads, queries_per_input)
        return (jnp.full(rows_shape + (slots,), -jnp.inf), jnp.full(rows_shape + (1,), -jnp.inf),
                jnp.zeros(rows_shape + (1,)), jnp.zeros(rows_shape + (head_dim,)))

    # Each written chunk attended on its own, chunks not written yet skipped (the first one
    # always is), then merged as one softmax over all positions: each chunk's terms rescaled
    # from its own row maximum to the overall one.
    parts, start = [], 0
    for index, (chunk_key, chunk_value) in enumerate(zip(new_cache["key"], new_cache["value"])):
        end = start + chunk_key.shape[-1] // beams
        chunk_mask = None if mask is None else mask[..., start:end]
        owner = ancestors[:, :, start:end, None] == jnp.arange(beams)
        attend = functools.partial(attend_chunk, index, chunk_key, chunk_value, chunk_mask, owner, written - start)
        parts.append(attend() if start == 0 else
                     lax.cond(start < written, attend, functools.partial(unwritten, chunk_key.shape[-1])))
        start = end
    scores, maxima, totals, products = zip(*parts)
    maximum = functools.reduce(jnp.maximum, maxima)
    scales = [jnp.exp(chunk_maximum - maximum) for chunk_maximum in maxima]
    total = sum(scale * chunk_total for scale, chunk_total in zip(scales, totals))
    output = sum(scale * product for scale, product in zip(scales, products)) / total
    weights = jnp.exp(jnp.concatenate(scores, axis=-1) - maximum) / total
    return output.transpose(0, 2, 1, 3), _per_position(weights, batch, heads, beams, length), new_cache


CACHE_ATTENTION = {"portable": attend_cache_portable, "cpu": attend_cache_cpu}
