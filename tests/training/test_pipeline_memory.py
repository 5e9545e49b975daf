"""The training pipeline's memory does not grow with the corpus: denoising over a 200 MB JSON-lines
corpus holds as much resident memory as over a 20 MB one (bart_jax/training/pipeline.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from hf_reference import TOKENIZER_DIR

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = os.path.join(REPOSITORY, "scripts", "pipeline_throughput.py")


def load_script():
    """scripts/pipeline_throughput.py as a module: its corpus writer and pipeline are measured here."""
    spec = importlib.util.spec_from_file_location("pipeline_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Reads `batches` global batches of 8 denoising blocks of 512 tokens from the corpus argv[1] through
# the throughput script's pipeline and prints the number of documents and the process's anonymous
# resident memory (heap, not the page cache of the file read).
MEASURE = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("pipeline_throughput", {SCRIPT!r})
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
corpus, tokenizer_dir, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
iterator = script.pipeline(corpus, script.BartTokenizer.from_pretrained(tokenizer_dir), 8, 512)
for _ in range(batches):
    batch = next(iterator)
    assert batch["labels"].shape == (8, 512)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(len(script.open_source(corpus)), int(status["RssAnon"].split()[0]) * 1024)
"""


def resident_memory(corpus, tmp_path) -> tuple[int, int]:
    environment = dict(os.environ, BART_JAX_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", MEASURE, str(corpus), str(TOKENIZER_DIR), "40"], cwd=REPOSITORY,
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    documents, memory = (int(value) for value in result.stdout.split())
    return documents, memory


def test_resident_memory_does_not_grow_with_the_corpus(tmp_path):
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    script = load_script()
    script.repeated_corpus(str(small), 20)
    script.repeated_corpus(str(large), 200)
    small_documents, small_memory = resident_memory(small, tmp_path)
    large_documents, large_memory = resident_memory(large, tmp_path)
    assert large_documents > 9 * small_documents
    growth = (large_memory - small_memory) / 2**20
    assert growth <= 100, (f"resident memory grew by {growth:.0f} MiB from the 20 MB corpus "
                           f"({small_memory / 2**20:.0f} MiB) to the 200 MB one ({large_memory / 2**20:.0f} MiB)")
