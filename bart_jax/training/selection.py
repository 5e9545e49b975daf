"""The best checkpoint and early stopping, as the Hugging Face Trainer and its
EarlyStoppingCallback have them (`--metric_for_best_model`, `--greater_is_better`,
`--load_best_model_at_end`, `--early_stopping_patience`, `--early_stopping_threshold`).

Every evaluation is compared with the best so far: a better value makes it the best (the loop
then saves a checkpoint at that step, which `--save_total_limit` never deletes); an evaluation
that does not beat the best by more than the threshold counts towards the patience. The state is
kept in each checkpoint's progress record, so a resumed run goes on with the same best and count.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from typing import Any, Iterable, Optional

from bart_jax.training import checkpointing
from bart_jax.training.arguments import TrainingArguments

logger = logging.getLogger(__name__)

# The progress record's key for BestModelTracker.to_dict().
PROGRESS_KEY = "best_model"


@dataclasses.dataclass
class Verdict:
    """What one evaluation means: a new best (save it), and whether training should stop."""

    improved: bool
    stop: bool


@dataclasses.dataclass
class BestModelTracker:
    metric: str  # "eval_<name>"
    greater_is_better: bool
    patience: Optional[int] = None
    threshold: float = 0.0
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    best_metrics: dict = dataclasses.field(default_factory=dict)
    evaluations_without_improvement: int = 0
    stopped: bool = False

    @classmethod
    def for_arguments(cls, arguments: TrainingArguments) -> Optional["BestModelTracker"]:
        """The tracker the options ask for, or None when no best model is tracked."""
        metric = arguments.best_model_metric()
        if metric is None:
            return None
        return cls(metric, arguments.best_is_greater(), arguments.early_stopping_patience,
                   arguments.early_stopping_threshold)

    def observe(self, step: int, evaluation: dict[str, Any]) -> Verdict:
        """Compares the evaluation of `step` with the best; raises ValueError when it lacks the metric."""
        if self.metric not in evaluation:
            available = ", ".join(sorted(name for name in evaluation if name.startswith("eval_")))
            raise ValueError(f"metric_for_best_model {self.metric[len('eval_'):]!r} is not among the evaluation "
                             f"metrics ({available})")
        value = float(evaluation[self.metric])
        better = (lambda a, b: a > b) if self.greater_is_better else (lambda a, b: a < b)
        # EarlyStoppingCallback: only an improvement beyond the threshold resets the count ...
        if self.best_value is None or (better(value, self.best_value)
                                       and abs(value - self.best_value) > self.threshold):
            self.evaluations_without_improvement = 0
        else:
            self.evaluations_without_improvement += 1
        # ... while any improvement makes a new best (the Trainer's best_metric).
        improved = not math.isnan(value) and (self.best_value is None or better(value, self.best_value))
        if improved:
            self.best_value, self.best_step = value, int(step)
            self.best_metrics = {name: float(v) for name, v in evaluation.items() if isinstance(v, (int, float))}
            logger.info("step %d: the best %s so far, %.6g", step, self.metric, value)
        if self.patience and self.evaluations_without_improvement >= self.patience:
            self.stopped = True
            logger.info("stopping early at step %d: %s has not improved on %.6g (step %s) for %d evaluations",
                        step, self.metric, self.best_value, self.best_step, self.evaluations_without_improvement)
        return Verdict(improved, self.stopped)

    def to_dict(self) -> dict[str, Any]:
        """The state for a checkpoint's (JSON) progress record."""
        return {"metric": self.metric, "greater_is_better": self.greater_is_better, "best_value": self.best_value,
                "best_step": self.best_step, "best_metrics": self.best_metrics,
                "evaluations_without_improvement": self.evaluations_without_improvement, "stopped": self.stopped}

    def restore(self, record: Optional[dict[str, Any]]) -> None:
        """Takes over the state of a checkpoint's record when it tracked the same metric the same way."""
        if not record:
            return
        if (record.get("metric"), record.get("greater_is_better")) != (self.metric, self.greater_is_better):
            logger.warning("the checkpoint tracked %s (greater is better: %s); tracking %s (%s) from here on",
                           record.get("metric"), record.get("greater_is_better"), self.metric,
                           self.greater_is_better)
            return
        self.best_value = record["best_value"]
        self.best_step = record["best_step"]
        self.best_metrics = dict(record.get("best_metrics") or {})
        self.evaluations_without_improvement = int(record.get("evaluations_without_improvement", 0))
        # A larger patience than the stopped run had lets it go on.
        self.stopped = bool(self.patience) and self.evaluations_without_improvement >= self.patience


def checkpoint_params(output_dir: str, step: int, like_state: Any) -> Any:
    """The parameters of the checkpoint of `step` in `output_dir` (structured as `like_state`'s)."""
    reader = checkpointing.Checkpointer(output_dir, None, async_save=False)
    try:
        return reader.restore(step, like_state)[0].params
    finally:
        reader.close()


def prune_checkpoints(directory: str, keep_newest: Optional[int], saved_step: int,
                      protected: Iterable[Optional[int]] = ()) -> list[int]:
    """Deletes the step directories of `directory` but the newest `keep_newest` (counting
    `saved_step`, which may still be being written) and the `protected` steps; returns the
    deleted steps. Only complete checkpoints are listed: orbax writes into a temporary
    directory and renames it to the step once done."""
    if keep_newest is None or not os.path.isdir(directory):
        return []
    steps = sorted({int(name) for name in os.listdir(directory) if name.isdigit()} | {int(saved_step)})
    kept = set(steps[-keep_newest:]) | {step for step in protected if step is not None}
    deleted = [step for step in steps if step not in kept]
    for step in deleted:
        shutil.rmtree(os.path.join(directory, str(step)), ignore_errors=True)
    if deleted:
        logger.info("deleted the checkpoints of steps %s (save_total_limit %d)", deleted, keep_newest)
    return deleted
