"""`bart-jax summarize` streams: its peak resident memory for 10x more documents stays within
100 MiB (a tiny model; documents read, tokenised and written one window at a time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hf_reference import tiny_summarizer

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Runs the command in this process and prints its peak resident memory (Linux's VmHWM) at the end.
PROGRAM = """
import sys
from bart_jax.apps.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(f"peak_kib={peak}", file=sys.stderr)
sys.exit(code)
"""
WORDS = ("council river match library season bridge vote goal storm market school road budget team "
         "minister court hospital museum harbour festival").split()


def write_documents(path, count: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for index in range(count):
            words = [WORDS[(index * 7 + k * 3) % len(WORDS)] for k in range(40 + index % 60)]
            f.write(json.dumps({"id": f"doc-{index}", "document": " ".join(words) + "."}) + "\n")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc for peak memory")
def test_peak_memory_is_flat_in_the_number_of_documents(tmp_path, tokenizer_dir):
    directory = tiny_summarizer(tmp_path / "model", tokenizer_dir, seed=1, max_position_embeddings=128)
    peaks = {}
    for count in (1_000, 10_000):
        source, output = tmp_path / f"in-{count}.jsonl", tmp_path / f"out-{count}.jsonl"
        write_documents(source, count)
        result = subprocess.run(
            [sys.executable, "-c", PROGRAM, "summarize", str(source), "-o", str(output), "--model", str(directory),
             "--no-progress", "--no-compilation-cache", "--num-beams", "1", "--max-length", "3", "--min-length", "0",
             "--batch-size", "64", "--window", "1000"],
            cwd=REPO, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(output, encoding="utf-8") as f:
            assert sum(1 for _ in f) == count, "not every document was summarized"
        peaks[count] = int(result.stderr.rsplit("peak_kib=", 1)[1].split()[0]) / 1024
    growth = peaks[10_000] - peaks[1_000]
    assert growth <= 100, f"peak resident memory {peaks[1_000]:.0f} MiB for 1,000 documents, " \
                          f"{peaks[10_000]:.0f} MiB for 10,000: +{growth:.0f} MiB"
