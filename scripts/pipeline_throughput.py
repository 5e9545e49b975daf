"""Does the training input pipeline keep up with the train step? Tokens per second of the
denoising pipeline alone (read, tokenise, pack, noise, collate) against the tokens per second
that train.py's step consumes, side by side in one run.

    python scripts/pipeline_throughput.py                       # bart-base, 8 x 512, denoising
    python scripts/pipeline_throughput.py --train-file 'shards/*.jsonl' --steps 3

The corpus defaults to the XSum extracts beside the checkout (`../shared/data`), repeated into a
temporary JSON-lines file of `--corpus-mb` MB. The step is train.py's own (AdamW, gradient
clipping, dropout) on a random-weight model of `--config` (configs/), in float32 on the default
device; "tokens" are the batch's rows x length, as the pipeline fills every block. Run from the
repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from bart_jax.config import BartConfig
from bart_jax.model.heads import BartForConditionalGeneration
from bart_jax.tokenizer import BartTokenizer
from bart_jax.training import features, noise
from bart_jax.training.objectives import make_objective
from bart_jax.training.optimizer import learning_rate_schedule, make_optimizer, trainable_mask
from bart_jax.training.pipeline import PackingConfig, example_source, training_dataset
from bart_jax.training.sources import open_source
from bart_jax.training.train_step import compile_train_step, make_train_step

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def repeated_corpus(path: str, megabytes: int) -> str:
    """A JSON-lines corpus of about `megabytes` MB at `path`: the XSum extracts, over and over, each
    copy numbered so that no two documents are the same. Returns `path`."""
    with open(os.path.join(SHARED_DATA, "summarization", "xsum_bbc_extracts_dev.jsonl"), encoding="utf-8") as f:
        documents = [json.loads(line)["document"] for line in f if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        copy = 0
        while f.tell() < megabytes * 1_000_000:
            f.write("".join(json.dumps({"document": f"Copy {copy}. {text}"}) + "\n" for text in documents))
            copy += 1
    return path


def pipeline(corpus: str, tokenizer: BartTokenizer, rows: int, length: int):
    examples = example_source(open_source(corpus), features.document_featurizer(tokenizer, "document", corpus))
    packing = PackingConfig(length, tokenizer.bos_token_id, tokenizer.eos_token_id, noise.NoiseConfig(),
                            noise.NoiseVocabulary.from_vocab(tokenizer.backend_tokenizer.get_vocab()))
    return iter(training_dataset(examples, range(rows), rows, 0, {"input_ids": length, "labels": length},
                                 tokenizer.pad_token_id, packing))


def time_pipeline(batches, count: int) -> float:
    """Seconds per batch, after two batches that start the reader threads."""
    for _ in range(2):
        next(batches)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return (time.perf_counter() - start) / count


def time_train_step(config_name: str, batch: dict, steps: int) -> tuple[float, float]:
    """(compile seconds, seconds per step) of train.py's denoising step on `batch`."""
    config = BartConfig.from_pretrained(os.path.join("configs", config_name))
    module = BartForConditionalGeneration(config)
    ids = batch["input_ids"][:1, :8]
    params = jax.jit(lambda key: module.init(key, ids, ids)["params"])(jax.random.PRNGKey(0))
    schedule = learning_rate_schedule(1e-4, 1000, 10)
    optimizer = make_optimizer(params, schedule, weight_decay=0.01)
    step = make_train_step(make_objective(module, "denoise"), optimizer, trainable_mask(params), schedule)
    train_step, state = compile_train_step(step, params, optimizer)
    micro_batch = jax.tree.map(lambda array: array[None], {name: batch[name] for name in
                                                          ("input_ids", "attention_mask", "labels", "example_mask")})
    dropout = jax.random.PRNGKey(1)
    start = time.perf_counter()
    state, metrics = train_step(state, micro_batch, dropout)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, micro_batch, dropout)
    jax.block_until_ready(metrics)
    return compile_seconds, (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bart-base")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--train-file", help="a JSON-lines corpus (or glob) with a 'document' column")
    parser.add_argument("--corpus-mb", type=int, default=20)
    parser.add_argument("--batches", type=int, default=50, help="pipeline batches timed")
    parser.add_argument("--steps", type=int, default=2, help="train steps timed, after the compiling one")
    args = parser.parse_args()
    tokenizer = BartTokenizer.from_pretrained(os.path.join(SHARED_DATA, "bart-tokenizer"))
    with tempfile.TemporaryDirectory() as directory:
        corpus = args.train_file or repeated_corpus(os.path.join(directory, "corpus.jsonl"), args.corpus_mb)
        batches = pipeline(corpus, tokenizer, args.rows, args.length)
        pipeline_seconds = time_pipeline(batches, args.batches)
        batch = next(batches)
    tokens = args.rows * args.length
    compile_seconds, step_seconds = time_train_step(args.config, batch, args.steps)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, host CPUs: {os.cpu_count()}")
    print(f"batch: {args.rows} x {args.length} denoising blocks ({tokens} tokens)")
    print(f"{'':24}{'s / batch':>12}{'tokens / s':>14}")
    print(f"{'input pipeline':24}{pipeline_seconds:12.4f}{tokens / pipeline_seconds:14,.0f}")
    print(f"{args.config + ' train step':24}{step_seconds:12.4f}{tokens / step_seconds:14,.0f}"
          f"   (compiled in {compile_seconds:.0f} s)")
    print(f"the pipeline makes batches {step_seconds / pipeline_seconds:.1f}x as fast as the step consumes them")
    assert np.all(batch["labels"] != -100), "a denoising block was not full"


if __name__ == "__main__":
    main()
