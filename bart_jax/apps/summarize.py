"""Batch summarization: tokenise, sort by length, pad to a few bucketed shapes, generate.

Shapes are bucketed so that a long job compiles a bounded number of times: the batch is
padded to a power of two (capped at `batch_size`) and the source length to the next of
LENGTH_BUCKETS (capped at the model's limit). Padding rows are dummy documents whose
outputs are dropped; padding columns are masked out, so neither changes any summary.

On a device mesh (parameters placed by `load_pretrained(..., mesh=mesh)`) the rows of each
batch are split over the mesh's batch axes (`bart_jax.parallel.batch_shards`): batches are
padded to a multiple of that many rows and generated through `bart_jax.parallel.jit_generate`.
The summaries are those of one device.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax import parallel
from bart_jax.generation.generate import generate_static, resolve_generation_config
from bart_jax.model.registry import head_spec, heads_where

LENGTH_BUCKETS = (32, 64, 128, 256, 512, 768, 1024)


def bucket_length(length: int, max_length: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    """The smallest bucket >= length, capped at max_length."""
    for size in buckets:
        if size >= length:
            return min(size, max_length)
    return max_length


def bucket_batch(rows: int, batch_size: int, shards: int = 1) -> int:
    """The smallest power of two >= rows, capped at batch_size; with `shards` batch shards,
    that many times the bucket of the rows per shard (batch_size rounded up to a multiple)."""
    per_shard, limit = -(-rows // shards), -(-batch_size // shards)
    size = 1
    while size < per_shard:
        size *= 2
    return min(size, limit) * shards


def batch_buckets(batch_size: int, shards: int = 1) -> list[int]:
    """Every batch size `bucket_batch` gives."""
    return sorted({bucket_batch(rows, batch_size, shards) for rows in range(1, batch_size + 1)})


@dataclasses.dataclass
class Summary:
    """The generated sequences of one document, best first (`num_return_sequences` of them):
    their text (as `batch_decode(..., skip_special_tokens=True)`), their token ids (without the
    decoder start token and padding) and, from beam search, their scores (else None)."""

    texts: list[str]
    token_ids: list[list[int]]
    scores: Optional[list[float]] = None

    @property
    def text(self) -> str:
        return self.texts[0]


@dataclasses.dataclass
class SummaryStats:
    """Counters of a summarization job. `compiles` counts executables compiled, `cache_hits`
    those loaded from the persistent compilation cache instead; `padded_source_tokens` the
    source positions of every generated batch, padding rows and columns included."""

    documents: int = 0
    empty: int = 0
    truncated: int = 0
    source_tokens: int = 0
    padded_source_tokens: int = 0
    generated_tokens: int = 0
    batches: int = 0
    compiles: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    shapes: set = dataclasses.field(default_factory=set)

    @property
    def padding_efficiency(self) -> float:
        """Real source tokens / padded source tokens of the generated batches."""
        return self.source_tokens / self.padded_source_tokens if self.padded_source_tokens else 1.0

    def as_dict(self) -> dict[str, Any]:
        result = dataclasses.asdict(self)
        result["shapes"] = sorted(self.shapes)
        result["padding_efficiency"] = round(self.padding_efficiency, 4)
        return result


class CompileCounter:
    """Counts, through `jax.monitoring`, executables built by compiling and those loaded from
    the persistent compilation cache (JAX reports both as a backend compile; a load also as a
    cache hit)."""

    executables = 0
    cache_hits = 0
    _registered = False

    @classmethod
    def register(cls) -> None:
        if cls._registered:
            return
        cls._registered = True

        def on_duration(event: str, duration: float, **kwargs) -> None:
            if event == "/jax/core/compile/backend_compile_duration":
                cls.executables += 1

        def on_event(event: str, **kwargs) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                cls.cache_hits += 1

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)

    @classmethod
    def snapshot(cls) -> tuple[int, int]:
        cls.register()
        return cls.executables, cls.cache_hits

    @classmethod
    def add_since(cls, before: tuple[int, int], stats: "SummaryStats") -> None:
        executables, hits = cls.executables - before[0], cls.cache_hits - before[1]
        stats.compiles += executables - hits
        stats.cache_hits += hits


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


def params_mesh(params) -> Optional[jax.sharding.Mesh]:
    """The mesh `params` are placed on (`load_pretrained(..., mesh=...)`); None on one device."""
    leaf = jax.tree_util.tree_leaves(params)[0]
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
        return sharding.mesh
    return None




def generation_function(model, config, mesh: Optional[jax.sharding.Mesh]) -> Callable:
    """`generate(params, input_ids, attention_mask, prng_key)` for `config`: `generate_static`
    on one device, `parallel.jit_generate` on a mesh."""
    if mesh is None:
        return lambda params, input_ids, attention_mask, key: generate_static(
            model.module, params, jnp.asarray(input_ids), jnp.asarray(attention_mask), config, key)
    shardings = jax.tree_util.tree_map(lambda leaf: leaf.sharding, model.params)
    return parallel.jit_generate(model.module, mesh, shardings, config)


def _model_mesh(model, batch_size: int, mesh: Optional[jax.sharding.Mesh]) -> Optional[jax.sharding.Mesh]:
    """Checks the model and batch size; returns the mesh to run on (default: the parameters')."""
    if not head_spec(model.head).generates or model.tokenizer is None:
        raise ValueError(f"summarization needs a {' or '.join(heads_where('generates'))} model with a tokenizer")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    placed = params_mesh(model.params)
    if mesh is not None and mesh.size > 1 and placed != mesh:
        raise ValueError("the model's parameters are not placed on this mesh: load the model with "
                         "load_pretrained(..., mesh=mesh) or place them with bart_jax.parallel.shard_pretrained")
    return placed if mesh is None or mesh.size == 1 else mesh


def _summary(sequences: np.ndarray, scores: Optional[np.ndarray], first: int, count: int, tokenizer) -> Summary:
    token_ids = []
    for row in range(first, first + count):
        tokens = sequences[row][1:]
        token_ids.append(tokens[tokens != tokenizer.pad_token_id].tolist())
    return Summary(tokenizer.batch_decode(token_ids, skip_special_tokens=True), token_ids,
                   None if scores is None else [float(score) for score in scores[first: first + count]])


def iter_summaries(
    model,
    texts: Sequence[str],
    batch_size: int = 8,
    max_source_length: Optional[int] = None,
    seed: int = 0,
    stats: Optional[SummaryStats] = None,
    on_batch: Optional[Callable[[int, int], None]] = None,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    details: bool = False,
    **options,
) -> Iterator[tuple[int, Any]]:
    """Yields (index into texts, summary text) as batches finish, longest documents first; with
    `details`, (index, `Summary`) with every returned sequence, its ids and its score.

    `options` are generation options (num_beams, max_length, ...) over the model's
    generation_config. Empty texts give "" at once. `on_batch(documents, generated_tokens)`
    is called after each batch (progress bars). Counters accumulate into `stats`. `mesh`
    defaults to the one the model's parameters are placed on.
    """
    mesh = _model_mesh(model, batch_size, mesh)
    stats = SummaryStats() if stats is None else stats
    config = resolve_generation_config(model.module, model.generation_config, **options)
    limit = source_limit(model, max_source_length)
    tokenizer = model.tokenizer
    shards = 1 if mesh is None else parallel.batch_shards(mesh)
    generate = generation_function(model, config, mesh)
    returned = config.num_return_sequences

    non_empty = [i for i, text in enumerate(texts) if text.strip()]
    for index in sorted(set(range(len(texts))) - set(non_empty)):
        stats.documents += 1
        stats.empty += 1
        yield index, Summary([""] * returned, [[] for _ in range(returned)]) if details else ""
    ids, truncated = tokenize_documents(tokenizer, [texts[i] for i in non_empty], limit)
    largest = max((max(row) for row in ids if row), default=-1)
    if largest >= model.config.vocab_size:
        # On one device an id past the table would be clamped, not refused.
        raise ValueError(f"the tokenizer gives token id {largest}, outside the model's vocabulary "
                         f"[0, {model.config.vocab_size}); it does not belong to this model")
    stats.truncated += sum(truncated)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    key = jax.random.PRNGKey(seed)
    step = bucket_batch(batch_size, batch_size, shards)
    for start in range(0, len(order), step):
        chunk = order[start: start + step]
        rows = [ids[i] for i in chunk]
        batch = bucket_batch(len(rows), batch_size, shards)
        length = bucket_length(max(len(r) for r in rows), limit)
        # Filler rows copy a real document: a dummy row could decode longer than every real one.
        input_ids, attention_mask = pad_batch(rows, batch, length, tokenizer.pad_token_id, rows[0])
        batch_key = np.asarray(jax.random.fold_in(key, start)) if config.do_sample else None
        compiled_before = CompileCounter.snapshot()
        began = time.perf_counter()
        output = generate(model.params, input_ids, attention_mask, batch_key)
        sequences = np.asarray(output.sequences)
        scores = None if output.scores is None else np.asarray(output.scores)
        stats.seconds += time.perf_counter() - began
        CompileCounter.add_since(compiled_before, stats)
        stats.shapes.add((batch, length))
        stats.batches += 1
        stats.padded_source_tokens += batch * length
        per_document = sequences.shape[0] // batch  # num_return_sequences rows each, best first
        generated = 0
        for position, document in enumerate(chunk):
            summary = _summary(sequences, scores, position * per_document, per_document, tokenizer)
            generated += len(summary.token_ids[0])
            stats.documents += 1
            stats.source_tokens += len(ids[document])
            yield non_empty[document], summary if details else summary.text
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


def warmup(model, batch_size: int, lengths: Sequence[int], *, mesh: Optional[jax.sharding.Mesh] = None,
           stats: Optional[SummaryStats] = None, **options) -> int:
    """Compiles generation ahead of time for every (batch bucket, length) shape; returns how
    many shapes that was (`stats` counts compilations and persistent cache hits). With the
    persistent compilation cache on, later processes load these executables instead of
    compiling. On a mesh (default: the one of the model's parameters) the sharded generation is
    compiled. Lengths must be positive and at most the model's `max_position_embeddings`."""
    too_long = [n for n in lengths if not 1 <= n <= model.config.max_position_embeddings]
    if too_long:
        raise ValueError(f"warmup lengths must be in 1..{model.config.max_position_embeddings} "
                         f"(max_position_embeddings), got {too_long}")
    mesh = _model_mesh(model, batch_size, mesh)
    config = resolve_generation_config(model.module, model.generation_config, **options)
    shards = 1 if mesh is None else parallel.batch_shards(mesh)
    stats = SummaryStats() if stats is None else stats
    shapes = 0
    key = jax.random.PRNGKey(0) if config.do_sample else None
    before = CompileCounter.snapshot()
    for batch in batch_buckets(batch_size, shards):
        for length in sorted(set(lengths)):
            shape = jax.ShapeDtypeStruct((batch, length), jnp.int32)
            if mesh is None:
                generate_static.lower(model.module, model.params, shape, shape, config, key).compile()
            else:
                generation_function(model, config, mesh).lower(model.params, shape, shape, key).compile()
            shapes += 1
    CompileCounter.add_since(before, stats)
    return shapes
