"""Batches in a deterministic order with a resumable position, padded to static shapes.

Epoch e visits the training examples in the order `permutation(seed, e)` and cuts it into full
batches (the incomplete rest is skipped, so every step has the same shapes). The position
(epoch, batch index within the epoch) says which batch comes next; saved with a checkpoint,
it lets a restarted run continue with exactly the next unseen batch.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from bart_jax.model.losses import IGNORE_INDEX
from bart_jax.training.features import TaskData


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """The next batch to read: batch `batch` of epoch `epoch`."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DataPosition":
        return cls(int(data["epoch"]), int(data["batch"]))


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """[num_examples] the example indices of `epoch`, shuffled by (seed, epoch) alone."""
    return np.random.default_rng((seed, epoch)).permutation(num_examples)


def training_batches(num_examples: int, batch_size: int, seed: int,
                     start: DataPosition) -> Iterator[tuple[DataPosition, int, np.ndarray]]:
    """Endless (position after this batch, epoch, [batch_size] example indices), from `start` on."""
    batches_per_epoch = num_examples // batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"the training data has {num_examples} examples, fewer than one batch of {batch_size}")
    epoch, batch = start.epoch, start.batch
    while True:
        order = epoch_order(num_examples, seed, epoch)
        while batch < batches_per_epoch:
            indices = order[batch * batch_size:(batch + 1) * batch_size]
            batch += 1
            yield DataPosition(epoch, batch), epoch, indices
        epoch, batch = epoch + 1, 0


def evaluation_batches(num_examples: int, batch_size: int) -> Iterator[np.ndarray]:
    """[batch_size] indices in order; the last batch is filled with -1 (padding rows)."""
    for begin in range(0, num_examples, batch_size):
        indices = np.arange(begin, begin + batch_size)
        yield np.where(indices < num_examples, indices, -1)


def _pad(rows: list[np.ndarray], length: int, value: int) -> np.ndarray:
    out = np.full((len(rows), length), value, np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row[:length]
    return out


def collate(data: TaskData, indices: np.ndarray, epoch: int, pad_token_id: int) -> dict[str, np.ndarray]:
    """A batch of numpy arrays with static shapes.

    indices: [batch] example indices, -1 for padding rows (which repeat example 0, so that the
    model never sees an empty row, and are marked by `example_mask` [batch] float32 = 0).
    Varying-length columns are padded to `data.padded_lengths` (labels with -100, ids with
    pad); `attention_mask` [batch, source] marks the real input tokens.
    """
    real = indices >= 0
    safe = np.where(real, indices, 0)
    columns = dict(data.columns)
    if data.make_inputs is not None:
        columns["input_ids"] = None
    batch = {}
    for name in sorted(columns):
        if name in data.padded_lengths:
            if name == "input_ids" and data.make_inputs is not None:
                rows = [data.make_inputs(epoch, int(i)) for i in safe]
            else:
                rows = [columns[name][int(i)] for i in safe]
            fill = IGNORE_INDEX if name == "labels" else pad_token_id
            batch[name] = _pad(rows, data.padded_lengths[name], fill)
            if name == "input_ids":
                lengths = np.array([min(len(row), data.padded_lengths[name]) for row in rows])
                positions = np.arange(data.padded_lengths[name])
                batch["attention_mask"] = (positions[None] < lengths[:, None]).astype(np.int32)
        else:
            batch[name] = np.stack([np.asarray(columns[name][int(i)]) for i in safe])
    batch["example_mask"] = real.astype(np.float32)
    return batch
