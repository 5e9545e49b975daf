"""Multi-head attention as BART uses it: encoder self-attention, causal decoder
self-attention over a static key/value cache, and cross-attention over keys/values that
may have been projected once per source row.

Masks are boolean (True = may attend) and broadcast to [batch, heads, query, key]. Scores,
masking and softmax run in float32 whatever the compute dtype.

Projected keys are kept transposed, [batch, heads, head_dim, key_length], and values as
[batch, heads, key_length, head_dim]: each is then laid out as its matmul reads it (scores
contract head_dim, the output contracts key positions), so the keys/values attended on every
decoding step — the cache and the cross-attention keys/values — are never copied to transpose them.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bart_jax.cache import from_storage, to_storage, write_position
from bart_jax.linear import Linear
from bart_jax.sharding import KEYS, PER_HEAD, constrain, sharding_active

Array = jax.Array
Dtype = Any

# Attention over at least this many queries per batch element runs element by element on CPU
# (see `attends_per_example`); a decoder over 128 targets in training gained nothing from it.
PER_EXAMPLE_MIN_QUERIES = 256


def make_causal_mask(query_positions: Array, key_length: int) -> Array:
    """[1, 1, query, key] mask: query position p may attend to keys 0..p.

    query_positions: [query] absolute decoder positions.
    """
    keys = jnp.arange(key_length)
    return (keys[None, :] <= query_positions[:, None])[None, None]


def padding_mask(attention_mask: Optional[Array]) -> Optional[Array]:
    """[batch, key] 0/1 padding mask -> [batch, 1, 1, key] boolean mask (None stays None)."""
    if attention_mask is None:
        return None
    return attention_mask.astype(bool)[:, None, None, :]


def combine_masks(*masks: Optional[Array]) -> Optional[Array]:
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    combined = masks[0]
    for mask in masks[1:]:
        combined = jnp.logical_and(combined, mask)
    return combined


def attention_scores(query: Array, key: Array, mask: Optional[Array]) -> Array:
    """Masked attention scores in float32.

    query: [batch, heads, query_length, head_dim], already scaled by head_dim**-0.5.
    key: [batch, heads, head_dim, key_length] (transposed). mask: broadcastable to [batch, heads, q, k].
    Returns [batch, heads, query_length, key_length].
    """
    scores = jnp.einsum("bhqd,bhdk->bhqk", query, key.astype(query.dtype), preferred_element_type=jnp.float32)
    if mask is not None:
        # The most negative finite value (not -inf) keeps a fully masked row finite, as transformers' eager path.
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return scores


def dropout(values: Array, rate: float, rng: Optional[Array]) -> Array:
    """Inverted dropout of `values` at `rate` (as `flax.linen.Dropout`); identity without `rng`."""
    if rng is None or rate == 0.0:
        return values
    if rate >= 1.0:
        return jnp.zeros_like(values)
    keep = jax.random.bernoulli(rng, 1.0 - rate, values.shape)
    return jnp.where(keep, values / (1.0 - rate), 0).astype(values.dtype)


def softmax_attention(query: Array, key: Array, value: Array, mask: Optional[Array], dtype: Dtype,
                      dropout_rate: float = 0.0, dropout_rng: Optional[Array] = None) -> tuple[Array, Array]:
    """Scaled dot-product attention.

    query [batch, heads, q, head_dim] (scaled), key [batch, heads, head_dim, k] (transposed),
    value [batch, heads, k, head_dim], mask broadcastable to [batch, heads, q, k].
    Returns (output [batch, heads, q, head_dim] float32, weights [batch, heads, q, k] float32,
    before dropout as transformers returns them).
    """
    return weigh_values(attention_scores(query, key, mask), value, dtype, dropout_rate, dropout_rng)


def weigh_values(scores: Array, value: Array, dtype: Dtype, dropout_rate: float = 0.0,
                 dropout_rng: Optional[Array] = None) -> tuple[Array, Array]:
    """softmax(scores) @ value: scores [batch, heads, q, k] float32 (-inf: weighs nothing; each row
    needs one finite score), value [batch, heads, k, head_dim].
    Returns (output [batch, heads, q, head_dim] float32, weights [batch, heads, q, k] float32).
    """
    # Softmax with its normalisation applied to the output rather than to the weights: one
    # pass less over the [query, key] probabilities, the largest tensor of a long input.
    unnormalized, total, _ = _unnormalized_softmax(scores)
    dropped = dropout(unnormalized, dropout_rate, dropout_rng)
    output = _weights_times_values(dropped.astype(dtype), value.astype(dtype)) / total
    return output, unnormalized / total


def _unnormalized_softmax(scores: Array) -> tuple[Array, Array, Array]:
    """(exp(scores - row maximum), its row sum [..., 1], the row maximum [..., 1]) of float32
    scores [..., k].

    The row maximum only keeps exp in range: softmax does not depend on it, so its derivative
    (an argmax mask XLA would keep for the backward pass) is left out.
    """
    maximum = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    unnormalized = jnp.exp(scores - maximum)
    return unnormalized, jnp.sum(unnormalized, axis=-1, keepdims=True), maximum


def _weights_times_values(weights: Array, value: Array) -> Array:
    """weights [batch, heads, q, k] @ value [batch, heads, k, head_dim] -> float32 [batch, heads, q, head_dim].

    With a single query per (batch, head), as in every greedy decoding step, XLA's CPU backend
    runs this product as a matrix-vector product on one thread; with two query rows it goes to
    its matmul library, which reads the values about 1.7x faster (bart-base cross-attention,
    float32). A single row therefore gets a zero second row, dropped from the result.
    """
    single = weights.shape[-2] == 1 and jax.default_backend() == "cpu"
    if single:
        weights = jnp.pad(weights, [(0, 0), (0, 0), (0, 1), (0, 0)])
    output = jnp.einsum("bhqk,bhkd->bhqd", weights, value, preferred_element_type=jnp.float32)
    return output[:, :, :1] if single else output


def attends_per_example(batch: int, queries: int) -> bool:
    """Whether attention runs one batch element at a time (`softmax_attention_per_example`).

    On CPU, an element's [heads, query, key] scores stay in the processor's caches while they
    are exponentiated and multiplied by the values; over the whole batch they do not (bart-base
    encoder, 512 tokens: 43 ms per layer against 86 ms in fp32, 69 ms in bf16). Accelerators and
    sharded batches attend the whole batch at once: a sequential loop would serialise them.
    """
    return (batch > 1 and queries >= PER_EXAMPLE_MIN_QUERIES and jax.default_backend() == "cpu"
            and not sharding_active())


def softmax_attention_per_example(query: Array, key: Array, value: Array, mask: Optional[Array], dtype: Dtype,
                                  dropout_rate: float = 0.0, dropout_rng: Optional[Array] = None) -> Array:
    """`softmax_attention`'s output, computed by a loop over the batch (`lax.map`). Same shapes."""
    per_example_mask = mask is not None and mask.shape[0] == query.shape[0]

    def attend_one(inputs):
        index, one_query, one_key, one_value = inputs
        one_mask = lax.dynamic_index_in_dim(mask, index) if per_example_mask else mask
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        output, _ = softmax_attention(one_query[None], one_key[None], one_value[None], one_mask, dtype,
                                      dropout_rate, rng)
        return output[0]

    # Rematerialised: the backward pass recomputes an element's scores rather than keeping the
    # whole batch's [heads, query, key] weights from the forward pass.
    return lax.map(jax.checkpoint(attend_one), (jnp.arange(query.shape[0]), query, key, value))


