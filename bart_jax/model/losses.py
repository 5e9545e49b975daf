"""The losses of transformers' BART heads, in float32.

Each follows the corresponding `torch.nn` loss with its default `reduction="mean"`, so
values match transformers (including its NaN when every label is ignored).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean token cross-entropy over labels != ignore_index.

    logits: [..., classes]; labels: [...] integer.
    """
    logits = logits.astype(jnp.float32)
    keep = labels != ignore_index
    safe_labels = jnp.where(keep, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    return jnp.sum(jnp.where(keep, losses, 0.0)) / jnp.sum(keep)


def mean_squared_error(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.mean((predictions.astype(jnp.float32) - targets.astype(jnp.float32)) ** 2)


def binary_cross_entropy_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32)))


def classification_problem_type(problem_type: str | None, num_labels: int, labels: jax.Array) -> str:
    """transformers' rule for an unset `problem_type` (decided from static shape/dtype only)."""
    if problem_type is not None:
        return problem_type
    if num_labels == 1:
        return "regression"
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_loss(logits: jax.Array, labels: jax.Array, problem_type: str) -> jax.Array:
    """logits [batch, num_labels]; labels [batch] (ids or regression targets) or [batch, num_labels]."""
    num_labels = logits.shape[-1]
    if problem_type == "regression":
        if num_labels == 1:
            return mean_squared_error(jnp.squeeze(logits), jnp.squeeze(labels))
        return mean_squared_error(logits, labels)
    if problem_type == "single_label_classification":
        return cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1))
    return binary_cross_entropy_with_logits(logits, labels)


def span_loss(start_logits: jax.Array, end_logits: jax.Array, start_positions: jax.Array,
              end_positions: jax.Array) -> jax.Array:
    """Question-answering loss: positions outside [0, length) are clamped to `length` and ignored.

    start_logits, end_logits: [batch, length]; positions: [batch] (or [batch, 1]).
    """
    length = start_logits.shape[1]
    start_positions = jnp.clip(start_positions.reshape(-1), 0, length)
    end_positions = jnp.clip(end_positions.reshape(-1), 0, length)
    start_loss = cross_entropy(start_logits, start_positions, ignore_index=length)
    end_loss = cross_entropy(end_logits, end_positions, ignore_index=length)
    return (start_loss + end_loss) / 2
