"""bart_jax.training.batching: collation to static shapes."""

from __future__ import annotations

import numpy as np

from bart_jax.training import batching, features


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