class BartAttention(nn.Module):
    """q/k/v/out projections and scaled dot-product attention (transformers' `BartAttention`)."""

    embed_dim: int
    num_heads: int
    dropout: float = 0.0
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def setup(self):
        def dense():
            return Linear(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                          weight_init=nn.initializers.normal(self.init_std))

        self.q_proj = dense()
        self.k_proj = dense()
        self.v_proj = dense()
        self.out_proj = dense()

    def _split_heads(self, x: Array) -> Array:
        """[batch, length, d_model] -> [batch, heads, length, head_dim].

        Heads lead the length axis so that every attention matmul has its batch dimensions
        (batch, heads) outermost: XLA then runs it without transposing keys/values first, which
        matters when a long cache or source is attended once per decoded token.
        """
        batch, length = x.shape[:2]
        return constrain(x.reshape(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3), PER_HEAD)

    def project_key_value(self, states: Array) -> dict[str, Array]:
        """states [batch, key_length, d_model] -> {"key": [batch, heads, head_dim, key_length],
        "value": [batch, heads, key_length, head_dim]}."""
        batch, length = states.shape[:2]
        key = self.k_proj(states).reshape(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 3, 1)
        return {"key": constrain(key, KEYS), "value": self._split_heads(self.v_proj(states))}

    def __call__(
        self,
        hidden_states: Array,
        mask: Optional[Array] = None,
        key_value_states: Optional[Array] = None,
        key_value: Optional[dict[str, Array]] = None,
        cache: Optional[dict[str, Array]] = None,
        cache_index: Optional[Array] = None,
        ancestors: Optional[Array] = None,
        layer_head_mask: Optional[Array] = None,
        deterministic: bool = True,
    ) -> tuple[Array, Array, Optional[dict[str, Array]]]:
        """Attention of `hidden_states` [rows, query_length, d_model] over one of:

        - itself (self-attention); with a `cache` (see bart_jax/cache.py) the new keys/values are
          written at `cache_index` and every cached position is attended, read through `ancestors`;
        - `key_value_states` [batch, key_length, d_model] (cross-attention), or
        - precomputed `key_value` from `project_key_value` (cross-attention during decoding).

        `rows` may be a multiple of the keys' batch: the beams (or samples) of an input, inner
        in `rows`, share that input's cross-attention keys/values.
        `mask`: boolean, broadcastable to [rows, heads, query, key]. `layer_head_mask`: [heads].
        Returns (output [rows, query_length, d_model], weights [rows, heads, query, key], new cache).
        """
        query = self._split_heads(self.q_proj(hidden_states)) * jnp.asarray(self.head_dim**-0.5, self.dtype)
        if key_value is None:
            key_value = self.project_key_value(hidden_states if key_value_states is None else key_value_states)
        if cache is not None:
            return self._attend_cache(query, key_value, cache, cache_index, ancestors, mask, layer_head_mask,
                                      deterministic)
        key, value = key_value["key"], key_value["value"]

        rows, heads, query_length, head_dim = query.shape
        batch = key.shape[0]
        groups = rows // batch
        # Fold beams into the query axis so that shared keys/values are not repeated per beam.
        query = query.reshape(batch, groups, heads, query_length, head_dim).transpose(0, 2, 1, 3, 4)
        query = query.reshape(batch, heads, groups * query_length, head_dim)
        rate = 0.0 if deterministic else self.dropout
        dropout_rng = self.make_rng("dropout") if rate > 0.0 else None
        if attends_per_example(batch, groups * query_length):
            output = softmax_attention_per_example(query, key, value, mask, self.dtype, rate, dropout_rng)
            # The weights, for output_attentions only: XLA removes this whole-batch pass otherwise.
            _, weights = softmax_attention(query, key, value, mask, self.dtype)
        else:
            output, weights = softmax_attention(query, key, value, mask, self.dtype, rate, dropout_rng)
        output, weights = _mask_heads(output, weights, layer_head_mask)
        output = output.astype(self.dtype)
        output = output.reshape(batch, heads, groups, query_length, head_dim).transpose(0, 2, 3, 1, 4)
        output = self.out_proj(output.reshape(rows, query_length, self.embed_dim))

        key_length = weights.shape[-1]
        weights = weights.reshape(batch, heads, groups, query_length, key_length)
        weights = weights.transpose(0, 2, 1, 3, 4).reshape(rows, heads, query_length, key_length)
        return output, weights, None

    def _attend_cache(self, query, key_value, cache, cache_index, ancestors, mask, layer_head_mask, deterministic):
        """Self-attention over the beam cache (bart_jax/cache.py).

        Beam search never moves cached keys/values: position p of row g's hypothesis lives in
        the slot of beam `ancestors[b, g, p]` (the beam that computed it). Each query scores the
        slots of all beams of its input (beams x the attention math, which is small next to
        reading the cache) and masks out those of other beams — cheaper than gathering the
        whole cache every step. The cache's chunks not written yet are skipped (`lax.cond`); the
        others are multiplied as stored. query: [rows, heads, query_length, head_dim].
        """
        rows, heads, query_length, head_dim = query.shape
        batch, beams, max_length = ancestors.shape

        # New keys [rows, heads, head_dim, t] and values [rows, heads, t, head_dim], slot-ordered.
        new_key = key_value["key"].reshape(batch, beams, heads, head_dim, query_length).transpose(0, 2, 3, 4, 1)
        new_value = key_value["value"].reshape(batch, beams, heads, query_length, head_dim).transpose(0, 2, 3, 1, 4)
        key_chunks, value_chunks = cache["key"], cache["value"]
        new_key = to_storage(new_key.reshape(batch, heads, head_dim, query_length * beams), key_chunks[0].dtype)
        new_value = to_storage(new_value.reshape(batch, heads, query_length * beams, head_dim), value_chunks[0].dtype)
        new_cache = write_position(cache, new_key, new_value, cache_index, beams)
        new_cache = {"key": tuple(constrain(chunk, KEYS) for chunk in new_cache["key"]),
                     "value": tuple(constrain(chunk, PER_HEAD) for chunk in new_cache["value"])}

        # Queries of an input's beams side by side: [batch, heads, beams * t, head_dim].
        queries = query.reshape(batch, beams, heads, query_length, head_dim).transpose(0, 2, 1, 3, 4)
        queries = queries.reshape(batch, heads, beams * query_length, head_dim)
        if mask is not None:
            mask = _beam_major(mask, batch, beams) if mask.shape[0] == rows else mask[:, :, None]
        written = cache_index + query_length

        rate = 0.0 if deterministic else self.dropout
        rng = self.make_rng("dropout") if rate > 0.0 else None
        queries_per_input = beams * query_length

        def attend_chunk(index, key, value, chunk_mask, owner, written_in_chunk):
            """Attention over one chunk of positions alone: (scores [batch, heads, beams * t, slots],
            their row maximum m [..., 1], row sum of exp(scores - m) [..., 1], and
            exp(scores - m) @ values [batch, heads, beams * t, head_dim] float32). `chunk_mask` and
            `owner` are the chunk's part of `mask` and of the slot owners; `written_in_chunk` counts
            its positions written so far."""
            length = key.shape[-1] // beams
            scores = attention_scores(queries, from_storage(key), None)
            scores = scores.reshape(batch, heads, beams, query_length, length, beams)
            if chunk_mask is not None:
                # The most negative finite value for masked positions, as `attention_scores`.
                scores = jnp.where(chunk_mask, scores, jnp.finfo(jnp.float32).min)
            # Slots of other beams, and positions not written yet (absent from transformers'
            # cache), weigh exactly nothing, even in a fully masked row.
            owner = owner & (jnp.arange(length) < written_in_chunk)[:, None]
            scores = jnp.where(owner[:, None, :, None], scores, -jnp.inf)
            scores = scores.reshape(batch, heads, queries_per_input, length * beams)
            unnormalized, total, maximum = _unnormalized_softmax(scores)
            dropped = dropout(unnormalized, rate, None if rng is None else jax.random.fold_in(rng, index))
            product = _weights_times_values(dropped.astype(self.dtype), from_storage(value).astype(self.dtype))
            return scores, maximum, total, product

        def unwritten(slots):
            rows_shape = (batch, heads, queries_per_input)
            return (jnp.full(rows_shape + (slots,), -jnp.inf), jnp.full(rows_shape + (1,), -jnp.inf),
                    jnp.zeros(rows_shape + (1,)), jnp.zeros(rows_shape + (head_dim,)))

        # Each written chunk attended on its own, chunks not written yet skipped (the first one
        # always is), then merged as one softmax over all positions: each chunk's terms rescaled
        # from its own row maximum to the overall one.
        parts, start = [], 0
        for index, (key, value) in enumerate(zip(new_cache["key"], new_cache["value"])):
            end = start + key.shape[-1] // beams
            chunk_mask = None if mask is None else mask[..., start:end, None]
            owner = ancestors[:, :, start:end, None] == jnp.arange(beams)
            attend = functools.partial(attend_chunk, index, key, value, chunk_mask, owner, written - start)
            parts.append(attend() if start == 0 else
                         lax.cond(start < written, attend, functools.partial(unwritten, key.shape[-1])))
            start = end
        scores, maxima, totals, products = zip(*parts)
        maximum = functools.reduce(jnp.maximum, maxima)
        scales = [jnp.exp(chunk_maximum - maximum) for chunk_maximum in maxima]
        total = sum(scale * chunk_total for scale, chunk_total in zip(scales, totals))
        output = sum(scale * product for scale, product in zip(scales, products)) / total
        weights = jnp.exp(jnp.concatenate(scores, axis=-1) - maximum) / total
        output, weights = _mask_heads(output, weights, layer_head_mask)
        output = output.astype(self.dtype).reshape(batch, heads, beams, query_length, head_dim)
        output = output.transpose(0, 2, 3, 1, 4).reshape(rows, query_length, self.embed_dim)
        # Per position, for callers that return attentions: [rows, heads, t, max_length].
        weights = weights.reshape(batch, heads, beams, query_length, max_length, beams).sum(axis=-1)
        weights = weights.transpose(0, 2, 1, 3, 4).reshape(rows, heads, query_length, max_length)
        return self.out_proj(output), weights, new_cache


def _mask_heads(output: Array, weights: Array, layer_head_mask: Optional[Array]) -> tuple[Array, Array]:
    """output [batch, heads, q, head_dim] and weights [batch, heads, q, k] scaled per head by
    `layer_head_mask` [heads] (unchanged without one)."""
    if layer_head_mask is None:
        return output, weights
    per_head = layer_head_mask[None, :, None, None]
    return output * per_head.astype(output.dtype), weights * per_head.astype(weights.dtype)


def _beam_major(mask: Array, batch: int, beams: int) -> Array:
    """A per-row mask [rows, m, q, k] as [batch, m, beams, q, k] (rows = batch * beams, beams inner)."""
    return mask.reshape((batch, beams) + mask.shape[1:]).transpose(0, 2, 1, 3, 4)
