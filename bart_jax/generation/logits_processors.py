"""Logits processors and sampling warpers, vectorised and jit-safe (transformers' math).

A processor is a function `(sequences, cur_len, scores) -> scores`:
  sequences: [rows, max_length] int32, the tokens so far in a static buffer; only the first
             `cur_len` positions are real (the rest is filler and is ignored).
  cur_len:   int32 scalar, the number of tokens so far (the decoder prompt included).
  scores:    [rows, vocab] float32, the next-token scores (logits, or log-probs in beam search).
Lengths are decoder lengths, as transformers counts them (the decoder start token included).
`build_logits_processors(config)` lists them in the order transformers' `generate` applies them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bart_jax.generation.config import GenerationConfig

Array = jax.Array
LogitsProcessor = Callable[[Array, Array, Array], Array]

NEG_INF = -jnp.inf


def divide(numerator: Array, divisor) -> Array:
    """numerator / divisor (a scalar), rounded as a true division, as torch rounds it.

    XLA rewrites a division by a broadcast scalar into a multiplication by its reciprocal,
    which can differ in the last bit; dividing by a materialised array keeps the division.
    """
    divisor = jnp.broadcast_to(jnp.asarray(divisor, numerator.dtype), numerator.shape)
    return numerator / lax.optimization_barrier(divisor)


def _token_mask(sequences: Array, valid: Array, vocab_size: int) -> Array:
    """[rows, vocab] bool: which tokens occur at the `valid` positions ([rows, length] bool) of `sequences`."""
    rows = jnp.arange(sequences.shape[0])[:, None]  # [rows, 1]
    # Invalid positions are sent to a spare column past the vocab, dropped at the end.
    columns = jnp.where(valid, jnp.clip(sequences, 0, vocab_size), vocab_size)  # [rows, length]
    mask = jnp.zeros((sequences.shape[0], vocab_size + 1), bool).at[rows, columns].set(True)  # [rows, vocab + 1]
    return mask[:, :vocab_size]


def _vocab_mask(token_ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """[vocab] bool constant, True at `token_ids` (ids beyond the vocab are ignored, as torch.isin does)."""
    mask = np.zeros(vocab_size, bool)
    mask[[t for t in token_ids if t < vocab_size]] = True
    return mask


def repetition_penalty(penalty: float) -> LogitsProcessor:
    """Divides positive / multiplies negative scores of tokens already in the sequence."""
    penalty = np.float32(penalty)

    def process(sequences, cur_len, scores):
        valid = jnp.arange(sequences.shape[1])[None, :] < cur_len  # [1, max_length]
        seen = _token_mask(sequences, jnp.broadcast_to(valid, sequences.shape), scores.shape[-1])  # [rows, vocab]
        penalised = jnp.where(scores < 0, scores * penalty, divide(scores, penalty))  # [rows, vocab]
        return jnp.where(seen, penalised, scores)

    return process


def no_repeat_ngram(ngram_size: int) -> LogitsProcessor:
    """Bans every token that would complete an n-gram already present in the sequence.

    The last `ngram_size - 1` tokens are compared with every window of the sequence at
    once; a matching window bans the token that followed it.
    """
    n = ngram_size

    def process(sequences, cur_len, scores):
        rows, max_length = sequences.shape
        windows = max_length - n + 1  # window starts 0 .. max_length - n
        if windows <= 0:
            return scores
        prefix_start = jnp.maximum(cur_len + 1 - n, 0)
        prefix = lax.dynamic_slice_in_dim(sequences, prefix_start, n - 1, axis=1)  # [rows, n - 1]
        matches = jnp.ones((rows, windows), bool)  # [rows, windows]
        for offset in range(n - 1):
            matches &= sequences[:, offset:offset + windows] == prefix[:, offset:offset + 1]
        # A window must lie inside the sequence so far: start + n <= cur_len.
        complete = jnp.arange(windows)[None, :] <= cur_len - n  # [1, windows]
        banned = _token_mask(sequences[:, n - 1:], matches & complete, scores.shape[-1])  # [rows, vocab]
        return jnp.where(banned, NEG_INF, scores)

    return process


def bad_words(bad_words_ids: Sequence[Sequence[int]], eos_token_ids: Sequence[int] = ()) -> LogitsProcessor:
    """-inf for each token that would complete one of `bad_words_ids` (single tokens always).

    As transformers, a bad word that is exactly one EOS id is dropped (EOS stays allowed), and
    the ban is an additive -inf bias.
    """
    words = [tuple(w) for w in bad_words_ids if not (len(w) == 1 and w[0] in eos_token_ids)]
    single = [w[0] for w in words if len(w) == 1]
    by_prefix_length: dict[int, list[tuple[int, ...]]] = {}
    for word in words:
        if len(word) > 1:
            by_prefix_length.setdefault(len(word) - 1, []).append(word)

    def process(sequences, cur_len, scores):
        rows, vocab_size = scores.shape
        # Checked when traced (the vocabulary is a static shape): out of range, the scatter below
        # would drop the ban without a word, where transformers refuses it.
        outside = sorted({t for word in words for t in word if t >= vocab_size})
        if outside:
            raise ValueError(f"bad_words_ids holds token ids outside the vocabulary [0, {vocab_size}): {outside[:10]}")
        always = np.zeros(vocab_size, np.float32)
        always[list(single)] = -np.inf
        bias = jnp.broadcast_to(jnp.asarray(always), scores.shape)  # [rows, vocab]
        for prefix_length, group in by_prefix_length.items():
            prefixes = jnp.asarray([w[:-1] for w in group], jnp.int32)  # [words, prefix_length]
            last_tokens = jnp.asarray([w[-1] for w in group], jnp.int32)  # [words]
            start = jnp.maximum(cur_len - prefix_length, 0)
            tail = lax.dynamic_slice_in_dim(sequences, start, prefix_length, axis=1)  # [rows, prefix_length]
            matching = jnp.all(tail[:, None, :] == prefixes[None], axis=-1) & (cur_len >= prefix_length)
            word_bias = jnp.where(matching, -jnp.inf, 0.0).astype(scores.dtype)  # [rows, words]
            bias = bias.at[:, last_tokens].add(word_bias)
        return scores + bias

    return process


def min_length(length: int, eos_token_ids: Sequence[int]) -> LogitsProcessor:
    """-inf for EOS while the sequence is shorter than `length` (which counts the decoder prompt)."""
    eos_ids = tuple(eos_token_ids)

    def process(sequences, cur_len, scores):
        eos = jnp.asarray(_vocab_mask(eos_ids, scores.shape[-1]))  # [vocab]
        return jnp.where(eos & (cur_len < length), NEG_INF, scores)

    return process


def _force_tokens(scores: Array, token_ids: Sequence[int], active: Array) -> Array:
    """When `active`: 0 for `token_ids`, -inf for every other token."""
    forced = jnp.where(jnp.asarray(_vocab_mask(token_ids, scores.shape[-1])), 0.0, NEG_INF)  # [vocab]
    return jnp.where(active, forced.astype(scores.dtype), scores)


def forced_bos_token(token_id: int) -> LogitsProcessor:
    """Forces `token_id` as the first generated token (transformers tests `cur_len == 1`)."""

    def process(sequences, cur_len, scores):
        return _force_tokens(scores, (token_id,), cur_len == 1)

    return process


def forced_eos_token(max_length: int, eos_token_ids: Sequence[int]) -> LogitsProcessor:
    """Forces an EOS id as the token that makes the sequence `max_length` long."""
    eos_ids = tuple(eos_token_ids)

    def process(sequences, cur_len, scores):
        return _force_tokens(scores, eos_ids, cur_len == max_length - 1)

    return process


def suppress_tokens(token_ids: Sequence[int]) -> LogitsProcessor:
    """-inf for `token_ids` at every step."""
    token_ids = tuple(token_ids)

    def process(sequences, cur_len, scores):
        return jnp.where(jnp.asarray(_vocab_mask(token_ids, scores.shape[-1])), NEG_INF, scores)

    return process


def temperature(value: float) -> LogitsProcessor:
    value = np.float32(value)

    def process(sequences, cur_len, scores):
        return divide(scores, value)

    return process


def top_k(k: int, min_tokens_to_keep: int = 1) -> LogitsProcessor:
    """Keeps the scores at least as high as the k-th highest; -inf elsewhere."""
    k = max(k, min_tokens_to_keep)

    def process(sequences, cur_len, scores):
        kth_highest = lax.top_k(scores, min(k, scores.shape[-1]))[0][..., -1:]  # [rows, 1]
        return jnp.where(scores < kth_highest, NEG_INF, scores)

    return process


def top_p(p: float, min_tokens_to_keep: int = 1) -> LogitsProcessor:
    """Nucleus filtering: keeps the smallest set of top tokens whose probability exceeds `p`."""
    threshold = np.float32(1 - p)

    def process(sequences, cur_len, scores):
        order = jnp.argsort(scores, axis=-1)  # [rows, vocab], ascending
        ascending = jnp.take_along_axis(scores, order, axis=-1)  # [rows, vocab]
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)  # [rows, vocab]
        remove = cumulative <= threshold  # [rows, vocab], in ascending order
        remove = remove.at[:, -min_tokens_to_keep:].set(False)
        rows = jnp.arange(scores.shape[0])[:, None]
        remove = jnp.zeros_like(remove).at[rows, order].set(remove)  # back to vocabulary order
        return jnp.where(remove, NEG_INF, scores)

    return process


def chain(processors: Sequence[LogitsProcessor]) -> LogitsProcessor:
    """Applies `processors` left to right."""
    processors = tuple(processors)

    def process(sequences, cur_len, scores):
        for processor in processors:
            scores = processor(sequences, cur_len, scores)
        return scores

    return process


def build_logits_processors(config: GenerationConfig) -> list[LogitsProcessor]:
    """The processors (then sampling warpers) transformers' `generate` builds for `config`, in its order.

    `config` must be resolved (`GenerationConfig.resolve`): lengths are absolute.
    """
    if not config.is_resolved:
        raise ValueError("build_logits_processors needs a resolved GenerationConfig (see GenerationConfig.resolve)")
    eos = config.eos_token_ids
    processors = []
    if config.repetition_penalty != 1.0:
        processors.append(repetition_penalty(config.repetition_penalty))
    if config.no_repeat_ngram_size > 0:
        processors.append(no_repeat_ngram(config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        processors.append(bad_words(config.bad_words_ids, eos))
    if config.min_length > 0 and eos:
        processors.append(min_length(config.min_length, eos))
    if config.forced_bos_token_id is not None:
        processors.append(forced_bos_token(config.forced_bos_token_id))
    if config.forced_eos_token_id is not None:
        processors.append(forced_eos_token(config.max_length, config.forced_eos_token_ids))
    if config.suppress_tokens is not None:
        processors.append(suppress_tokens(config.suppress_tokens))
    if config.do_sample:
        # Beam sampling keeps one token more than there are EOS ids, so that a beam can go on.
        keep = len(eos) + 1 if config.num_beams > 1 and eos else (2 if config.num_beams > 1 else 1)
        if config.temperature != 1.0:
            processors.append(temperature(config.temperature))
        if config.top_k != 0:
            processors.append(top_k(config.top_k, keep))
        if config.top_p < 1.0:
            processors.append(top_p(config.top_p, keep))
    return processors
