"""Batch summarization and the `bart-jax summarize` CLI on a small random-weight model with
the real BART tokenizer: equal to transformers' generate and batch_decode document by document
(every returned sequence, its ids and its beam score), bucketing that changes no output and
compiles once per shape, resumable output, bad documents, compilations loaded from the
persistent cache counted as such."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from hf_reference import SHARED_DATA, TOKENIZER_DIR, hf_model, save_hf_model

from bart_jax import load_pretrained
from bart_jax.apps.cli import main
from bart_jax.apps.scores import evaluate, rouge
from bart_jax.apps.summarize import SummaryStats, bucket_batch, bucket_length, iter_summaries, summarize

XSUM = SHARED_DATA / "summarization" / "xsum_hf_fixture_sample.jsonl"
OPTIONS = dict(num_beams=3, max_length=24, min_length=3, no_repeat_ngram_size=3, length_penalty=1.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    model = hf_model("BartForConditionalGeneration", seed=11, vocab_size=50265, d_model=16,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                     max_position_embeddings=96)
    with torch.no_grad():
        # Sharper weights and a likelier EOS, so that summaries differ and end at different lengths.
        for parameter in model.parameters():
            parameter.mul_(2.0)
        model.final_logits_bias[0, model.config.eos_token_id] += 5.0
    directory = save_hf_model(model, tmp_path_factory.mktemp("summarizer") / "model")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return model, directory


@pytest.fixture(scope="module")
def pretrained(model_dir):
    return load_pretrained(model_dir[1])


def documents(count=6):
    with open(XSUM, encoding="utf-8") as f:
        return [json.loads(line)["document"] for line in f][:count]


def test_buckets():
    assert [bucket_length(n, 1024) for n in (1, 32, 33, 500, 1024)] == [32, 32, 64, 512, 1024]
    assert bucket_length(90, 96) == 96
    assert [bucket_batch(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert bucket_batch(5, 6) == 6


def test_summaries_equal_transformers_generate_per_document(model_dir, pretrained):
    model, _ = model_dir
    texts = documents()
    ours = summarize(pretrained, texts, batch_size=4, **OPTIONS)
    tokenizer = transformers.BartTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"))
    expected = []
    for text in texts:
        inputs = tokenizer(text, truncation=True, max_length=96, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, **OPTIONS)
        expected.append(tokenizer.batch_decode(ids, skip_special_tokens=True)[0])
    assert ours == expected
    lengths = {len(tokenizer(summary.strip())["input_ids"]) for summary in expected}
    assert len(lengths) > 1, f"all summaries have the same length {lengths}: EOS handling is not exercised"
    assert len(set(expected)) > 1, "every document got the same summary: the input is not exercised"


def test_every_returned_sequence_with_ids_and_scores_equals_transformers(model_dir, pretrained, tmp_path, capsys):
    model, directory = model_dir
    texts = documents(3)
    source = tmp_path / "in.jsonl"
    write_jsonl(source, [{"document": text} for text in texts])
    assert main(["summarize", str(source), "--model", str(directory), "-o", str(tmp_path / "out.jsonl"),
                 "--no-compilation-cache", "--no-progress", "--num-beams", "3", "--num-return-sequences", "3",
                 "--max-length", "24", "--output-ids", "--batch-size", "4"]) == 0
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    tokenizer = transformers.BartTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"))
    for record, text in zip(records, texts):
        inputs = tokenizer(text, truncation=True, max_length=96, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, num_beams=3, num_return_sequences=3, max_length=24,
                                    output_scores=True, return_dict_in_generate=True)
        assert record["summaries"] == tokenizer.batch_decode(output.sequences, skip_special_tokens=True)
        assert record["summary"] == record["summaries"][0] and record["score"] == record["scores"][0]
        assert record["scores"] == pytest.approx(output.sequences_scores.tolist(), abs=1e-4)
        expected_ids = [[t for t in row.tolist()[1:] if t != tokenizer.pad_token_id] for row in output.sequences]
        assert record["summaries_ids"] == expected_ids and record["summary_ids"] == expected_ids[0]
    report = json.loads(capsys.readouterr().err.split("summary: ")[1].splitlines()[0])
    assert report["generated_tokens"] == sum(len(r["summary_ids"]) for r in records)
    assert 0 < report["padding_efficiency"] <= 1 and report["documents_per_second"] > 0


def test_same_bucket_does_not_recompile(pretrained):
    texts = documents(3)
    summarize(pretrained, texts, batch_size=4, **OPTIONS)
    stats = SummaryStats()
    again = dict(iter_summaries(pretrained, texts[::-1], batch_size=4, stats=stats, **OPTIONS))
    assert stats.compiles == 0, f"a second call in the same bucket compiled {stats.compiles} times"
    assert [again[i] for i in range(3)] == summarize(pretrained, texts[::-1], batch_size=4, **OPTIONS)


def test_evaluate_summarizes_and_scores_with_rouge(pretrained):
    with open(XSUM, encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:3]
    texts, references = [r["document"] for r in records], [r["summary"] for r in records]
    result = evaluate(pretrained, texts, references, batch_size=4, **OPTIONS)
    assert result["summaries"] == summarize(pretrained, texts, batch_size=4, **OPTIONS)
    assert result["metrics"] == rouge(result["summaries"], references)
    assert set(result["metrics"]) >= {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert result["stats"]["documents"] == 3


def test_padding_to_a_bucket_changes_nothing(pretrained):
    texts = documents(5)
    alone = [summarize(pretrained, text, batch_size=1, max_source_length=40, **OPTIONS) for text in texts]
    batched = summarize(pretrained, texts, batch_size=8, max_source_length=40, **OPTIONS)
    assert batched == alone


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def run_cli(*arguments):
    return main(["summarize", *map(str, arguments), "--no-compilation-cache", "--no-progress",
                 "--num-beams", "2", "--max-length", "16"])


def test_cli_jsonl_keeps_ids_and_input_order(model_dir, tmp_path, capsys):
    _, directory = model_dir
    texts = documents(5)
    source = tmp_path / "in.jsonl"
    write_jsonl(source, [{"id": f"doc-{i}", "document": text} for i, text in enumerate(texts)])
    assert run_cli(source, "--model", directory, "-o", tmp_path / "out.jsonl", "--batch-size", "2") == 0
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"doc-{i}" for i in range(5)]
    expected = summarize(load_pretrained(directory), texts, num_beams=2, max_length=16)
    assert [r["summary"] for r in records] == expected
    report = json.loads(capsys.readouterr().err.split("summary: ")[1].splitlines()[0])
    assert report["documents"] == 5 and report["compiles"] >= 1


def assert_same_records(lines, expected_lines):
    """Equal records; beam scores equal up to float32 rounding (batches of other shapes round differently)."""
    records, expected = [json.loads(line) for line in lines], [json.loads(line) for line in expected_lines]
    scores, expected_scores = [r.pop("score", None) for r in records], [r.pop("score", None) for r in expected]
    assert records == expected
    assert scores == pytest.approx(expected_scores, rel=1e-5, abs=1e-6)


def test_cli_resume_after_an_interrupted_run(model_dir, tmp_path, capsys):
    _, directory = model_dir
    texts = documents(6)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8")
    complete = tmp_path / "complete.jsonl"
    assert run_cli(source, "--model", directory, "-o", complete) == 0
    full = complete.read_text().splitlines()

    interrupted = tmp_path / "interrupted.jsonl"
    # An interrupted run: two results written out of order, then a torn line.
    interrupted.write_text(full[4] + "\n" + full[1] + "\n" + full[2][:10], encoding="utf-8")
    capsys.readouterr()
    assert run_cli(source, "--model", directory, "-o", interrupted, "--resume") == 0
    assert_same_records(interrupted.read_text().splitlines(), full)
    report = json.loads(capsys.readouterr().err.split("summary: ")[1].splitlines()[0])
    assert report["skipped_by_resume"] == 2 and report["documents"] == 4


def test_cli_bad_documents_do_not_stop_the_job(model_dir, tmp_path, capsys):
    _, directory = model_dir
    long_text = " ".join(documents(3))
    source = tmp_path / "bad.txt"
    source.write_bytes(b"A short text about the weather.\n\n" + b"Bytes \xff\xfe are not UTF-8 here.\n"
                       + long_text.replace("\n", " ").encode() + b"\n")
    assert run_cli(source, "--model", directory, "-o", tmp_path / "out.jsonl") == 0
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == 4 and records[1]["summary"] == ""
    error = capsys.readouterr().err
    report = json.loads(error.split("summary: ")[1].splitlines()[0])
    assert (report["empty"], report["truncated"], report["replaced_bytes_lines"]) == (1, 1, 1)
    assert "1 empty documents" in error and "truncated" in error and "not UTF-8" in error


@pytest.mark.slow
def test_cli_stdin_to_stdout_and_errors(model_dir, tmp_path):
    _, directory = model_dir
    command = [sys.executable, "-m", "bart_jax", "summarize", "-", "--model", str(directory), "--no-progress",
               "--no-compilation-cache", "--max-length", "8"]
    result = subprocess.run(command, input="First text.\nSecond text here.\n", capture_output=True, text=True,
                            timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["index"] for line in result.stdout.splitlines()] == [0, 1]

    missing = subprocess.run([*command[:4], str(tmp_path / "nope.txt"), *command[5:]], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    source = tmp_path / "fields.jsonl"
    write_jsonl(source, [{"body": "text"}])
    assert run_cli(source, "--model", directory) == 2


@pytest.mark.slow
def test_persistent_compilation_cache_is_filled_and_counted_as_hits(model_dir, tmp_path):
    _, directory = model_dir
    source = tmp_path / "in.txt"
    source.write_text("One short document.\n", encoding="utf-8")
    cache = tmp_path / "xla"
    command = [sys.executable, "-m", "bart_jax", "summarize", str(source), "--model", str(directory), "--no-progress",
               "--compilation-cache", str(cache), "--max-length", "8"]
    reports = []
    for _ in range(2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        reports.append(json.loads(result.stderr.split("summary: ")[1].splitlines()[0]))
        assert any(cache.iterdir()), "no executable was written to the persistent compilation cache"
    assert reports[0]["compiles"] >= 1 and reports[0]["cache_hits"] == 0
    # The second process loads what the first compiled: cache hits, no compilation.
    assert reports[1]["compiles"] == 0 and reports[1]["cache_hits"] >= 1, reports


@pytest.mark.slow
def test_warmup_compiles_ahead_into_the_persistent_cache(model_dir, tmp_path):
    _, directory = model_dir
    cache = tmp_path / "xla"
    command = [sys.executable, "-m", "bart_jax", "warmup", "--model", str(directory), "--compilation-cache", str(cache),
               "--batch-size", "2", "--lengths", "32", "--max-length", "8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "compiled 2 shapes" in result.stderr  # batch buckets 1 and 2, one length
    assert any(cache.iterdir()), "warmup wrote nothing to the persistent compilation cache"
