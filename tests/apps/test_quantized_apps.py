"""int8 in the applications: `--quantize` of the model commands, the benchmark's `bart_jax_int8`
system and its latency rows (batch 1 and 4 beside the headline batch)."""

from __future__ import annotations

import json

import pytest

from bart_jax.apps import cli
from bart_jax.apps.benchmark.runner import jobs


def test_latency_rows_follow_each_generation_workload():
    assert jobs(["W1", "W2", "W3", "W4"], 8, [1, 4]) == [
        ("W1", 8), ("W1", 1), ("W1", 4), ("W2", 8), ("W2", 1), ("W2", 4), ("W3", 8), ("W4", 8)]
    # The headline batch and repeated sizes run once; no latency batches: the headline only.
    assert jobs(["W2"], 4, [1, 4, 1]) == [("W2", 4), ("W2", 1)]
    assert jobs(["W1"], 4, []) == [("W1", 4)]


def test_bench_refuses_a_batch_below_one(tmp_path, capsys):
    assert cli.main(["bench", "--latency-batches", "0", "--output", str(tmp_path / "bench.jsonl")]) == 2
    assert "batch sizes must be positive" in capsys.readouterr().err
    assert not (tmp_path / "bench.jsonl").exists()


def test_quantize_flags_reach_load_pretrained(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "load_pretrained", lambda path, **options: seen.update(options, path=path))
    args = cli.build_parser().parse_args(["summarize", "docs.txt", "--model", "m", "--no-compilation-cache",
                                          "--quantize", "int8", "--quantize-layers", "linear"])
    cli._load(args)
    assert seen["quantize"] == "int8" and seen["quantize_layers"] == ["linear"]
    # A resumed job must use the same quantization: it is part of the summaries' settings.
    assert cli.summary_settings(args)["quantize_layers"] == ["linear"]
    plain = cli.build_parser().parse_args(["summarize", "docs.txt", "--model", "m"])
    assert "quantize" not in cli.summary_settings(plain), "float jobs keep their settings hash"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["summarize", "docs.txt", "--quantize", "int4"])


def test_quantize_layers_without_quantize_is_an_error(tmp_path, capsys):
    documents = tmp_path / "docs.txt"
    documents.write_text("A short document.\n")
    code = cli.main(["summarize", str(documents), "--model", str(tmp_path), "--no-compilation-cache",
                     "--quantize-layers", "linear", "-o", str(tmp_path / "out.jsonl")])
    assert code == 2 and "quantize_layers needs quantize" in capsys.readouterr().err


@pytest.mark.slow
def test_int8_system_runs_with_latency_rows(tmp_path, capsys):
    output = tmp_path / "bench.jsonl"
    code = cli.main(["bench", "--shape", "tiny", "--batch", "2", "--latency-batches", "1", "--source-length", "8",
                     "--greedy-target", "4", "--repeats", "1", "--systems", "bart_jax", "bart_jax_int8",
                     "--workloads", "W2", "--output", str(output)])
    assert code == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert {(row["system"], row["batch"], row["latency"]) for row in rows} == {
        (system, batch, batch == 1) for system in ("bart_jax", "bart_jax_int8") for batch in (2, 1)}
    assert all(row["median_s"] > 0 for row in rows)
    assert "| W2 (batch 1) | bart_jax_int8 |" in capsys.readouterr().out
