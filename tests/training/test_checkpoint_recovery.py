"""Damaged training checkpoints (bart_jax.training.checkpointing): restoring one names its step and
path instead of restoring garbage, and resuming falls back to the newest checkpoint that verifies
against the checksums saved in its progress record."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from hf_reference import SHARED_DATA

from bart_jax.training import checkpointing

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


def state_of(step: int) -> dict:
    """A train-state-like tree; the arrays are large enough for orbax to write data files."""
    return {"step": jnp.asarray(step, jnp.int32),
            "params": {"w": jnp.arange(256 * 256, dtype=jnp.float32).reshape(256, 256) * step,
                       "b": jnp.full((256,), step, jnp.float32)}}


def progress_of(step: int) -> dict:
    return {"rng": [0, step]}


def pipeline_of(step: int) -> dict:
    return {"rows": [{"examples": {"next_index": step}}]}


def files_under(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


def largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max(files_under(step_dir / "state"), key=lambda path: path.stat().st_size)


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def write_garbage(path: pathlib.Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def empty_state(step_dir: pathlib.Path) -> None:
    for path in files_under(step_dir / "state"):
        path.unlink()


def state_of_another_step(step_dir: pathlib.Path) -> None:
    """Well-formed arrays that are not the ones saved (a bad copy or sync): only the checksums tell."""
    shutil.rmtree(step_dir / "state")
    shutil.copytree(step_dir.parent / "1" / "state", step_dir / "state")


DAMAGE = {
    "truncated-metadata": lambda step_dir: truncate(step_dir / "state" / "_METADATA"),
    "emptied-state": empty_state,
    "truncated-data-file": lambda step_dir: truncate(largest_data_file(step_dir)),
    "garbage-data-file": lambda step_dir: write_garbage(largest_data_file(step_dir)),
    "truncated-progress-record": lambda step_dir: truncate(step_dir / "progress" / "metadata"),
    "state-of-another-step": state_of_another_step,
}


@pytest.fixture
def two_checkpoints(tmp_path):
    """An output directory with the checkpoints of steps 1 and 2."""
    checkpointer = checkpointing.Checkpointer(str(tmp_path), async_save=False)
    for step in (1, 2):
        checkpointer.save(step, state_of(step), progress_of(step), pipeline_of(step))
    checkpointer.close()
    return tmp_path


@pytest.fixture
def warnings_logged(monkeypatch):
    logged = []
    monkeypatch.setattr(checkpointing.logger, "warning", lambda message, *args: logged.append(message % args))
    return logged


def assert_same_tree(found, expected):
    np.testing.assert_array_equal(np.asarray(found["step"]), np.asarray(expected["step"]))
    for name in expected["params"]:
        np.testing.assert_array_equal(np.asarray(found["params"][name]), np.asarray(expected["params"][name]))


def test_checkpoints_restore_with_their_progress_and_verify(two_checkpoints, warnings_logged):
    checkpointer = checkpointing.Checkpointer(str(two_checkpoints), async_save=False)
    step, state, progress, pipeline = checkpointer.restore_latest(state_of(0))
    assert step == 2 and progress == progress_of(2), progress
    assert pipeline == pipeline_of(2), "the input pipeline's position is restored"
    assert_same_tree(state, state_of(2))
    assert checkpointer.progress(1) == progress_of(1), "the checksums are not part of the progress"
    checkpointer.close()
    assert not warnings_logged
    assert checkpointing.Checkpointer(str(two_checkpoints / "empty")).restore_latest(state_of(0)) is None


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_named_and_resuming_falls_back(two_checkpoints, damage, warnings_logged):
    damaged = two_checkpoints / checkpointing.CHECKPOINT_DIR / "2"
    DAMAGE[damage](damaged)
    checkpointer = checkpointing.Checkpointer(str(two_checkpoints), async_save=False)
    with pytest.raises(checkpointing.CheckpointError) as refused:
        checkpointer.restore(2, state_of(0))
    assert f"the checkpoint of step 2 in {damaged}" in str(refused.value)
    if damage == "state-of-another-step":
        assert "3 array(s) differ from what was saved" in str(refused.value), refused.value

    step, state, progress, pipeline = checkpointer.restore_latest(state_of(0))
    assert step == 1 and progress == progress_of(1) and pipeline == pipeline_of(1)
    assert_same_tree(state, state_of(1))
    assert any(f"skipping the checkpoint of step 2: the checkpoint of step 2 in {damaged}" in line
               for line in warnings_logged), warnings_logged
    aside = damaged.parent / f"{checkpointing.SET_ASIDE_PREFIX}2"
    assert sorted(os.listdir(damaged.parent)) == ["1", aside.name], "the damaged checkpoint is set aside"
    # Training goes on from step 1 and saves step 2 again.
    checkpointer.save(2, state_of(2), progress_of(2), pipeline_of(2))
    checkpointer.wait()
    assert checkpointer.latest_step() == 2
    assert checkpointer.restore_latest(state_of(0))[0] == 2
    checkpointer.close()


def test_damaged_bookkeeping_of_orbax_alone_still_restores(two_checkpoints, warnings_logged):
    """orbax reads a truncated `_CHECKPOINT_METADATA` as absent; the arrays still verify."""
    truncate(two_checkpoints / checkpointing.CHECKPOINT_DIR / "2" / "_CHECKPOINT_METADATA")
    checkpointer = checkpointing.Checkpointer(str(two_checkpoints), async_save=False)
    step, state, _, _ = checkpointer.restore_latest(state_of(0))
    assert step == 2 and not warnings_logged
    assert_same_tree(state, state_of(2))
    checkpointer.close()


def test_a_checkpoint_saved_without_checksums_restores_with_a_warning(two_checkpoints, warnings_logged):
    record = two_checkpoints / checkpointing.CHECKPOINT_DIR / "2" / "progress" / "metadata"
    progress = json.loads(record.read_text())
    del progress[checkpointing.CHECKSUMS]  # as written before checksums were kept
    record.write_text(json.dumps(progress))
    checkpointer = checkpointing.Checkpointer(str(two_checkpoints), async_save=False)
    step, state, restored, _ = checkpointer.restore_latest(state_of(0))
    assert step == 2 and restored == progress_of(2)
    assert_same_tree(state, state_of(2))
    assert warnings_logged == [f"the checkpoint of step 2 in {record.parent.parent} has no checksums: restored "
                               f"unverified"], warnings_logged
    checkpointer.close()


def test_no_checkpoint_that_verifies_is_an_error_and_moves_nothing(two_checkpoints, warnings_logged):
    directory = two_checkpoints / checkpointing.CHECKPOINT_DIR
    for step in ("1", "2"):
        write_garbage(largest_data_file(directory / step))
    checkpointer = checkpointing.Checkpointer(str(two_checkpoints), async_save=False)
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint in .* can be restored") as refused:
        checkpointer.restore_latest(state_of(0))
    assert f"step 2 in {directory / '2'}" in str(refused.value) and f"step 1 in {directory / '1'}" in str(refused.value)
    assert "--overwrite_output_dir" in str(refused.value)
    assert sorted(os.listdir(directory)) == ["1", "2"]
    checkpointer.close()


# --- train.py resumes from the newest checkpoint that verifies ----------------------------------------
@pytest.mark.slow
def test_train_resumes_from_the_last_good_checkpoint_to_the_same_weights(tiny_model_dir, tmp_path):
    output_dir = tmp_path / "run"
    command = [sys.executable, str(REPOSITORY / "train.py"), "--task", "seq2seq", "--model_name_or_path",
               tiny_model_dir, "--train_file", str(SHARED_DATA / "summarization" / "xsum_bbc_extracts_dev.jsonl"),
               "--max_source_length", "48", "--max_target_length", "16", "--per_device_train_batch_size", "4",
               "--learning_rate", "1e-3", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
               "--output_dir", str(output_dir), "--disable_tqdm"]
    environment = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla-cache"),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    finished = subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    expected = safetensors.numpy.load_file(str(output_dir / "model" / "params.safetensors"))
    shutil.rmtree(output_dir / "model")
    damaged = output_dir / checkpointing.CHECKPOINT_DIR / "4"
    write_garbage(largest_data_file(damaged))

    resumed = subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"skipping the checkpoint of step 4: the checkpoint of step 4 in {damaged}" in resumed.stderr
    assert "resumed from the checkpoint of step 2" in resumed.stderr
    found = safetensors.numpy.load_file(str(output_dir / "model" / "params.safetensors"))
    for name in expected:
        np.testing.assert_array_equal(found[name], expected[name], err_msg=f"{name} differs after the fallback")
