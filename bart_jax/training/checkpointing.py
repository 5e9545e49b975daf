"""Checkpoints with orbax: the train state, the data position and the dropout key, saved
together per step under `<output_dir>/checkpoints/<step>`.

orbax writes a checkpoint into a temporary directory and renames it into place only once every
file is written (atomic finalize), so a crash while saving leaves the previous checkpoint as the
latest one; leftover temporary directories are removed on the next start.

The run's settings are kept in `<output_dir>/run_config.json`; a directory holding another run's
checkpoints is refused, so that a run never resumes from, or overwrites, someone else's state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG_FILE = "run_config.json"


class Checkpointer:
    """Saves and restores (train state, {"data": position, "rng": key}) by step."""

    def __init__(self, output_dir: str, max_to_keep: Optional[int] = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.directory = os.path.abspath(os.path.join(output_dir, CHECKPOINT_DIR))
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "progress"))

    def latest_step(self) -> Optional[int]:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, progress: dict) -> None:
        """Starts saving (in the background when async); `progress` is JSON (data position, rng)."""
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         progress=ocp.args.JsonSave(progress)), force=True)

    def restore(self, step: int, like_state: Any) -> tuple[Any, dict]:
        """(state with the structure, shapes and dtypes of `like_state`, progress) of `step`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
        return restored.state, restored.progress

    def progress(self, step: int) -> dict:
        """The progress record (data position, dropout key) of `step` alone."""
        return self._manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())).progress

    def wait(self) -> None:
        """Blocks until a background save has been finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def key_to_json(key: jax.Array) -> list[int]:
    return np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                      else key).astype(np.uint32).tolist()


def key_from_json(data: list[int]) -> jax.Array:
    return jax.numpy.asarray(np.asarray(data, np.uint32))


def prepare_output_dir(output_dir: str, run_config: dict[str, Any], overwrite: bool,
                       resumable_changes: tuple[str, ...] = ()) -> None:
    """Makes `output_dir` ready for this run and records its settings.

    A directory with checkpoints of a run whose settings differ (except `resumable_changes`)
    is refused unless `overwrite`, which deletes the old checkpoints, metrics and settings.
    """
    os.makedirs(output_dir, exist_ok=True)
    config_path = os.path.join(output_dir, RUN_CONFIG_FILE)
    checkpoint_dir = os.path.join(output_dir, CHECKPOINT_DIR)
    has_checkpoints = os.path.isdir(checkpoint_dir) and any(
        name.isdigit() for name in os.listdir(checkpoint_dir))
    if overwrite:
        for name in (CHECKPOINT_DIR, RUN_CONFIG_FILE, "metrics.jsonl"):
            path = os.path.join(output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    elif has_checkpoints:
        if not os.path.isfile(config_path):
            raise ValueError(f"{output_dir} holds checkpoints of an unknown run (no {RUN_CONFIG_FILE}); "
                             f"pass --overwrite_output_dir to replace them or choose another --output_dir")
        with open(config_path, encoding="utf-8") as f:
            previous = json.load(f)
        differing = sorted(key for key in set(previous) | set(run_config)
                           if key not in resumable_changes and previous.get(key) != run_config.get(key))
        if differing:
            details = ", ".join(f"{key}: {previous.get(key)!r} -> {run_config.get(key)!r}" for key in differing)
            raise ValueError(f"{output_dir} holds checkpoints of a different run ({details}); pass "
                             f"--overwrite_output_dir to replace them or choose another --output_dir")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(run_config, f, indent=2, sort_keys=True)
        f.write("\n")
