"""train.py on several devices without --mesh: data-parallel over all of them, evaluation's
generation sharded too, and the same weights and metrics as one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from hf_reference import SHARED_DATA, hf_model, save_hf_model

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train(model_dir, output_dir, devices: int, per_device_batch: int) -> subprocess.CompletedProcess:
    arguments = ["--task", "seq2seq", "--model_name_or_path", str(model_dir), "--train_file",
                 str(SHARED_DATA / "summarization" / "xsum_bbc_extracts_dev.jsonl"), "--validation_file",
                 str(SHARED_DATA / "summarization" / "xsum_hf_fixture_sample.jsonl"), "--max_source_length", "32",
                 "--max_target_length", "8", "--per_device_train_batch_size", str(per_device_batch),
                 "--per_device_eval_batch_size", str(per_device_batch), "--max_steps", "2", "--eval_steps", "2",
                 "--max_eval_samples", "4", "--predict_with_generate", "--num_beams", "2",
                 "--val_max_target_length", "6", "--learning_rate", "1e-3", "--output_dir", str(output_dir),
                 "--disable_tqdm"]
    environment = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, os.path.join(REPOSITORY, "train.py"), *arguments], cwd=REPOSITORY,
                          env=environment, capture_output=True, text=True, timeout=600)


def test_two_devices_without_mesh_train_data_parallel_like_one_device(tmp_path, bart_tokenizer):
    model_dir = save_hf_model(hf_model("BartForConditionalGeneration", seed=3, vocab_size=50265, encoder_layers=1,
                                       decoder_layers=1), tmp_path / "model")
    bart_tokenizer.save_pretrained(model_dir)
    one = train(model_dir, tmp_path / "one", devices=1, per_device_batch=4)
    assert one.returncode == 0, one.stderr[-2000:]
    two = train(model_dir, tmp_path / "two", devices=2, per_device_batch=2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "data-parallel over all of them" in two.stderr, "two devices did not default to a data mesh"
    weights = [safetensors.numpy.load_file(str(tmp_path / run / "model" / "params.safetensors"))
               for run in ("one", "two")]
    for name in weights[0]:
        np.testing.assert_allclose(weights[1][name], weights[0][name], atol=1e-5,
                                   err_msg=f"{name}: two devices trained other weights")
    evaluations = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl", encoding="utf-8")
                    if "eval_loss" in line][-1] for run in ("one", "two")]
    for name in ("eval_loss", "eval_rouge1", "eval_gen_len"):
        assert abs(evaluations[0][name] - evaluations[1][name]) <= 1e-4, (name, evaluations)
