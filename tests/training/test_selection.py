"""bart_jax.training.selection: the best checkpoint and early stopping as the Hugging Face Trainer
and its EarlyStoppingCallback decide them, their state across a resume, and the save limit that
spares the best checkpoint."""

from __future__ import annotations

import pytest

from bart_jax.training.arguments import TrainingArguments
from bart_jax.training.selection import BestModelTracker, prune_checkpoints


def observe_all(tracker, values, metric="eval_loss"):
    return [(verdict.improved, verdict.stop)
            for verdict in (tracker.observe(step, {metric: value, "eval_other": 0.0})
                            for step, value in values)]


def test_best_and_patience_as_the_trainer():
    tracker = BestModelTracker("eval_loss", greater_is_better=False, patience=2, threshold=0.1)
    verdicts = observe_all(tracker, [(10, 1.0), (20, 0.95), (30, 0.5), (40, 0.6), (50, 0.55)])
    # 0.95 is a new best but within the threshold: it counts towards the patience.
    assert verdicts == [(True, False), (True, False), (True, False), (False, False), (False, True)]
    assert (tracker.best_step, tracker.best_value) == (30, 0.5)
    assert tracker.best_metrics == {"eval_loss": 0.5, "eval_other": 0.0}

    greater = BestModelTracker("eval_accuracy", greater_is_better=True, patience=1)
    assert observe_all(greater, [(1, 0.5), (2, 0.7), (3, 0.7)], "eval_accuracy") == [
        (True, False), (True, False), (False, True)]
    with pytest.raises(ValueError, match=r"'rougeL' is not among the evaluation metrics \(eval_loss\)"):
        BestModelTracker("eval_rougeL", True).observe(1, {"eval_loss": 1.0})


def test_the_state_survives_a_resume():
    tracker = BestModelTracker("eval_loss", False, patience=3)
    observe_all(tracker, [(2, 1.0), (4, 1.5)])
    resumed = BestModelTracker("eval_loss", False, patience=3)
    resumed.restore(tracker.to_dict())
    assert resumed == tracker
    assert observe_all(resumed, [(6, 1.2), (8, 1.1)]) == [(False, False), (False, True)]
    again = BestModelTracker("eval_loss", False, patience=5)
    again.restore(resumed.to_dict())
    assert not again.stopped, "a larger patience lets a stopped run go on"
    other = BestModelTracker("eval_accuracy", True)
    other.restore(tracker.to_dict())
    assert other.best_step is None, "another metric starts afresh"


def test_options_as_the_trainer():
    def options(**kwargs):
        return TrainingArguments(output_dir="o", **kwargs)

    assert options().best_model_metric() is None
    assert options(load_best_model_at_end=True).best_model_metric() == "eval_loss"
    assert not options(load_best_model_at_end=True).best_is_greater()
    assert options(metric_for_best_model="rougeL").best_model_metric() == "eval_rougeL"
    assert options(metric_for_best_model="eval_rougeL").best_is_greater()
    assert not options(metric_for_best_model="eval_loss").best_is_greater()
    assert not options(metric_for_best_model="accuracy", greater_is_better=False).best_is_greater()
    tracker = BestModelTracker.for_arguments(options(early_stopping_patience=3, early_stopping_threshold=0.01))
    assert (tracker.metric, tracker.greater_is_better, tracker.patience, tracker.threshold) == (
        "eval_loss", False, 3, 0.01)
    with pytest.raises(ValueError, match="early_stopping_patience must be positive"):
        options(early_stopping_patience=0)
    complete = dict(output_dir="o", train_file="t.jsonl", config_name="c")
    with pytest.raises(ValueError, match="--load_best_model_at_end needs evaluations: pass --validation_file"):
        TrainingArguments(**complete, load_best_model_at_end=True).check_complete()
    with pytest.raises(ValueError, match="pass --eval_steps"):
        TrainingArguments(**complete, validation_file="v.jsonl", early_stopping_patience=2).check_complete()


def test_the_save_limit_spares_the_best_checkpoint(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / str(step)).mkdir()
    (tmp_path / "10.orbax-checkpoint-tmp-1").mkdir()  # a save still being written is not listed
    assert prune_checkpoints(str(tmp_path), 2, saved_step=10, protected=[2]) == [4, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10.orbax-checkpoint-tmp-1", "2", "8"]
    assert prune_checkpoints(str(tmp_path), None, saved_step=12) == []
