"""The training input pipeline: streams of examples read, tokenised, noised and packed on the fly
with grain, one stream per row of the global batch.

Row r of every global batch of B rows reads examples r, r + B, r + 2B, ... of the corpus in a
shuffled order (grain's `MapDataset.shuffle`, a new permutation each epoch). A process builds
only the rows its devices hold, each row in its own reader thread (tokenizers and file reads
release the GIL), and hands finished batches over through a prefetch thread. Because a row is a
function of (corpus, seed, B, r) alone, the batches are the same whatever the number of
processes or threads, and a row's position is all that resuming needs:

    examples (seq2seq, classification, QA)   the index of the row's next example;
    denoising                                 the document being cut into blocks, the offset
                                              reached in it and the number of blocks made.

Denoising packs documents into full blocks as fairseq's `TokenBlockDataset` does: the row's
documents, each ending in `</s>`, are read as one token stream and cut into blocks of
`max_length - 2` tokens, each block then wrapped in `<s> ... </s>` and noised
(`training.noise`) with a generator of (seed, row, block number).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import grain
import numpy as np
from grain import experimental as grain_experimental

from bart_jax.training import noise
from bart_jax.training.batching import collate_examples

Example = dict[str, Any]
# A row that meets this many empty examples in a row stops with an error instead of spinning.
MAX_CONSECUTIVE_EMPTY = 10_000


@dataclasses.dataclass(frozen=True)
class PackingConfig:
    """Denoising: blocks of `max_length` tokens noised by `noise_config`."""

    max_length: int
    bos_id: int
    eos_id: int
    noise_config: noise.NoiseConfig
    vocabulary: noise.NoiseVocabulary


def _next_example(parent: grain.DatasetIterator, row: int) -> tuple[Any, Any]:
    """(state before it, next non-empty example) of a row's example iterator."""
    for _ in range(MAX_CONSECUTIVE_EMPTY):
        state = parent.get_state()
        example = next(parent)
        if example is not None:
            return state, example
    raise ValueError(f"batch row {row} met {MAX_CONSECUTIVE_EMPTY} empty examples in a row: check the data's "
                     f"text columns")


class _ExampleRowIterator(grain.DatasetIterator):
    """A row's examples, skipping empty ones."""

    def __init__(self, parent: grain.DatasetIterator, row: int):
        super().__init__(parent)
        self._row = row

    def __next__(self) -> Example:
        return _next_example(self._parent, self._row)[1]

    def get_state(self) -> dict:
        return {"examples": self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["examples"])


class _PackedRowIterator(grain.DatasetIterator):
    """A row's documents (token ids, `</s>`-terminated) cut into noised blocks."""

    def __init__(self, parent: grain.DatasetIterator, row: int, packing: PackingConfig, seed: int):
        super().__init__(parent)
        self._row, self._packing, self._seed = row, packing, seed
        self._document: Optional[np.ndarray] = None
        self._document_state: Any = None  # the parent's state before the current document
        self._offset = 0
        self._blocks = 0

    def _advance(self) -> None:
        self._document_state, self._document = _next_example(self._parent, self._row)
        self._offset = 0

    def __next__(self) -> Example:
        packing = self._packing
        needed = packing.max_length - 2
        pieces = []
        while needed > 0:
            if self._document is None or self._offset >= len(self._document):
                self._advance()
            piece = self._document[self._offset:self._offset + needed]
            pieces.append(piece)
            self._offset += len(piece)
            needed -= len(piece)
        labels = np.concatenate([[packing.bos_id], *pieces, [packing.eos_id]]).astype(np.int32)
        rng = noise.example_rng(self._seed, self._row, self._blocks)
        self._blocks += 1
        inputs = noise.add_noise(labels, packing.noise_config, packing.vocabulary, rng)
        if len(inputs) > packing.max_length:  # mask insertion can lengthen a full block
            inputs = np.append(inputs[: packing.max_length - 1], inputs[-1])
        return {"input_ids": inputs.astype(np.int32), "labels": labels}

    def get_state(self) -> dict:
        if self._document is None:
            return {"examples": self._parent.get_state(), "document": False, "offset": 0, "blocks": self._blocks}
        return {"examples": self._document_state, "document": True, "offset": self._offset, "blocks": self._blocks}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["examples"])
        self._document, self._offset, self._blocks = None, 0, state["blocks"]
        if state["document"]:
            self._advance()
            self._offset = state["offset"]


class _RowDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, row: int, packing: Optional[PackingConfig], seed: int):
        super().__init__(parent)
        self._row, self._packing, self._seed = row, packing, seed

    def __iter__(self) -> grain.DatasetIterator:
        parent = self._parent.__iter__()
        if self._packing is None:
            return _ExampleRowIterator(parent, self._row)
        return _PackedRowIterator(parent, self._row, self._packing, self._seed)


def row_dataset(examples: grain.MapDataset, row: int, global_batch_size: int, seed: int,
                packing: Optional[PackingConfig] = None, prefetch: int = 4) -> grain.IterDataset:
    """The endless stream of global batch row `row`: examples row, row + B, ... of `examples`
    shuffled anew each epoch (None for an empty example), packed into blocks when `packing`."""
    shuffled = examples.shuffle(seed).repeat()[row::global_batch_size]
    # One reader thread per row: rows run side by side, and the order within a row stays fixed.
    stream = shuffled.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch),
                                      allow_nones=True)
    return _RowDataset(stream, row, packing, seed)


def training_dataset(examples: grain.MapDataset, rows: Sequence[int], global_batch_size: int, seed: int,
                     padded_lengths: dict[str, int], pad_token_id: int, packing: Optional[PackingConfig] = None,
                     prefetch_batches: int = 2) -> grain.IterDataset:
    """This process's batches: the global batch rows `rows`, collated ([len(rows), ...] numpy
    arrays padded to `padded_lengths`, with "attention_mask" and "example_mask") and prefetched
    in a background thread."""
    if not rows:
        raise ValueError("a process must build at least one batch row")
    if max(rows) >= global_batch_size or min(rows) < 0:
        raise ValueError(f"batch rows {min(rows)}..{max(rows)} lie outside a global batch of {global_batch_size}")
    streams = [row_dataset(examples, row, global_batch_size, seed, packing) for row in rows]
    batches = grain_experimental.ZipIterDataset(streams).map(
        lambda elements: collate_examples(list(elements), padded_lengths, pad_token_id))
    return grain_experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch_batches)


def example_source(source: Any, featurize: Callable[[int, Any], Optional[Example]]) -> grain.MapDataset:
    """`featurize(index, record)` (None: an empty example, skipped) of each record of a
    random-access source."""
    return grain.MapDataset.source(source).map_with_index(featurize)
