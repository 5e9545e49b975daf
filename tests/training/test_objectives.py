"""bart_jax.training.objectives: each task's loss sum and weight give the loss transformers' heads
compute (label smoothing as `LabelSmoother`), on perturbed one-layer models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hf_reference import random_batch, seq2seq_training_batch, tiny_flax_model

from bart_jax.training import objectives


def _evaluate(module, task, batch, params, label_smoothing=0.0):
    """(loss sum, weight, predictions) of the jitted objective."""
    return jax.jit(objectives.make_objective(module, task, label_smoothing))(params, batch, None)


def _model_outputs(module, params, *args, **kwargs):
    return jax.jit(lambda p, a, k: module.apply({"params": p}, *a, **k))(params, args, kwargs)


def test_generative_objective_equals_the_model_loss_and_smoothing_formula():
    module, params = tiny_flax_model("BartForConditionalGeneration")
    batch = seq2seq_training_batch(module.config.vocab_size)
    loss_sum, weight, _ = _evaluate(module, "seq2seq", batch, params)
    outputs = _model_outputs(module, params, batch["input_ids"], batch["attention_mask"],
                             labels=jnp.asarray(batch["labels"]))
    np.testing.assert_allclose(loss_sum / weight, outputs.loss, rtol=1e-6)
    assert weight == np.sum(batch["labels"] != -100)

    smoothed_sum, _, _ = _evaluate(module, "seq2seq", batch, params, label_smoothing=0.1)
    logits = outputs.logits
    valid = batch["labels"] != -100
    targets = optax.smooth_labels(jax.nn.one_hot(np.where(valid, batch["labels"], 0), logits.shape[-1]), 0.1)
    expected = np.sum(np.where(valid, optax.softmax_cross_entropy(logits, targets), 0.0))
    np.testing.assert_allclose(smoothed_sum, expected, rtol=1e-5)


@pytest.mark.parametrize("problem_type", ["single_label_classification", "multi_label_classification", "regression"])
def test_classification_objective_equals_the_model_loss(problem_type):
    num_labels = 1 if problem_type == "regression" else 3
    module, params = tiny_flax_model("BartForSequenceClassification", num_labels=num_labels,
                                     problem_type=problem_type)
    input_ids, attention_mask = random_batch(module.config.vocab_size, batch=4, length=9)
    rng = np.random.default_rng(0)
    labels = {"single_label_classification": rng.integers(0, 3, 4).astype(np.int32),
              "multi_label_classification": rng.integers(0, 2, (4, 3)).astype(np.float32),
              "regression": rng.normal(size=4).astype(np.float32)}[problem_type]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "example_mask": np.ones(4, np.float32)}
    loss_sum, weight, predictions = _evaluate(module, "classify", batch, params)
    outputs = _model_outputs(module, params, input_ids, attention_mask, labels=jnp.asarray(labels))
    np.testing.assert_allclose(loss_sum / weight, outputs.loss, rtol=1e-5)
    np.testing.assert_allclose(predictions["logits"], outputs.logits, rtol=1e-6)


def test_span_objective_equals_the_model_loss_and_ignores_padding_rows():
    module, params = tiny_flax_model("BartForQuestionAnswering")
    input_ids, attention_mask = random_batch(module.config.vocab_size, batch=4, length=9)
    starts, ends = np.array([1, 2, 0, 3]), np.array([2, 4, 0, 3])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "start_positions": starts,
             "end_positions": ends, "example_mask": np.array([1, 1, 1, 0], np.float32)}
    loss_sum, weight, _ = _evaluate(module, "qa", batch, params)
    reference = _model_outputs(module, params, input_ids[:3], attention_mask[:3],
                               start_positions=jnp.asarray(starts[:3]), end_positions=jnp.asarray(ends[:3])).loss
    assert weight == 3
    np.testing.assert_allclose(loss_sum / weight, reference, rtol=1e-5)
