"""bart_jax.training.checkpointing: an output directory holding another run's checkpoints is refused
unless overwritten."""

from __future__ import annotations

import json
import math

import pytest

from bart_jax.training import checkpointing
from bart_jax.training.arguments import RESUMABLE_CHANGES, TrainingArguments


def test_output_dir_of_another_run_is_refused(tmp_path):
    first = TrainingArguments(output_dir=str(tmp_path), train_file="a.jsonl", config_name="c").run_identity()
    checkpointing.prepare_output_dir(str(tmp_path), first, False, RESUMABLE_CHANGES)
    (tmp_path / checkpointing.CHECKPOINT_DIR / "4").mkdir(parents=True)
    same_run = dict(first)
    checkpointing.prepare_output_dir(str(tmp_path), same_run, False, RESUMABLE_CHANGES)
    other = dict(first, learning_rate=1.0)
    with pytest.raises(ValueError, match=r"different run \(learning_rate: 5e-05 -> 1.0\)"):
        checkpointing.prepare_output_dir(str(tmp_path), other, False, RESUMABLE_CHANGES)
    checkpointing.prepare_output_dir(str(tmp_path), other, True, RESUMABLE_CHANGES)
    assert not (tmp_path / checkpointing.CHECKPOINT_DIR).exists(), "overwrite must remove the old checkpoints"
    assert math.isclose(json.loads((tmp_path / checkpointing.RUN_CONFIG_FILE).read_text())["learning_rate"], 1.0)
