"""Where training metrics go: `<output_dir>/metrics.jsonl`, and TensorBoard and Weights & Biases
when `--report_to` asks for them; plus `--profile_steps`' jax.profiler trace.

Only process 0 (`jax.process_index() == 0`) writes metrics: on a TPU pod or a GPU cluster every
process runs the loop, and one copy of each number is enough. Each process writes its own trace.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"
# The pip package of each integration's module.
_PACKAGES = {"tensorboardX": "tensorboardX", "wandb": "wandb"}


def resolve_integrations(report_to: Sequence[str]) -> list[str]:
    """The integrations of a `--report_to` list: "none" is none, "all" is TensorBoard and, when it
    is installed, Weights & Biases. Raises ValueError naming the package an asked-for one lacks."""
    names = list(report_to)
    if "all" in names:
        names = ["tensorboard"] + (["wandb"] if importlib.util.find_spec("wandb") is not None else [])
    names = [name for name in names if name != "none"]
    for name in names:
        _import({"tensorboard": "tensorboardX", "wandb": "wandb"}[name], name)
    return names


def _import(module: str, integration: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"--report_to {integration} needs the {_PACKAGES[module]} package "
                         f"(pip install {_PACKAGES[module]})") from None


class MetricsLog:
    """Appends one JSON object per logged step to `<output_dir>/metrics.jsonl` and mirrors the
    numbers to the integrations asked for (TensorBoard event files in `<output_dir>/tensorboard`,
    a Weights & Biases run). Does nothing on processes other than 0."""

    def __init__(self, output_dir: str, report_to: Sequence[str] = (), config: Optional[dict] = None,
                 main_process: Optional[bool] = None):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.main_process = jax.process_index() == 0 if main_process is None else main_process
        self._writers: list[Any] = []
        if not self.main_process:
            return
        for name in resolve_integrations(report_to):
            if name == "tensorboard":
                module = _import("tensorboardX", name)
                self._writers.append(_TensorBoardWriter(module.SummaryWriter(os.path.join(output_dir,
                                                                                          TENSORBOARD_DIR))))
            else:
                self._writers.append(_WandbWriter(_import("wandb", name), output_dir, config or {}))

    def truncate_after(self, step: int) -> None:
        """Drops entries logged after `step`: a resumed run redoes those steps and logs them again."""
        if not self.main_process or not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            entries = [line for line in f if _logged_step(line) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(entries)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.main_process:
            return
        entry = {"step": int(step), **{key: _plain(value) for key, value in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        scalars = {key: value for key, value in entry.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        for writer in self._writers:
            writer.write(int(step), scalars)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []


class _TensorBoardWriter:
    def __init__(self, summary_writer):
        self._writer = summary_writer

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _WandbWriter:
    """One Weights & Biases run; the WANDB_* environment variables (WANDB_PROJECT, WANDB_ENTITY,
    WANDB_NAME, WANDB_RUN_ID, WANDB_RESUME, WANDB_MODE, ...) configure it as wandb documents."""

    def __init__(self, wandb, output_dir: str, config: dict):
        options: dict[str, Any] = {"project": os.environ.get("WANDB_PROJECT", "bart_jax"), "config": config}
        if not os.environ.get("WANDB_NAME"):
            options["name"] = os.path.basename(os.path.normpath(output_dir)) or None
        self._run = wandb.init(**options)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


def _logged_step(line: str) -> float:
    """The step of a log line; infinity for a blank or partial line (a crash while writing it)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "item"):
        return np.asarray(value).item()
    return value


class StepProfiler:
    """`--profile_steps START:STOP`: a jax.profiler trace of updates START to STOP (both included,
    counted from 1 as the log counts them) in `<output_dir>/profile`, which TensorBoard's profile
    plugin and Perfetto read. A resumed run traces what is left of the range."""

    def __init__(self, output_dir: str, steps: Optional[tuple[int, int]]):
        self.directory = os.path.join(output_dir, PROFILE_DIR)
        self.steps = steps
        self.active = False

    def before_step(self, step: int) -> None:
        """Called before update number `step` runs."""
        if self.steps and not self.active and self.steps[0] <= step <= self.steps[1]:
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory)
            self.active = True
            logger.info("profiling updates %d to %d into %s", step, self.steps[1], self.directory)

    def after_step(self, step: int, state: Any) -> None:
        """Called once update number `step` has been dispatched; `state` is what it returned."""
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
