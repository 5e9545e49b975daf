"""What int8 inference costs in quality, on a small model trained here.

Trains a small BART from scratch with train.py on the copy task (each target is its source: one
sentence of the shared XSum text, at most `--length` tokens), then compares float32 with each
quantized setting, on held-out sentences and on as many sentences it was trained on (which it
reproduces better):

    token agreement   the generated ids (greedy and beam search) equal to float32's, position by
                      position over the longer of the two sequences (padding counts as a token);
    exact sequences   rows whose whole generated sequence equals float32's;
    loss              teacher-forced cross-entropy of the reference targets (nats per token), and
                      its difference from float32's.

Also, on the random-weight model of the parity tests' shape, the relative logit error and the
argmax agreement of each setting against float32. Prints a Markdown table and writes JSON.

    python scripts/quantization_quality.py --data ../shared/data --workdir /tmp/int8-quality

Rerunning with the same --workdir reuses the trained model (train.py resumes, and a finished run
is not repeated).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax import load_pretrained
from bart_jax.model import quantization
from bart_jax.tokenizer import BartTokenizer

# (name, load_pretrained's quantize, quantize_layers, computation dtype)
SETTINGS = (
    ("int8", "int8", None, jnp.float32),
    ("int8, linear only", "int8", ("linear",), jnp.float32),
    ("int8-weights", "int8-weights", None, jnp.float32),
    ("int8, bfloat16 activations", "int8", None, jnp.bfloat16),
    ("bfloat16 (no int8)", None, None, jnp.bfloat16),
)
MODEL = ("d_model=128,encoder_layers=2,decoder_layers=2,encoder_attention_heads=4,decoder_attention_heads=4,"
         "encoder_ffn_dim=512,decoder_ffn_dim=512,dropout=0.0,attention_dropout=0.0,max_position_embeddings=128")
SOURCE_FILES = ("summarization/xsum_bbc_extracts_dev.jsonl", "summarization/xsum_hf_fixture_sample.jsonl")


def sentences(data: str) -> list[str]:
    """Every line of the shared XSum documents with at least five words, in file order."""
    lines = []
    for name in SOURCE_FILES:
        with open(os.path.join(data, name), encoding="utf-8") as f:
            for record in map(json.loads, f):
                lines += [line.strip() for line in record["document"].split("\n") if len(line.split()) >= 5]
    return lines


def write_copy_task(data: str, workdir: str, held_out: int) -> tuple[str, str]:
    """train.jsonl and validation.jsonl ({"document": s, "summary": s}); the last `held_out`
    sentences are the validation set."""
    lines = sentences(data)
    if len(lines) <= held_out:
        raise ValueError(f"{data} holds {len(lines)} sentences, fewer than --held-out {held_out}")
    paths = []
    for name, part in (("train", lines[:-held_out]), ("validation", lines[-held_out:])):
        path = os.path.join(workdir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"document": line, "summary": line}) + "\n" for line in part)
        paths.append(path)
    return paths[0], paths[1]


def train(args, train_file: str, validation_file: str) -> str:
    """Runs train.py (from this checkout) and returns the trained model's directory."""
    output = os.path.join(args.workdir, "run")
    model = os.path.join(output, "model")
    if os.path.isdir(model):
        return model
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, os.path.join(root, "train.py"), "--task", "seq2seq",
               "--config_name", os.path.join(root, "configs", "bart-base"), "--config_overrides", MODEL,
               "--tokenizer_name", os.path.join(args.data, "bart-tokenizer"), "--train_file", train_file,
               "--validation_file", validation_file, "--output_dir", output, "--max_steps", str(args.steps),
               "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
               "--warmup_steps", str(args.steps // 10), "--max_source_length", str(args.length),
               "--max_target_length", str(args.length), "--seed", "0", "--logging_steps", "50",
               "--save_steps", str(args.steps), "--eval_steps", str(args.steps), "--disable_tqdm", "true"]
    subprocess.run(command, check=True)
    return model


def batch_of(tokenizer, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, labels) of the copy task, padded to `length` tokens."""
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    labels = np.where(encoded["attention_mask"] == 1, encoded["input_ids"], -100)
    return encoded["input_ids"], encoded["attention_mask"], labels


def loss_of(model, input_ids, attention_mask, labels) -> float:
    """Mean cross-entropy of the labels' tokens (teacher forcing), nats."""
    logits = np.asarray(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits, np.float64)
    mask = labels != -100
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(log_probs, np.where(mask, labels, 0)[..., None], -1)[..., 0]
    return float(-(picked * mask).sum() / mask.sum())


def agreement(ids: np.ndarray, reference: np.ndarray, pad: int) -> tuple[float, float]:
    """(token agreement, exact-sequence fraction) of generated ids against the reference's."""
    width = max(ids.shape[1], reference.shape[1])
    ids = np.pad(ids, ((0, 0), (0, width - ids.shape[1])), constant_values=pad)
    reference = np.pad(reference, ((0, 0), (0, width - reference.shape[1])), constant_values=pad)
    real = (ids != pad) | (reference != pad)  # positions either sequence generated
    return float((ids == reference)[real].mean()), float((ids == reference).all(axis=1).mean())


