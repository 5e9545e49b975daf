"""Batches padded to static shapes: examples collated into numpy arrays, and the evaluation
order (training batches come from `training.pipeline`)."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from bart_jax.model.losses import IGNORE_INDEX
from bart_jax.training.features import TaskData


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


def collate_examples(examples: list[dict], padded_lengths: dict[str, int], pad_token_id: int) -> dict[str, np.ndarray]:
    """Examples (dicts of the same columns) as a batch of numpy arrays with static shapes.

    Varying-length columns (those in `padded_lengths`) are padded to their length (labels with
    -100, ids with pad); `attention_mask` [batch, source] marks the real input tokens; the other
    columns are stacked; `example_mask` [batch] float32 is 1 (every example is real).
    """
    batch = {}
    for name in sorted(examples[0]):
        rows = [example[name] for example in examples]
        if name in padded_lengths:
            fill = IGNORE_INDEX if name == "labels" else pad_token_id
            batch[name] = _pad(rows, padded_lengths[name], fill)
            if name == "input_ids":
                lengths = np.array([min(len(row), padded_lengths[name]) for row in rows])
                positions = np.arange(padded_lengths[name])
                batch["attention_mask"] = (positions[None] < lengths[:, None]).astype(np.int32)
        else:
            batch[name] = np.stack([np.asarray(row) for row in rows])
    batch["example_mask"] = np.ones(len(examples), np.float32)
    return batch


def task_example(data: TaskData, index: int, epoch: int = 0) -> dict:
    """Example `index` of `data` as a dict of its columns (noisy inputs made for `epoch`)."""
    example = {name: values[index] for name, values in data.columns.items()}
    if data.make_inputs is not None:
        example["input_ids"] = data.make_inputs(epoch, index)
    return example


def collate(data: TaskData, indices: np.ndarray, epoch: int, pad_token_id: int) -> dict[str, np.ndarray]:
    """A batch of `data`'s examples `indices` ([batch], -1 for padding rows) with static shapes.

    Padding rows repeat example 0, so that the model never sees an empty row, and are marked by
    `example_mask` [batch] float32 = 0. See `collate_examples`.
    """
    real = indices >= 0
    safe = np.where(real, indices, 0)
    batch = collate_examples([task_example(data, int(i), epoch) for i in safe], data.padded_lengths, pad_token_id)
    batch["example_mask"] = real.astype(np.float32)
    return batch
