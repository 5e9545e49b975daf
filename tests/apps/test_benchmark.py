"""The benchmark runs end to end on a tiny shape (a smoke test: no timing is asserted), and its parts."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bart_jax.apps.benchmark import (
    HUGE_PAGES_TUNABLE,
    Setup,
    model_flops,
    peak_memory_mib,
    stolen_cpu_seconds,
    worker_environment,
)
from bart_jax.apps.cli import main


@pytest.mark.slow
def test_benchmark_runs_and_systems_agree(tmp_path, capsys, tokenizer_dir):
    output = tmp_path / "bench.jsonl"
    code = main(["bench", "--shape", "tiny", "--batch", "2", "--source-length", "16", "--target", "8",
                 "--greedy-target", "6", "--train-target", "4", "--repeats", "1", "--systems", "bart_jax",
                 "transformers", "--tokenizer-dir", str(tokenizer_dir), "--output", str(output)])
    assert code == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert {(r["workload"], r["system"]) for r in rows} == {
        (w, s) for w in ("W1", "W2", "W3", "W4") for s in ("bart_jax", "transformers")}
    for row in rows:
        assert row["median_s"] > 0 and row["first_call_s"] > 0
        if stolen_cpu_seconds() is not None:
            assert row["stolen_s"] >= 0 and row["first_call_stolen_s"] >= 0, row
        if row["workload"] in ("W1", "W2"):
            assert row["same_tokens_as_transformers"] is True, f"{row['system']} {row['workload']} ids differ"
    assert "| W1 | bart_jax |" in capsys.readouterr().out


def test_stolen_cpu_time_never_decreases():
    first = stolen_cpu_seconds()
    if first is None:
        pytest.skip("this system reports no CPU steal")
    np.asarray(np.ones((512, 512)) @ np.ones((512, 512)))
    assert stolen_cpu_seconds() >= first >= 0


def test_flop_count_of_the_encoder():
    config = dict(d_model=8, vocab_size=10, encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_layers=1,
                  decoder_layers=1)
    setup = Setup("", batch=1, source_length=2, target=2, greedy_target=2, train_target=2, seed=0, threads=1)
    # One layer: q,k,v,out (4 d^2) and fc1, fc2 (2 d ffn) per token, two tokens; scores and
    # weighted values (2 s^2 d); two FLOPs per multiply-add.
    assert model_flops(config, "W3", setup) == 2 * 2 * (4 * 64 + 2 * 8 * 16) + 2 * 2 * 4 * 8


def test_peak_memory_counts_this_process_allocations():
    before = peak_memory_mib()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    after = peak_memory_mib()
    assert block.sum() > 0
    assert after >= max(before, 64), f"peak {after:.0f} MiB after allocating 64 MiB (was {before:.0f} MiB)"


@pytest.mark.parametrize("previous, huge_pages, inside", [
    (None, True, HUGE_PAGES_TUNABLE),
    ("glibc.malloc.arena_max=2", True, f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"),
    ("glibc.malloc.hugetlb=0", True, "glibc.malloc.hugetlb=0"),
    (None, False, None),
])
def test_worker_environment_adds_huge_pages_and_restores(monkeypatch, previous, huge_pages, inside):
    if previous is None:
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    else:
        monkeypatch.setenv("GLIBC_TUNABLES", previous)
    with worker_environment(huge_pages):
        assert os.environ.get("GLIBC_TUNABLES") == inside, "environment the workers start with"
    assert os.environ.get("GLIBC_TUNABLES") == previous, "the parent's environment is restored"