def trained_model_rows(args, model_dir: str, texts: list[str], sentences_name: str) -> list[dict]:
    reference = load_pretrained(model_dir)
    tokenizer = reference.tokenizer or BartTokenizer.from_pretrained(os.path.join(args.data, "bart-tokenizer"))
    input_ids, attention_mask, labels = batch_of(tokenizer, texts, args.length)
    options = dict(max_length=args.length + 2, min_length=0, no_repeat_ngram_size=0, early_stopping=True)

    def run(model):
        return {"loss": loss_of(model, input_ids, attention_mask, labels),
                "greedy": np.asarray(model.generate(input_ids, attention_mask, num_beams=1, **options)),
                "beam": np.asarray(model.generate(input_ids, attention_mask, num_beams=4, **options))}

    base = run(reference)
    copied = agreement(base["greedy"][:, 1:], np.where(labels == -100, 1, labels), pad=1)[0]
    rows = [{"sentences": sentences_name, "setting": "float32", "loss": base["loss"], "copy_accuracy": copied}]
    for name, quantize, layers, dtype in SETTINGS:
        result = run(load_pretrained(model_dir, dtype=dtype, quantize=quantize, quantize_layers=layers))
        greedy, beam = agreement(result["greedy"], base["greedy"], 1), agreement(result["beam"], base["beam"], 1)
        rows.append({"sentences": sentences_name, "setting": name, "loss": result["loss"],
                     "loss_difference": result["loss"] - base["loss"],
                     "greedy_token_agreement": greedy[0], "greedy_exact": greedy[1],
                     "beam_token_agreement": beam[0], "beam_exact": beam[1]})
    return rows


def random_model_rows() -> list[dict]:
    """Relative logit error and argmax agreement against float32 on the parity tests' tiny
    random-weight shape (vocab 99, d_model 32, one layer each side, perturbed weights)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from hf_reference import random_batch, tiny_flax_model

    module, params = tiny_flax_model("BartForConditionalGeneration")
    input_ids, attention_mask = random_batch(module.config.vocab_size, batch=8, length=24)

    def forward(params, dtype=jnp.float32):
        logits = module.clone(dtype=dtype).apply({"params": params}, input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.astype(jnp.float32)

    forward = jax.jit(forward, static_argnums=1)
    reference = np.asarray(forward(params))
    rows = []
    for name, quantize, layers, dtype in SETTINGS:
        logits = np.asarray(forward(params if quantize is None else quantization.quantize_params(params, quantize, layers),
                                    dtype))
        rows.append({"setting": name,
                     "relative_logit_error": float(np.linalg.norm(logits - reference) / np.linalg.norm(reference)),
                     "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean())})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the shared data folder (summarization/, bart-tokenizer/)")
    parser.add_argument("--workdir", required=True, help="where the data, the training run and results go")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--length", type=int, default=24, help="tokens per sentence (source and target)")
    parser.add_argument("--held-out", type=int, default=64, help="validation sentences")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.length, args.held_out) < 1:
        raise ValueError("--steps, --batch-size, --length and --held-out must be positive")
    os.makedirs(args.workdir, exist_ok=True)
    train_file, validation_file = write_copy_task(args.data, args.workdir, args.held_out)
    model_dir = train(args, train_file, validation_file)
    sets = {}
    for name, path in (("held out", validation_file), ("trained on", train_file)):
        with open(path, encoding="utf-8") as f:
            sets[name] = [json.loads(line)["document"] for line in f][:args.held_out]
    trained = [row for name, texts in sets.items() for row in trained_model_rows(args, model_dir, texts, name)]
    results = {"trained": trained, "random_weights": random_model_rows(),
               "backend": jax.default_backend(), "jax": jax.__version__}
    with open(os.path.join(args.workdir, "quality.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print("| sentences | setting | loss (nats) | loss - fp32 | greedy tokens agree | beam 4 tokens agree "
          "| exact rows greedy / beam |")
    print("|---|---|---|---|---|---|---|")
    for row in results["trained"]:
        if row["setting"] == "float32":
            print(f"| {row['sentences']} | float32 | {row['loss']:.4f} | "
                  f"| (copies {100 * row['copy_accuracy']:.1f}% of tokens) | | |")
            continue
        print(f"| {row['sentences']} | {row['setting']} | {row['loss']:.4f} | {row['loss_difference']:+.4f} "
              f"| {100 * row['greedy_token_agreement']:.1f}% | {100 * row['beam_token_agreement']:.1f}% "
              f"| {100 * row['greedy_exact']:.0f}% / {100 * row['beam_exact']:.0f}% |")
    print("\n| setting (random weights) | relative logit error | argmax agreement |\n|---|---|---|")
    for row in results["random_weights"]:
        print(f"| {row['setting']} | {row['relative_logit_error']:.4f} | {100 * row['argmax_agreement']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
