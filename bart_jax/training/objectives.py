"""The training objective of each task: a loss *sum* and its weight, so that gradient
accumulation and evaluation over many batches normalise once, over all tokens or examples.

With label smoothing 0 the mean (sum / weight) equals the loss transformers' heads compute.
Label smoothing follows transformers' `LabelSmoother`: (1 - ε) · NLL + ε · mean over classes of -log p.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from bart_jax.model.heads import shift_tokens_right
from bart_jax.model.losses import IGNORE_INDEX
from bart_jax.model.registry import head_spec, training_task_heads

# Task -> the head it trains ("denoise", "seq2seq", "classify", "qa"), as the head registry declares.
TASK_HEADS = training_task_heads()
# Tasks whose labels are target token ids (the seq2seq LM objective).
GENERATIVE_TASKS = tuple(task for task, head in TASK_HEADS.items() if head_spec(head).token_labels)

# (params, batch, dropout_rng or None) -> (loss_sum, weight, predictions); no rng: evaluation mode.
Objective = Callable[[Any, dict, Optional[jax.Array]], tuple[jax.Array, jax.Array, dict]]


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Per-position loss: logits [..., classes], labels [...] valid class ids -> [...] float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    if label_smoothing == 0.0:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1)


def _masked_sum(values: jax.Array, weights: jax.Array) -> jax.Array:
    # where, not multiply: a padding row's value may be inf and inf * 0 is nan.
    return jnp.sum(jnp.where(weights > 0, values * weights, 0.0))


def make_objective(module: Any, task: str, label_smoothing: float = 0.0) -> Objective:
    """The objective of `task` for a head module (see TASK_HEADS).

    Batches (from bart_jax.training.batching.collate): input_ids, attention_mask [batch, source],
    example_mask [batch], and labels [batch, target] (-100 ignored) for the generative tasks,
    labels [batch] or [batch, num_labels] for classification, start/end_positions [batch] for QA.
    """
    if task not in TASK_HEADS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_HEADS)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing_factor must be in [0, 1), got {label_smoothing}")
    config = module.config

    def apply(params, batch, dropout_rng, **inputs):
        return module.apply({"params": params}, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            deterministic=dropout_rng is None,
                            rngs=None if dropout_rng is None else {"dropout": dropout_rng}, **inputs)

    def generative(params, batch, dropout_rng=None):
        labels = batch["labels"]
        decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
        logits = apply(params, batch, dropout_rng, decoder_input_ids=decoder_input_ids).logits
        valid = labels != IGNORE_INDEX
        losses = smoothed_cross_entropy(logits, jnp.where(valid, labels, 0), label_smoothing)
        weights = valid * batch["example_mask"][:, None]
        return _masked_sum(losses, weights), jnp.sum(weights), {}

    def classification(params, batch, dropout_rng=None):
        logits = apply(params, batch, dropout_rng).logits.astype(jnp.float32)
        labels = batch["labels"]
        if config.problem_type == "regression":
            targets = labels.reshape(logits.shape)
            losses = jnp.mean((logits - targets) ** 2, axis=-1)
        elif config.problem_type == "multi_label_classification":
            targets = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
            losses = jnp.mean(jax.nn.softplus(logits) - logits * targets, axis=-1)
        else:
            losses = smoothed_cross_entropy(logits, labels, label_smoothing)
        weights = batch["example_mask"]
        return _masked_sum(losses, weights), jnp.sum(weights), {"logits": logits}

    def span(params, batch, dropout_rng=None):
        outputs = apply(params, batch, dropout_rng)
        start = smoothed_cross_entropy(outputs.start_logits, batch["start_positions"], 0.0)
        end = smoothed_cross_entropy(outputs.end_logits, batch["end_positions"], 0.0)
        weights = batch["example_mask"]
        predictions = {"start_logits": outputs.start_logits.astype(jnp.float32),
                       "end_logits": outputs.end_logits.astype(jnp.float32)}
        return _masked_sum((start + end) / 2, weights), jnp.sum(weights), predictions

    if task in GENERATIVE_TASKS:
        return generative
    if task == "classify":
        if config.problem_type is None:
            raise ValueError("set config.problem_type before building the classification objective")
        return classification
    return span
