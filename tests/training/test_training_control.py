"""train.py's logging and control options end to end on a tiny model trained from scratch:
TensorBoard scalars, a --profile_steps trace, the best checkpoint kept past --save_total_limit and
exported with --load_best_model_at_end, early stopping, and a rerun that keeps the best-so-far state."""

from __future__ import annotations

import csv
import glob
import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from flax import traverse_util
from hf_reference import TOKENIZER_DIR

from bart_jax.training import main

pytestmark = pytest.mark.shared_data

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ("d_model=16,encoder_layers=1,decoder_layers=1,encoder_attention_heads=2,decoder_attention_heads=2,"
        "encoder_ffn_dim=32,decoder_ffn_dim=32,max_position_embeddings=64,dropout=0,attention_dropout=0,"
        "activation_dropout=0")


def sentiment_csv(path, count):
    rng = np.random.default_rng(0)
    words = {"positive": ["great", "superb"], "negative": ["awful", "dreadful"]}
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        for i in range(count):
            label = "positive" if i % 2 else "negative"
            writer.writerow([f"The film was {rng.choice(words[label])} and {rng.choice(['long', 'short'])}.", label])


def checkpoint_params(output_dir, step) -> dict[str, np.ndarray]:
    state = ocp.StandardCheckpointer().restore(os.path.join(output_dir, "checkpoints", str(step), "state"))
    return {key: np.asarray(value) for key, value in traverse_util.flatten_dict(state["params"], sep="/").items()}


@pytest.mark.slow
def test_best_model_early_stopping_tensorboard_and_profile(tmp_path, capsys):
    data = tmp_path / "sentiment.csv"
    sentiment_csv(data, 32)
    output_dir = tmp_path / "run"
    # "Greater is better" on the loss: as the loss falls, the first evaluation stays the best and
    # the run stops two evaluations later.
    argv = ["--task", "classify", "--config_name", os.path.join(REPOSITORY, "configs", "bart-base"),
            "--config_overrides", TINY, "--tokenizer_name", str(TOKENIZER_DIR), "--train_file", str(data),
            "--validation_file", str(data), "--text_column", "sentence", "--max_seq_length", "16",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16", "--learning_rate", "1e-3",
            "--max_steps", "40", "--logging_steps", "2", "--eval_steps", "2", "--save_steps", "4",
            "--save_total_limit", "1", "--metric_for_best_model", "loss", "--greater_is_better", "true",
            "--early_stopping_patience", "2", "--load_best_model_at_end", "--report_to", "tensorboard",
            "--profile_steps", "2:3", "--output_dir", str(output_dir), "--disable_tqdm"]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    entries = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [(entry["step"], entry["eval_loss"]) for entry in entries if "eval_loss" in entry]
    best_step, best, waited, stop_step = None, None, 0, None
    for step, value in evaluations:  # the Trainer's rule, on the logged numbers
        waited = 0 if best is None or value > best else waited + 1
        if best is None or value > best:
            best_step, best = step, value
        if waited >= 2:
            stop_step = step
            break
    assert stop_step is not None and stop_step < 40 and evaluations[-1][0] == stop_step, evaluations
    assert (results["step"], results["best_step"], results["best_metric"]) == (stop_step, best_step, best)
    assert results["eval_loss"] == best, "the printed metrics are the exported (best) model's"

    # The newest checkpoint (save_total_limit 1) and the best one are kept; the exported model is the best.
    assert sorted(int(name) for name in os.listdir(output_dir / "checkpoints")) == sorted({best_step, stop_step})
    exported = safetensors.numpy.load_file(str(output_dir / "model" / "params.safetensors"))
    best_params, last_params = checkpoint_params(output_dir, best_step), checkpoint_params(output_dir, stop_step)
    assert sorted(exported) == sorted(best_params)
    for name in exported:
        np.testing.assert_array_equal(exported[name], best_params[name], err_msg=name)
    assert any(not np.array_equal(exported[name], last_params[name]) for name in exported)

    events = glob.glob(str(output_dir / "tensorboard" / "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 100, "TensorBoard scalars are written"
    assert glob.glob(str(output_dir / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb")), "no trace"

    # Rerunning the command resumes at the early stop: nothing more is trained, the best is the same.
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    rerun = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (rerun["step"], rerun["best_step"], rerun["best_metric"]) == (stop_step, best_step, best)
    logged_again = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [entry for entry in logged_again if "loss" in entry] == [entry for entry in entries if "loss" in entry]
    assert sorted(int(name) for name in os.listdir(output_dir / "checkpoints")) == sorted({best_step, stop_step})
