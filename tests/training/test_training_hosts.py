"""train.py over several processes: two localhost processes of 4 simulated CPU devices each,
joined by `jax.distributed`, train the weights that one process of 8 devices trains, and still do
after both are killed mid-run and started again."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy
from hf_reference import SHARED_DATA, hf_model, save_hf_model

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir, output_dir, devices: int, cache_dir, *process) -> subprocess.Popen:
    # fsdp: the parameters and optimizer state are sharded, so each process saves its own shards.
    # Dropout on: the dropout masks must not depend on how the batch is split.
    arguments = ["--task", "seq2seq", "--model_name_or_path", str(model_dir), "--train_file",
                 str(SHARED_DATA / "summarization" / "xsum_bbc_extracts_dev.jsonl"), "--validation_file",
                 str(SHARED_DATA / "summarization" / "xsum_hf_fixture_sample.jsonl"), "--max_source_length", "32",
                 "--max_target_length", "8", "--per_device_train_batch_size", "1", "--per_device_eval_batch_size",
                 "1", "--max_steps", str(STEPS), "--save_steps", "2", "--logging_steps", "1", "--max_eval_samples",
                 "8", "--predict_with_generate", "--num_beams", "2", "--val_max_target_length", "6",
                 "--learning_rate", "1e-3", "--config_overrides", "dropout=0.1", "--mesh", "fsdp",
                 "--output_dir", str(output_dir), "--disable_tqdm", *process]
    environment = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                       JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return subprocess.Popen([sys.executable, os.path.join(REPOSITORY, "train.py"), *arguments], cwd=REPOSITORY,
                            env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def start_two(model_dir, output_dir, cache_dir) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{free_port()}"
    return [start(model_dir, output_dir, 4, cache_dir, "--coordinator_address", address, "--num_processes", "2",
                  "--process_id", str(process_id)) for process_id in range(2)]


def finish(process: subprocess.Popen) -> str:
    _, error = process.communicate(timeout=600)
    assert process.returncode == 0, f"train.py failed:\n{error[-3000:]}"
    return error


def committed_steps(output_dir) -> list[int]:
    directory = output_dir / "checkpoints"
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if directory.exists() else []


def metrics(output_dir) -> list[dict]:
    with open(output_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_two_processes_train_what_one_process_trains_even_when_killed_and_restarted(tmp_path, bart_tokenizer):
    model_dir = save_hf_model(hf_model("BartForConditionalGeneration", seed=5, vocab_size=50265, encoder_layers=1,
                                       decoder_layers=1), tmp_path / "model")
    bart_tokenizer.save_pretrained(model_dir)
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one = start(model_dir, one_dir, 8, tmp_path / "cache-one")
    finish(one)

    two = start_two(model_dir, two_dir, tmp_path / "cache-two")
    deadline = time.monotonic() + 600
    while not committed_steps(two_dir) and time.monotonic() < deadline:
        assert all(process.poll() is None for process in two), "a process ended before its first checkpoint"
        time.sleep(0.02)
    for process in two:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_at = committed_steps(two_dir)
    assert killed_at and killed_at[-1] < STEPS, f"the processes were not killed mid-run: {killed_at}"

    restarted = start_two(model_dir, two_dir, tmp_path / "cache-two")
    errors = [finish(process) for process in restarted]
    assert f"resumed from the checkpoint of step {killed_at[-1]}" in errors[0]
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1} over 8 devices of 2 processes" in errors[0], errors[0][-3000:]

    weights = [safetensors.numpy.load_file(str(run / "model" / "params.safetensors")) for run in (one_dir, two_dir)]
    # The cross-process all-reduce sums in another order than the in-process one, so results
    # differ in the last bit (measured: losses by 1 ulp, weights by at most 2.2e-7). The key
    # projections' biases are the exception: softmax ignores them, so their gradient is zero up
    # to rounding, and Adam normalises that rounding noise into steps of up to the learning rate.
    key_biases = {name for name in weights[0] if name.endswith("k_proj/bias")}
    differences = {name: float(np.max(np.abs(weights[1][name] - weights[0][name]))) for name in weights[0]}
    worst = max((difference, name) for name, difference in differences.items() if name not in key_biases)
    assert worst[0] <= 1e-6, f"two processes trained other weights: {worst[1]} differs by {worst[0]:.3g}"
    assert max(differences[name] for name in key_biases) <= 1e-3 * STEPS
    losses = {run: {entry["step"]: entry["loss"] for entry in metrics(run) if "loss" in entry}
              for run in (one_dir, two_dir)}
    assert sorted(losses[two_dir]) == list(range(1, STEPS + 1)), "process 0 alone logs each step once"
    for step, loss in losses[one_dir].items():
        assert abs(losses[two_dir][step] - loss) <= 1e-6 * loss, f"step {step}: loss {losses[two_dir][step]} != {loss}"
    evaluations = [[entry for entry in metrics(run) if "eval_loss" in entry][-1] for run in (one_dir, two_dir)]
    for name in ("eval_loss", "eval_rouge1", "eval_gen_len"):
        assert abs(evaluations[0][name] - evaluations[1][name]) <= 1e-6 * max(1.0, abs(evaluations[0][name])), \
            (name, evaluations)
