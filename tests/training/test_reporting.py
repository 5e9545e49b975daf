"""bart_jax.training.reporting: metrics.jsonl, TensorBoard event files through tensorboardX, Weights &
Biases only when asked for, process 0 alone writing, and the --profile_steps trace."""

from __future__ import annotations

import glob
import json
import os
import struct
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from bart_jax.training import reporting
from bart_jax.training.arguments import TrainingArguments, parse_arguments


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the TensorBoard event files in `directory` (TFRecord framing:
    length, its CRC, an Event message, its CRC)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_scalars_are_written_with_tensorboardx(tmp_path):
    log = reporting.MetricsLog(str(tmp_path), ["tensorboard"])
    log.write(1, {"loss": 2.5, "learning_rate": jnp.float32(1e-3)})
    log.write(2, {"loss": 1.5, "eval_loss": 1.75, "note": "text is not a scalar"})
    log.close()
    scalars = read_scalars(tmp_path / reporting.TENSORBOARD_DIR)
    assert scalars["loss"] == [(1, 2.5), (2, 1.5)]
    assert scalars["eval_loss"] == [(2, 1.75)]
    assert scalars["learning_rate"] == [(1, pytest.approx(1e-3))]
    assert "note" not in scalars and "step" not in scalars
    entries = [json.loads(line) for line in (tmp_path / reporting.METRICS_FILE).read_text().splitlines()]
    assert entries[0] == {"step": 1, "loss": 2.5, "learning_rate": pytest.approx(1e-3)}


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    log = reporting.MetricsLog(str(tmp_path), ["tensorboard"])
    log.write(1, {"loss": 1.0})
    log.truncate_after(0)
    log.close()
    assert os.listdir(tmp_path) == [], "a process other than 0 must write no metrics"


def test_wandb_is_imported_only_when_asked_for_and_named_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    reporting.MetricsLog(str(tmp_path), ["tensorboard"]).close()
    assert reporting.resolve_integrations(["none"]) == []
    with pytest.raises(ValueError, match=r"--report_to wandb needs the wandb package \(pip install wandb\)"):
        reporting.resolve_integrations(["wandb"])
    assert reporting.resolve_integrations(["all"]) == ["tensorboard"], "all: the installed integrations"


def test_wandb_run_gets_the_scalars(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    def init(**options):
        calls.append(("init", options))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_NAME", raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "summaries")
    os.makedirs(tmp_path / "run-7")
    log = reporting.MetricsLog(str(tmp_path / "run-7"), ["wandb"], config={"learning_rate": 3e-5})
    log.write(5, {"loss": 0.5, "eval_rougeL": 0.25})
    log.close()
    assert calls == [("init", {"project": "summaries", "config": {"learning_rate": 3e-5}, "name": "run-7"}),
                     ("log", {"loss": 0.5, "eval_rougeL": 0.25}, 5), ("finish",)]


def test_step_profiler_traces_the_range(tmp_path):
    profiler = reporting.StepProfiler(str(tmp_path), (2, 3))
    step_function = jax.jit(lambda x: x * 2 + 1)
    state = jnp.ones(4)
    started = []
    for step in range(1, 6):
        profiler.before_step(step)
        started.append(profiler.active)
        state = step_function(state)
        profiler.after_step(step, state)
    profiler.stop()
    assert started == [False, True, True, False, False]
    traces = glob.glob(str(tmp_path / reporting.PROFILE_DIR / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert traces, f"no trace under {tmp_path / reporting.PROFILE_DIR}"


def test_report_to_and_profile_steps_options(tmp_path):
    required = ["--output_dir", "o", "--train_file", "t.jsonl", "--config_name", "c"]
    assert parse_arguments(required).report_to == ["none"]
    assert parse_arguments([*required, "--report_to", "tensorboard", "wandb"]).report_to == ["tensorboard", "wandb"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("report_to: tensorboard,wandb\nprofile_steps: '10:15'\n")
    arguments = parse_arguments(["--config", str(recipe), *required])
    assert (arguments.report_to, arguments.profile_range()) == (["tensorboard", "wandb"], (10, 15))
    assert TrainingArguments(output_dir="o", report_to="tensorboard").report_to == ["tensorboard"]
    assert TrainingArguments(output_dir="o", report_to=["all"]).report_to == ["all"]
    with pytest.raises(ValueError, match="report_to must be none, all or some of tensorboard, wandb, got 'mlflow'"):
        TrainingArguments(output_dir="o", report_to="mlflow")
    with pytest.raises(ValueError, match="cannot be combined"):
        TrainingArguments(output_dir="o", report_to=["none", "wandb"])
    for bad in ("15:10", "0:3", "10", "a:b"):
        with pytest.raises(ValueError, match="profile_steps must be START:STOP"):
            TrainingArguments(output_dir="o", profile_steps=bad)


def test_train_without_wandb_installed_stops_before_any_work(tmp_path, monkeypatch, capsys):
    from bart_jax.training import main

    monkeypatch.setitem(sys.modules, "wandb", None)
    code = main(["--output_dir", str(tmp_path / "run"), "--train_file", str(tmp_path / "absent.jsonl"),
                 "--config_name", "absent", "--report_to", "wandb", "--disable_tqdm"])
    assert code == 1
    assert "error: --report_to wandb needs the wandb package (pip install wandb)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
