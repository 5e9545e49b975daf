"""Model-agnostic decoding loops: greedy search, sampling and beam search.

Each loop is one `lax.while_loop` over a static [rows, max_length] token buffer that exits
as soon as every row is done. The model is seen only through

    tokens_to_logits(token_ids [rows, 1], cache, step) -> (scores [rows, vocab] float32, new_cache)

where `step` (int32 scalar) is the position of `token_ids` in the sequence and `cache` is any
pytree the model needs. Beam search continues some rows' hypotheses in other rows with
`reorder_cache(cache, row_indices [rows]) -> cache`; the default gathers every leaf along its
leading (rows) axis, and a model with a cheaper scheme passes its own. The cache passed in must
already hold every prompt token but the last (nothing, for a one-token decoder prompt).

The semantics are transformers' `_sample` and `_beam_search` (vectorised beam search: 2 x beams
candidates per step, finished hypotheses kept best first); the config must be resolved
(`GenerationConfig.resolve`) so that lengths are absolute. `kernels` chooses how top-k and argmax
over the vocabulary run (bart_jax/model/kernels/top_k.py); the ids are the same.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bart_jax.generation.config import GenerationConfig
from bart_jax.generation.logits_processors import LogitsProcessor, build_logits_processors, chain, divide
from bart_jax.model.kernels.top_k import argmax, top_k

Array = jax.Array
TokensToLogits = Callable[[Array, Any, Array], tuple[Array, Any]]
ReorderCache = Callable[[Any, Array], Any]

# transformers' stand-in for "impossible" in beam bookkeeping; kept identical so that ties
# and sums round the same way.
BIG_NEGATIVE = np.float32(-1.0e9)


class SearchOutput(NamedTuple):
    """sequences: [rows, max_length] int32 (prompt first, pad after each row's end);
    lengths: [rows] int32, tokens per row (the prompt included);
    scores: [rows] float32 length-normalised beam scores (None for greedy search and sampling)."""

    sequences: Array
    lengths: Array
    scores: Optional[Array] = None


def _check(config: GenerationConfig, prompt_ids: Array):
    if not config.is_resolved:
        raise ValueError("the search needs a resolved GenerationConfig (see GenerationConfig.resolve)")
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] >= config.max_length:
        raise ValueError(
            f"prompt_ids must be [batch, prompt_length] with prompt_length < max_length ({config.max_length}), "
            f"got shape {prompt_ids.shape}"
        )


def _is_eos(tokens: Array, eos_token_ids: tuple[int, ...]) -> Array:
    """tokens [...] -> [...] bool."""
    if not eos_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_token_ids, tokens.dtype))


def _prompt_buffer(prompt_ids: Array, max_length: int, fill_value: int) -> Array:
    """[rows, prompt_length] -> [rows, max_length] int32, filled after the prompt."""
    rows, prompt_length = prompt_ids.shape
    buffer = jnp.full((rows, max_length), fill_value, jnp.int32)
    return buffer.at[:, :prompt_length].set(prompt_ids.astype(jnp.int32))


# --------------------------------------------------------------------------------------
# Greedy search and sampling
# --------------------------------------------------------------------------------------
def sample_search(
    tokens_to_logits: TokensToLogits,
    cache: Any,
    prompt_ids: Array,
    config: GenerationConfig,
    prng_key: Optional[Array] = None,
    processor: Optional[LogitsProcessor] = None,
    kernels: str = "auto",
) -> SearchOutput:
    """Greedy search (`config.do_sample=False`) or multinomial sampling, one token per row and step.

    prompt_ids: [rows, prompt_length]; cache leaves: [rows, ...]. Rows that reached EOS are
    continued with `pad_token_id`, as transformers does. `processor` defaults to the
    processors/warpers of `config`. Returns SearchOutput with scores=None.
    """
    _check(config, prompt_ids)
    if config.do_sample and prng_key is None:
        raise ValueError("sampling (do_sample=True) needs a prng_key")
    processor = processor or chain(build_logits_processors(config))
    rows, prompt_length = prompt_ids.shape
    max_length = config.max_length
    eos_ids = config.eos_token_ids
    pad = config.pad_token_id if config.pad_token_id is not None else 0

    def step(state):
        sequences, lengths, unfinished, cache, cur_len = state
        last = lax.dynamic_slice_in_dim(sequences, cur_len - 1, 1, axis=1)  # [rows, 1]
        logits, cache = tokens_to_logits(last, cache, cur_len - 1)  # [rows, vocab]
        scores = processor(sequences, cur_len, logits.astype(jnp.float32))  # [rows, vocab]
        if config.do_sample:
            key = jax.random.fold_in(prng_key, cur_len)
            tokens = jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)  # [rows]
        else:
            tokens = argmax(scores, kernels)  # [rows]
        if eos_ids:
            tokens = jnp.where(unfinished, tokens, pad)  # [rows]
        sequences = lax.dynamic_update_slice_in_dim(sequences, tokens[:, None], cur_len, axis=1)
        lengths = jnp.where(unfinished, cur_len + 1, lengths)  # [rows]
        unfinished = unfinished & ~_is_eos(tokens, eos_ids) & (cur_len + 1 < max_length)  # [rows]
        return sequences, lengths, unfinished, cache, cur_len + 1

    def not_done(state):
        return jnp.any(state[2])

    state = (
        _prompt_buffer(prompt_ids, max_length, pad),  # sequences [rows, max_length]
        jnp.full((rows,), prompt_length, jnp.int32),  # lengths [rows]
        jnp.ones((rows,), bool),  # unfinished [rows]
        cache,
        jnp.asarray(prompt_length, jnp.int32),  # cur_len
    )
    sequences, lengths, _, _, _ = lax.while_loop(not_done, step, state)
    return SearchOutput(sequences, lengths)


def greedy_search(tokens_to_logits, cache, prompt_ids, config, processor=None, kernels: str = "auto") -> SearchOutput:
    """`sample_search` with the argmax token (config.do_sample must be False)."""
    if config.do_sample:
        raise ValueError("greedy_search needs do_sample=False; use sample_search")
    return sample_search(tokens_to_logits, cache, prompt_ids, config, None, processor, kernels)


# --------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------
def _gather_beams(values: Array, indices: Array) -> Array:
    """values [batch, beams, ...], indices [batch, k] -> [batch, k, ...]."""
    return jax.vmap(lambda v, i: v[i])(values, indices)


def _length_normalisers(max_length: int, length_penalty: float) -> Array:
    """[max_length + 1] float32: n ** length_penalty for n = 0..max_length.

    Computed in double precision then rounded, as transformers' Python scalar is.
    """
    with np.errstate(divide="ignore"):
        return jnp.asarray(np.arange(max_length + 1, dtype=np.float64) ** length_penalty, jnp.float32)


class BeamState(NamedTuple):
    running_sequences: Array  # [batch, beams, max_length]
    running_scores: Array  # [batch, beams] accumulated log-probs
    sequences: Array  # [batch, beams, max_length] finished hypotheses, best first
    scores: Array  # [batch, beams] their length-normalised scores
    lengths: Array  # [batch, beams] their lengths
    is_finished: Array  # [batch, beams] bool, slot holds a real hypothesis
    can_improve: Array  # [batch, 1] bool, running beams may still beat the finished ones
    all_candidates_stopped: Array  # [] bool, every candidate of the last step hit a stopping criterion
    cache: Any  # the model's cache for batch * beams rows
    cur_len: Array  # [] int32


def gather_cache_rows(cache: Any, row_indices: Array) -> Any:
    """Row r of every cache leaf [rows, ...] becomes row `row_indices[r]`."""
    return jax.tree_util.tree_map(lambda leaf: jnp.take(leaf, row_indices, axis=0, mode="clip"), cache)


def beam_search(
    tokens_to_logits: TokensToLogits,
    cache: Any,
    prompt_ids: Array,
    config: GenerationConfig,
    prng_key: Optional[Array] = None,
    processor: Optional[LogitsProcessor] = None,
    reorder_cache: ReorderCache = gather_cache_rows,
    kernels: str = "auto",
) -> SearchOutput:
    """Beam search (or beam sampling with `config.do_sample`), transformers' vectorised algorithm.

    prompt_ids: [batch, prompt_length]; cache: for batch * num_beams rows (beams inner).
    Processors see log-softmaxed scores. Returns the `num_return_sequences` best finished
    hypotheses per input, best first: sequences [batch * num_return_sequences, max_length],
    lengths and scores [batch * num_return_sequences].
    """
    _check(config, prompt_ids)
    if config.do_sample and prng_key is None:
        raise ValueError("beam sampling (do_sample=True) needs a prng_key")
    processor = processor or chain(build_logits_processors(config))
    batch, prompt_length = prompt_ids.shape
    beams, max_length = config.num_beams, config.max_length
    eos_ids = config.eos_token_ids
    # Keep enough candidates that `beams` of them are live even if the best ones all end here.
    keep = max(2, 1 + len(eos_ids)) * beams
    is_top_beam = jnp.arange(keep) < beams  # [keep]
    early_stopping = config.early_stopping
    normaliser = _length_normalisers(max_length, config.length_penalty)  # [max_length + 1]
    # transformers fills with `pad_token_id or eos_token_id[0]` (an EOS id when pad is 0 or unset).
    if eos_ids:
        fill = config.pad_token_id if config.pad_token_id else eos_ids[0]
    else:
        fill = -1
    batch_offsets = (jnp.arange(batch) * beams)[:, None]  # [batch, 1]

    def step(state: BeamState) -> BeamState:
        cur_len = state.cur_len
        flat_sequences = state.running_sequences.reshape(batch * beams, max_length)  # [batch*beams, max_length]
        last = lax.dynamic_slice_in_dim(flat_sequences, cur_len - 1, 1, axis=1)  # [batch*beams, 1]
        logits, cache = tokens_to_logits(last, state.cache, cur_len - 1)  # [batch*beams, vocab]
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [batch*beams, vocab]
        log_probs = processor(flat_sequences, cur_len, log_probs)  # [batch*beams, vocab]
        log_probs = log_probs.reshape(batch, beams, vocab) + state.running_scores[:, :, None]  # [batch, beams, vocab]
        log_probs = log_probs.reshape(batch, beams * vocab)  # [batch, beams*vocab]

        # a. The `keep` best (or sampled) continuations over all beams.
        if config.do_sample:
            # Gumbel top-k draws `keep` candidates without replacement from softmax(log_probs).
            key = jax.random.fold_in(prng_key, cur_len)
            _, drawn = top_k(log_probs + jax.random.gumbel(key, log_probs.shape), keep, kernels)  # [batch, keep]
            topk_scores, order = lax.top_k(jnp.take_along_axis(log_probs, drawn, axis=1), keep)  # [batch, keep]
            topk_indices = jnp.take_along_axis(drawn, order, axis=1)  # [batch, keep]
        else:
            topk_scores, topk_indices = top_k(log_probs, keep, kernels)  # [batch, keep]
        topk_source_beams = topk_indices // vocab  # [batch, keep]
        topk_tokens = (topk_indices % vocab).astype(jnp.int32)  # [batch, keep]
        topk_sequences = _gather_beams(state.running_sequences, topk_source_beams)  # [batch, keep, max_length]
        topk_sequences = lax.dynamic_update_slice_in_dim(topk_sequences, topk_tokens[:, :, None], cur_len, axis=2)

        # b. Which candidates are complete (EOS, or the buffer is full).
        stopped = _is_eos(topk_tokens, eos_ids) | (cur_len + 1 >= max_length)  # [batch, keep]

        # c. The best `beams` unfinished candidates run on.
        live_scores = topk_scores + stopped.astype(jnp.float32) * BIG_NEGATIVE  # [batch, keep]
        next_beams = lax.top_k(live_scores, beams)[1]  # [batch, beams]
        running_sequences = _gather_beams(topk_sequences, next_beams)  # [batch, beams, max_length]
        running_scores = _gather_beams(live_scores, next_beams)  # [batch, beams]
        source_rows = _gather_beams(topk_source_beams, next_beams) + batch_offsets  # [batch, beams]

        # d. Finished candidates among the top `beams` join the finished hypotheses if good enough.
        just_finished = stopped & is_top_beam[None, :]  # [batch, keep]
        candidate_scores = divide(topk_scores, normaliser[cur_len + 1 - prompt_length])  # [batch, keep]
        batch_is_full = jnp.all(state.is_finished, axis=-1, keepdims=True) & (early_stopping is True)  # [batch, 1]
        candidate_scores += batch_is_full.astype(jnp.float32) * BIG_NEGATIVE
        candidate_scores += (~state.can_improve).astype(jnp.float32) * BIG_NEGATIVE
        candidate_scores += (~just_finished).astype(jnp.float32) * BIG_NEGATIVE
        merged_scores = jnp.concatenate([state.scores, candidate_scores], axis=1)  # [batch, beams + keep]
        best = lax.top_k(merged_scores, beams)[1]  # [batch, beams]
        candidate_lengths = jnp.broadcast_to(cur_len + 1, (batch, keep))  # [batch, keep]
        sequences = _gather_beams(jnp.concatenate([state.sequences, topk_sequences], axis=1), best)
        scores = _gather_beams(merged_scores, best)  # [batch, beams]
        lengths = _gather_beams(jnp.concatenate([state.lengths, candidate_lengths], axis=1), best)
        is_finished = _gather_beams(jnp.concatenate([state.is_finished, just_finished], axis=1), best)

        # e. Keep the cache of the beams that run on.
        flat_rows = source_rows.reshape(batch * beams)  # [batch*beams]
        cache = reorder_cache(cache, flat_rows)

        # f. Can any running beam still beat the worst finished hypothesis? (transformers' heuristic)
        cur_len = cur_len + 1
        if early_stopping == "never" and config.length_penalty > 0.0:
            best_length = max_length - prompt_length
        else:
            best_length = cur_len - prompt_length
        best_running = divide(running_scores[:, :1], normaliser[best_length])  # [batch, 1]
        worst_finished = jnp.where(is_finished, jnp.min(scores, axis=1, keepdims=True), BIG_NEGATIVE)  # [batch, beams]
        can_improve = state.can_improve & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        return BeamState(running_sequences, running_scores, sequences, scores, lengths, is_finished,
                         can_improve, jnp.all(stopped), cache, cur_len)

    def not_done(state: BeamState) -> Array:
        open_beam = ~(jnp.all(state.is_finished) & (early_stopping is True))
        return jnp.any(state.can_improve) & open_beam & ~state.all_candidates_stopped

    prompt = jnp.repeat(_prompt_buffer(prompt_ids, max_length, fill)[:, None], beams, axis=1)  # [batch, beams, L]
    # Only the first beam starts live, so that the beams do not all pick the same tokens.
    running_scores = jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(BIG_NEGATIVE)
    state = BeamState(
        running_sequences=prompt,
        running_scores=running_scores,
        sequences=prompt,
        scores=jnp.full((batch, beams), BIG_NEGATIVE, jnp.float32),
        lengths=jnp.full((batch, beams), prompt_length, jnp.int32),
        is_finished=jnp.zeros((batch, beams), bool),
        can_improve=jnp.ones((batch, 1), bool),
        all_candidates_stopped=jnp.asarray(False),
        cache=cache,
        cur_len=jnp.asarray(prompt_length, jnp.int32),
    )
    state = lax.while_loop(not_done, step, state)
    returned = config.num_return_sequences
    return SearchOutput(
        sequences=state.sequences[:, :returned].reshape(batch * returned, max_length),
        lengths=state.lengths[:, :returned].reshape(batch * returned),
        scores=state.scores[:, :returned].reshape(batch * returned),
    )


def search(tokens_to_logits, cache, prompt_ids, config, prng_key=None, processor=None,
           reorder_cache: ReorderCache = gather_cache_rows, kernels: str = "auto") -> SearchOutput:
    """Greedy search, sampling or beam search, as `config` (resolved) asks.

    Rows of `prompt_ids` and of the cache: [batch * num_return_sequences] for greedy search and
    sampling, prompt [batch] and cache [batch * num_beams] for beam search.
    """
    if config.num_beams > 1:
        return beam_search(tokens_to_logits, cache, prompt_ids, config, prng_key, processor, reorder_cache, kernels)
    return sample_search(tokens_to_logits, cache, prompt_ids, config, prng_key, processor, kernels)
