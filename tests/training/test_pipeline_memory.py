"""The training pipeline's memory does not grow with the corpus: denoising over a 200 MB JSON-lines
corpus holds as much resident memory as over a 20 MB one (bart_jax/training/pipeline.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hf_reference import SHARED_DATA, TOKENIZER_DIR

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Reads `batches` global batches of 8 denoising blocks of 512 tokens from the corpus argv[1] and
# prints the process's anonymous resident memory (heap, not the page cache of the file read).
MEASURE = """
import sys
from bart_jax.tokenizer import BartTokenizer
from bart_jax.training import features, noise
from bart_jax.training.pipeline import PackingConfig, example_source, training_dataset
from bart_jax.training.sources import open_source

corpus, tokenizer_dir, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = BartTokenizer.from_pretrained(tokenizer_dir)
source = open_source(corpus)
examples = example_source(source, features.document_featurizer(tokenizer, "document", corpus))
packing = PackingConfig(512, tokenizer.bos_token_id, tokenizer.eos_token_id, noise.NoiseConfig(),
                        noise.NoiseVocabulary.from_vocab(tokenizer.backend_tokenizer.get_vocab()))
iterator = iter(training_dataset(examples, range(8), 8, 0, {"input_ids": 512, "labels": 512},
                                 tokenizer.pad_token_id, packing))
for _ in range(batches):
    batch = next(iterator)
    assert batch["labels"].shape == (8, 512)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(len(source), int(status["RssAnon"].split()[0]) * 1024)
"""


def write_corpus(path, megabytes: int) -> int:
    """A JSON-lines corpus of about `megabytes` MB: the XSum extracts, over and over, each copy
    numbered so that no two documents are the same. Returns its size in bytes."""
    with open(SHARED_DATA / "summarization" / "xsum_bbc_extracts_dev.jsonl", encoding="utf-8") as f:
        documents = [json.loads(line)["document"] for line in f if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        copy = 0
        while f.tell() < megabytes * 1_000_000:
            f.write("".join(json.dumps({"document": f"Copy {copy}. {document}"}) + "\n" for document in documents))
            copy += 1
    return os.path.getsize(path)


def resident_memory(corpus, tmp_path) -> tuple[int, int]:
    environment = dict(os.environ, BART_JAX_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", MEASURE, str(corpus), str(TOKENIZER_DIR), "40"], cwd=REPOSITORY,
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    documents, memory = (int(value) for value in result.stdout.split())
    return documents, memory


def test_resident_memory_does_not_grow_with_the_corpus(tmp_path):
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    write_corpus(small, 20)
    write_corpus(large, 200)
    small_documents, small_memory = resident_memory(small, tmp_path)
    large_documents, large_memory = resident_memory(large, tmp_path)
    assert large_documents > 9 * small_documents
    growth = (large_memory - small_memory) / 2**20
    assert growth <= 100, (f"resident memory grew by {growth:.0f} MiB from the 20 MB corpus "
                           f"({small_memory / 2**20:.0f} MiB) to the 200 MB one ({large_memory / 2**20:.0f} MiB)")
