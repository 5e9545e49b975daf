"""bart_jax.training.metrics: ROUGE, classification accuracy/F1, SQuAD exact match/F1."""

from __future__ import annotations

import numpy as np
import pytest

from bart_jax.training import metrics


def test_metrics():
    assert metrics.rouge(["the cat sat"], ["the cat sat"]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0})
    labels = np.array([0, 1, 1, 2])
    logits = np.eye(3)[[0, 1, 2, 2]]
    result = metrics.classification_metrics(logits, labels, "single_label_classification")
    per_label_f1 = [1.0, 2 * 1 / (2 * 1 + 0 + 1), 2 * 1 / (2 * 1 + 1 + 0)]  # 2TP / (2TP + FP + FN)
    assert result == pytest.approx({"accuracy": 0.75, "f1": np.mean(per_label_f1)})
    assert metrics.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert metrics.squad_metrics(["Paris", "in London", ""], [["Paris"], ["London"], []]) == pytest.approx(
        {"exact_match": 2 / 3, "f1": (1 + 2 * 0.5 * 1 / 1.5 + 1) / 3})
