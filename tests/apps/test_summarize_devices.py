"""Summarization over several devices: batches bucketed to a multiple of the batch shards, and
(in a subprocess on 8 simulated CPU devices, tests/apps/multidevice_summarize.py) data-parallel
summaries, scores and command output equal to those of one device."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from hf_reference import tiny_summarizer, write_xsum_documents

from bart_jax.apps.summarize import batch_buckets, bucket_batch
from bart_jax.apps.summarize_job import job_mesh

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_batches_are_bucketed_to_a_multiple_of_the_batch_shards():
    assert [bucket_batch(rows, 8, shards=8) for rows in (1, 5, 8)] == [8, 8, 8]
    assert [bucket_batch(rows, 32, shards=8) for rows in (1, 9, 17, 32)] == [8, 16, 32, 32]
    assert bucket_batch(20, 20, shards=8) == 24  # the batch size rounded up to a multiple of the shards
    assert batch_buckets(32, shards=8) == [8, 16, 32] and batch_buckets(8) == [1, 2, 4, 8]
    assert [bucket_batch(rows, 6) for rows in (1, 3, 5, 6)] == [1, 4, 6, 6]


def test_one_device_gets_no_mesh():
    assert job_mesh("none") is None and job_mesh("auto") is None  # the test process has one device
    assert job_mesh("data").shape["data"] == 1


@pytest.mark.slow
def test_data_parallel_on_eight_devices_equals_one_device(tmp_path, tokenizer_dir):
    directory = tiny_summarizer(tmp_path / "model", tokenizer_dir, seed=11, max_position_embeddings=64)
    write_xsum_documents(tmp_path / "in.jsonl", 6)
    environment = {**os.environ, "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
    result = subprocess.run([sys.executable, "tests/apps/multidevice_summarize.py", str(directory), str(tmp_path)],
                            cwd=REPO, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-6000:]
