"""Checkpoints with orbax: the train state, the dropout key and the input pipeline's position
(each process's, through grain's orbax handler), saved together per step under
`<output_dir>/checkpoints/<step>`.

orbax writes a checkpoint into a temporary directory and renames it into place only once every
file is written (atomic finalize), so a crash while saving leaves the previous checkpoint as the
latest one; leftover temporary directories are removed on the next start.

The progress record of each checkpoint holds the SHA-256 of every leaf of the saved state
(`state_checksums`), taken from the arrays before they are written. Restoring checks them: a
checkpoint damaged after it was written (a truncated or overwritten file, a lost directory)
raises CheckpointError naming the step and its path instead of restoring garbage, and
`restore_latest` falls back to the newest checkpoint that verifies, setting the damaged ones aside
(`corrupt-step-<step>`) with a warning.

The run's settings are kept in `<output_dir>/run_config.json`; a directory holding another run's
checkpoints is refused, so that a run never resumes from, or overwrites, someone else's state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from bart_jax.parallel.distributed import sync

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG_FILE = "run_config.json"
CHECKSUMS = "checksums"  # the progress record's entry: leaf path -> SHA-256 of the saved state
SET_ASIDE_PREFIX = "corrupt-step-"  # not a step name orbax reads: a damaged checkpoint moved aside


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored or does not match its checksums; names the step and path."""


def state_checksums(state: Any) -> dict[str, str]:
    """{leaf path: SHA-256 of its dtype, shape and bytes} of every leaf of `state` that this
    process holds whole (a leaf split over several processes is left out)."""
    checksums = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            continue
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        array = np.ascontiguousarray(np.asarray(leaf))
        digest = hashlib.sha256(f"{array.dtype.str} {array.shape} ".encode())
        digest.update(array.reshape(-1).view(np.uint8))
        checksums[jax.tree_util.keystr(path)] = digest.hexdigest()
    return checksums


class _PipelineState:
    """A process's input pipeline position as grain's orbax handler saves and restores it: JSON,
    one file per process (`process_<i>-of-<n>.json`), since each process reads its own rows."""

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        """Called by the handler after a restore: a saved position has nothing to prefetch."""


class Checkpointer:
    """Saves and restores (train state, {"rng": key, ...}, input pipeline position) by step."""

    def __init__(self, output_dir: str, max_to_keep: Optional[int] = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.directory = os.path.abspath(os.path.join(output_dir, CHECKPOINT_DIR))
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "progress", "data"))

    def latest_step(self) -> Optional[int]:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, progress: dict, data: Any) -> None:
        """Starts saving (in the background when async); `progress` is JSON (rng, ...), stored
        with the checksums of `state`; `data` is this process's input pipeline state (JSON)."""
        progress = {**progress, CHECKSUMS: state_checksums(state)}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress),
            data=grain.checkpoint.CheckpointSave(_PipelineState(data))), force=True)

    def restore(self, step: int, like_state: Any) -> tuple[Any, dict, Any]:
        """(state with the structure, shapes and dtypes of `like_state`, progress, input pipeline
        state) of `step`, checked against the checksums saved with it. Raises CheckpointError
        naming the step and its path when it cannot be restored or does not match."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        path = self.step_path(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore(),
                data=grain.checkpoint.CheckpointRestore(_PipelineState())))
        except Exception as error:  # noqa: BLE001 - orbax, tensorstore and json report damage in many types
            # The first line, without the tensorstore spec some errors append (hundreds of lines).
            reason = (str(error).split(" See full TensorStore details")[0].strip().splitlines() or [""])[0]
            raise CheckpointError(f"the checkpoint of step {step} in {path} cannot be restored "
                                  f"({type(error).__name__}: {reason[:300]})") from error
        progress = restored.progress if isinstance(restored.progress, dict) else {}
        if "rng" not in progress:
            raise CheckpointError(f"the checkpoint of step {step} in {path} has no valid progress record")
        saved = progress.pop(CHECKSUMS, None)
        if saved is None:  # written before checksums were kept
            logger.warning("the checkpoint of step %d in %s has no checksums: restored unverified", step, path)
        else:
            found = state_checksums(restored.state)
            differing = sorted(key for key in found if saved.get(key) != found[key])
            if differing:
                raise CheckpointError(f"the checkpoint of step {step} in {path} is corrupt: {len(differing)} "
                                      f"array(s) differ from what was saved ({', '.join(differing[:4])})")
        return restored.state, progress, restored.data.state

    def restore_latest(self, like_state: Any) -> Optional[tuple[int, Any, dict, Any]]:
        """(step, state, progress, input pipeline state) of the newest checkpoint that restores and verifies, or None
        when there is none. Newer damaged checkpoints are skipped with a warning and set aside
        (renamed `corrupt-step-<step>`), so that training saves those steps again; when no
        checkpoint verifies, CheckpointError names each and nothing is moved."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                state, progress, data = self.restore(step, like_state)
            except CheckpointError as error:
                logger.warning("skipping the checkpoint of step %d: %s", step, error)
                failures.append((step, error))
                continue
            for skipped, _ in failures:
                self._set_aside(skipped)
            if failures:
                self._manager.reload()
            return step, state, progress, data
        if failures:
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored: "
                                  + "; ".join(str(error) for _, error in failures)
                                  + "; pass --overwrite_output_dir to start over")
        return None

    def _set_aside(self, step: int) -> None:
        path = self.step_path(step)
        if jax.process_index() == 0:
            target = os.path.join(self.directory, f"{SET_ASIDE_PREFIX}{step}")
            suffix = 1
            while os.path.exists(target):
                target, suffix = os.path.join(self.directory, f"{SET_ASIDE_PREFIX}{step}-{suffix}"), suffix + 1
            os.replace(path, target)
            logger.warning("moved the damaged checkpoint of step %d to %s", step, target)
        sync(f"bart_jax set aside step {step}")

    def progress(self, step: int) -> dict:
        """The progress record (dropout key, best-model tracking) of `step` alone."""
        progress = self._manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())).progress
        progress.pop(CHECKSUMS, None)
        return progress

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
    # Several processes share the directory: each checks it as found, and only then does process 0
    # change it, so that every process reads the same files and refuses (or accepts) alike.
    if has_checkpoints and not overwrite:
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
    sync("bart_jax output_dir checked")
    if jax.process_index() == 0:
        if overwrite:
            for name in (CHECKPOINT_DIR, RUN_CONFIG_FILE, "metrics.jsonl"):
                path = os.path.join(output_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        temporary = f"{config_path}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(run_config, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(temporary, config_path)
    sync("bart_jax output_dir prepared")
