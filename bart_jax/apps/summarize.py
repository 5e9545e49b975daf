"""Batch summarization: tokenise, sort by length, pad to a few bucketed shapes, generate.

Shapes are bucketed so that a long job compiles a bounded number of times: the batch is
padded to a power of two (capped at `batch_size`) and the source length to the next of
LENGTH_BUCKETS (capped at the model's limit). Padding rows are dummy documents whose
outputs are dropped; padding columns are masked out, so neither changes any summary.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax.generation.generate import generate_static, resolve_generation_config
from bart_jax.model.registry import head_spec, heads_where

LENGTH_BUCKETS = (32, 64, 128, 256, 512, 768, 1024)


def bucket_length(length: int, max_length: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    """The smallest bucket >= length, capped at max_length."""
    for size in buckets:
        if size >= length:
            return min(size, max_length)
    return max_length


def bucket_batch(rows: int, batch_size: int) -> int:
    """The smallest power of two >= rows, capped at batch_size."""
    size = 1
    while size < rows:
        size *= 2
    return min(size, batch_size)


def batch_buckets(batch_size: int) -> list[int]:
    sizes, size = [], 1
    while size < batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [batch_size]


@dataclasses.dataclass
class SummaryStats:
    """Counters of a summarization job."""

    documents: int = 0
    empty: int = 0
    truncated: int = 0
    source_tokens: int = 0
    generated_tokens: int = 0
    batches: int = 0
    compiles: int = 0
    seconds: float = 0.0
    shapes: set = dataclasses.field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        result = dataclasses.asdict(self)
        result["shapes"] = sorted(self.shapes)
        return result


def _compiled_count() -> int:
    return generate_static._cache_size()  # noqa: SLF001 - jax's count of compiled specialisations


def tokenize_documents(tokenizer, texts: Sequence[str], max_source_length: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each text (`<s> ... </s>`), cut to max_source_length keeping the final `</s>`.

    Returns (ids per text, whether each text was truncated).
    """
    ids, truncated = [], []
    encoded = tokenizer(list(texts), truncation=False)["input_ids"] if texts else []
    for row in encoded:
        truncated.append(len(row) > max_source_length)
        ids.append(row[: max_source_length - 1] + [tokenizer.eos_token_id] if truncated[-1] else row)
    return ids, truncated


def pad_batch(rows: Sequence[Sequence[int]], batch: int, length: int, pad_token_id: int, filler: Sequence[int]):
    """Right-pads `rows` to [batch, length] ids and mask; missing rows repeat `filler`."""
    input_ids = np.full((batch, length), pad_token_id, np.int32)
    attention_mask = np.zeros((batch, length), np.int32)
    for index in range(batch):
        row = rows[index] if index < len(rows) else filler
        input_ids[index, : len(row)] = row
        attention_mask[index, : len(row)] = 1
    return input_ids, attention_mask


def source_limit(model, max_source_length: Optional[int]) -> int:
    limit = model.config.max_position_embeddings
    if model.tokenizer is not None:
        limit = min(limit, model.tokenizer.model_max_length)
    if max_source_length is not None:
        if max_source_length < 2:
            raise ValueError(f"max_source_length must be at least 2, got {max_source_length}")
        limit = min(limit, max_source_length)
    return limit


def iter_summaries(
    model,
    texts: Sequence[str],
    batch_size: int = 8,
    max_source_length: Optional[int] = None,
    seed: int = 0,
    stats: Optional[SummaryStats] = None,
    on_batch: Optional[Callable[[int, int], None]] = None,
    **options,
) -> Iterator[tuple[int, str]]:
    """Yields (index into texts, summary) as batches finish, longest documents first.

    `options` are generation options (num_beams, max_length, ...) over the model's
    generation_config. Empty texts give "" at once. `on_batch(documents, generated_tokens)`
    is called after each batch (progress bars). Counters accumulate into `stats`.
    """
    if not head_spec(model.head).generates or model.tokenizer is None:
        raise ValueError(f"summarization needs a {' or '.join(heads_where('generates'))} model with a tokenizer")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    stats = SummaryStats() if stats is None else stats
    config = resolve_generation_config(model.module, model.generation_config, **options)
    limit = source_limit(model, max_source_length)
    tokenizer = model.tokenizer

    non_empty = [i for i, text in enumerate(texts) if text.strip()]
    for index in sorted(set(range(len(texts))) - set(non_empty)):
        stats.documents += 1
        stats.empty += 1
        yield index, ""
    ids, truncated = tokenize_documents(tokenizer, [texts[i] for i in non_empty], limit)
    stats.truncated += sum(truncated)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    key = jax.random.PRNGKey(seed)
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        rows = [ids[i] for i in chunk]
        batch = bucket_batch(len(rows), batch_size)
        length = bucket_length(max(len(r) for r in rows), limit)
        # Filler rows copy a real document: a dummy row could decode longer than every real one.
        input_ids, attention_mask = pad_batch(rows, batch, length, tokenizer.pad_token_id, rows[0])
        compiled_before = _compiled_count()
        began = time.perf_counter()
        output = generate_static(model.module, model.params, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                                 config, jax.random.fold_in(key, start) if config.do_sample else None)
        sequences = np.asarray(output.sequences)
        stats.seconds += time.perf_counter() - began
        stats.compiles += _compiled_count() - compiled_before
        stats.shapes.add((batch, length))
        stats.batches += 1
        per_document = sequences.shape[0] // batch  # num_return_sequences rows each; the first is the best
        generated = 0
        for position, document in enumerate(chunk):
            tokens = sequences[position * per_document][1:]
            tokens = tokens[tokens != tokenizer.pad_token_id]
            generated += int(tokens.size)
            stats.documents += 1
            stats.source_tokens += len(ids[document])
            yield non_empty[document], tokenizer.decode(tokens, skip_special_tokens=True).strip()
        stats.generated_tokens += generated
        if on_batch is not None:
            on_batch(len(chunk), generated)


def summarize(model, texts: Sequence[str] | str, batch_size: int = 8, max_source_length: Optional[int] = None,
              seed: int = 0, **options) -> list[str] | str:
    """Summaries of `texts` in input order (a single string for a single text).

    `options` override the model's generation options (e.g. num_beams=4, max_length=142).
    """
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    summaries = [""] * len(texts)
    for index, summary in iter_summaries(model, texts, batch_size, max_source_length, seed, **options):
        summaries[index] = summary
    return summaries[0] if single else summaries


def warmup(model, batch_size: int, lengths: Sequence[int], **options) -> int:
    """Compiles generation ahead of time for every (batch bucket, length) shape; returns how
    many compilations that took. With the persistent compilation cache on, later processes
    load these executables instead of compiling."""
    config = resolve_generation_config(model.module, model.generation_config, **options)
    compiled = 0
    key = jax.random.PRNGKey(0) if config.do_sample else None
    for batch in batch_buckets(batch_size):
        for length in sorted(set(lengths)):
            shape = jax.ShapeDtypeStruct((batch, length), jnp.int32)
            generate_static.lower(model.module, model.params, shape, shape, config, key).compile()
            compiled += 1
    return compiled
