"""bart_jax.training.batching: a resumable batch order, and collation to static shapes."""

from __future__ import annotations

import numpy as np
import pytest

from bart_jax.training import batching, features


def test_batch_order_is_resumable():
    uninterrupted = batching.training_batches(10, 3, seed=7, start=batching.DataPosition())
    first = [next(uninterrupted) for _ in range(7)]
    resumed = batching.training_batches(10, 3, seed=7, start=first[3][0])
    for expected, again in zip(first[4:], (next(resumed) for _ in range(3))):
        assert expected[0] == again[0] and expected[1] == again[1]
        np.testing.assert_array_equal(expected[2], again[2])
    epoch_zero = np.concatenate([indices for _, epoch, indices in first if epoch == 0])
    assert len(epoch_zero) == 9 and len(set(epoch_zero.tolist())) == 9, "an epoch repeats no example"
    assert first[2][0] == batching.DataPosition(0, 3) and first[3][1] == 1
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(batching.training_batches(2, 3, 0, batching.DataPosition()))


def test_collate_pads_to_static_shapes():
    task_data = features.TaskData({"input_ids": [np.array([0, 5, 2]), np.array([0, 2])],
                                   "labels": [np.array([0, 7, 2]), np.array([0, 2])]},
                                  {"input_ids": 4, "labels": 5}, features.DataStats(2))
    batch = batching.collate(task_data, np.array([1, -1]), epoch=0, pad_token_id=1)
    np.testing.assert_array_equal(batch["input_ids"], [[0, 2, 1, 1], [0, 5, 2, 1]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["labels"], [[0, 2, -100, -100, -100], [0, 7, 2, -100, -100]])
    np.testing.assert_array_equal(batch["example_mask"], [1.0, 0.0])
    assert list(batching.evaluation_batches(5, 2))[-1].tolist() == [4, -1]
