"""AdamW with warmup and decay, global-norm clipping, no weight decay on biases and LayerNorm
scales, and `final_logits_bias` frozen (transformers keeps it as a buffer, never trained)."""

from __future__ import annotations

from typing import Any

import optax
from flax import traverse_util

SCHEDULES = ("linear", "cosine", "constant")
# Parameter names (last path element) that are never decayed: biases and LayerNorm scales.
NO_DECAY_NAMES = ("bias", "scale")
FROZEN_NAMES = ("final_logits_bias",)


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int, kind: str = "linear") -> optax.Schedule:
    """Linear warmup from 0 to `peak` over warmup_steps, then linear/cosine decay to 0 at
    total_steps, or constant."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"need warmup_steps >= 0 and total steps > 0, got {warmup_steps} and {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    warmup = optax.linear_schedule(0.0, peak, warmup_steps) if warmup_steps else optax.constant_schedule(peak)
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "linear":
        decay = optax.linear_schedule(peak, 0.0, decay_steps)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def trainable_mask(params: Any) -> Any:
    """A tree of bools like `params`: False for frozen buffers."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: path[-1] not in FROZEN_NAMES for path in flat})


def weight_decay_mask(params: Any) -> Any:
    """A tree of bools like `params`: True where weight decay applies (not biases, LayerNorm scales, buffers)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {path: path[-1] not in NO_DECAY_NAMES + FROZEN_NAMES for path in flat})


def make_optimizer(params: Any, schedule: optax.Schedule, weight_decay: float = 0.0, beta1: float = 0.9,
                   beta2: float = 0.999, epsilon: float = 1e-8, max_grad_norm: float | None = 1.0
                   ) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) after clipping the trainable gradients' global norm to
    max_grad_norm (None or 0: no clipping); frozen parameters get zero updates and no state."""
    trainable = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    trainable.append(optax.adamw(schedule, b1=beta1, b2=beta2, eps=epsilon, weight_decay=weight_decay,
                                 mask=weight_decay_mask))
    labels = traverse_util.unflatten_dict({
        path: "trainable" if is_trainable else "frozen"
        for path, is_trainable in traverse_util.flatten_dict(trainable_mask(params)).items()
    })
    return optax.multi_transform({"trainable": optax.chain(*trainable), "frozen": optax.set_to_zero()}, labels)
