"""train.py end to end on tiny models: every task from the command line, learning, exact resume
after a crash (also one in the middle of saving a checkpoint), a NaN loss, refused output
directories, and the exported model against transformers."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from hf_reference import SHARED_DATA, TOKENIZER_DIR

from bart_jax.training import checkpointing, main

# Every run reads the real tokenizer and data samples.
pytestmark = pytest.mark.shared_data

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
XSUM_TRAIN = str(SHARED_DATA / "summarization" / "xsum_bbc_extracts_dev.jsonl")
XSUM_VALIDATION = str(SHARED_DATA / "summarization" / "xsum_hf_fixture_sample.jsonl")
SQUAD = str(SHARED_DATA / "qa" / "squad_hf_fixture_sample.json")
MRPC = str(SHARED_DATA / "classification" / "mrpc_hf_fixture" / "dev.csv")
TINY_OVERRIDES = ("d_model=16,encoder_layers=1,decoder_layers=1,encoder_attention_heads=2,decoder_attention_heads=2,"
                  "encoder_ffn_dim=32,decoder_ffn_dim=32,max_position_embeddings=64")


def read_metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_cli(argv, capsys) -> int:
    code = main(argv + ["--disable_tqdm"])
    captured = capsys.readouterr()
    assert code == 0, f"train.py failed: {captured.err[-2000:]}"
    return code


def seq2seq_arguments(model_dir, output_dir, *extra):
    return ["--task", "seq2seq", "--model_name_or_path", model_dir, "--train_file", XSUM_TRAIN,
            "--max_source_length", "48", "--max_target_length", "16", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--output_dir", str(output_dir), *extra]


@pytest.mark.slow
def test_seq2seq_fine_tuning_evaluates_checkpoints_and_exports_for_transformers(tiny_model_dir, tmp_path, capsys):
    import torch
    import transformers

    from bart_jax import load_pretrained

    output_dir = tmp_path / "run"
    run_cli(seq2seq_arguments(tiny_model_dir, output_dir, "--validation_file", XSUM_VALIDATION, "--max_steps", "4",
                              "--logging_steps", "2", "--save_steps", "2", "--eval_steps", "2", "--max_eval_samples",
                              "4", "--predict_with_generate", "--num_beams", "1", "--val_max_target_length", "8"),
            capsys)
    entries = read_metrics(output_dir)
    train_entries = [entry for entry in entries if "loss" in entry]
    assert [entry["step"] for entry in train_entries] == [2, 4]
    for entry in train_entries:
        assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch"} <= set(entry), entry
        assert np.isfinite(entry["loss"]) and entry["tokens_per_second"] > 0
    evaluations = [entry for entry in entries if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4], "evaluation every 2 steps and at the end"
    assert {"eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_gen_len"} <= set(evaluations[-1])
    assert sorted(os.listdir(output_dir / "checkpoints")) == ["2", "4"]

    # The exported transformers directory gives the logits of the trained bart_jax model.
    ours = load_pretrained(output_dir / "model")
    reference = transformers.BartForConditionalGeneration.from_pretrained(output_dir / "hf_model").eval()
    ids = np.array(ours.tokenizer(["A short test input.", "Another one, longer than the first."],
                                  padding=True)["input_ids"])
    mask = (ids != ours.config.pad_token_id).astype(np.int64)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    logits = np.asarray(ours(input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(logits, expected, atol=1e-4, err_msg="exported model differs from the trained one")
    # final_logits_bias is a buffer in transformers: training must leave it as it was.
    initial = safetensors.numpy.load_file(os.path.join(tiny_model_dir, "model.safetensors"))["final_logits_bias"]
    np.testing.assert_array_equal(np.asarray(ours.params["final_logits_bias"]), initial)


@pytest.mark.slow
def test_scanned_and_rematerialised_training_train_and_generate_as_plain_training(tiny_model_dir, tmp_path, capsys):
    options = {"plain": [], "remat": ["--remat_policy", "full"], "scan": ["--scan_layers"]}
    runs = {}
    for name, extra in options.items():
        output_dir = tmp_path / name
        run_cli(seq2seq_arguments(tiny_model_dir, output_dir, "--validation_file", XSUM_VALIDATION, "--max_steps", "2",
                                  "--max_eval_samples", "4", "--predict_with_generate", "--num_beams", "2",
                                  "--val_max_target_length", "8", *extra), capsys)
        # The exported model is unstacked whatever the layout trained: its names are the plain run's.
        runs[name] = (safetensors.numpy.load_file(str(output_dir / "model" / "params.safetensors")),
                      [entry for entry in read_metrics(output_dir) if "eval_loss" in entry][-1])
    plain, plain_eval = runs.pop("plain")
    for name, (params, evaluation) in runs.items():
        assert sorted(params) == sorted(plain), f"{name}: exported weights {sorted(set(params) ^ set(plain))} differ"
        for key in plain:
            np.testing.assert_allclose(params[key], plain[key], atol=1e-5, err_msg=f"{key}: the {name} run differs")
        assert evaluation["eval_gen_len"] == plain_eval["eval_gen_len"], (name, evaluation, plain_eval)
        assert evaluation["eval_loss"] == pytest.approx(plain_eval["eval_loss"], abs=1e-5), (name, evaluation)


def _sentiment_csv(path, count, seed):
    rng = np.random.default_rng(seed)
    good, bad = ["great", "excellent", "wonderful", "superb"], ["awful", "terrible", "horrible", "dreadful"]
    filler = ["the", "film", "was", "really", "plot", "acting", "quite", "music", "story", "a"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        for i in range(count):
            positive = i % 2 == 0
            words = list(rng.choice(filler, 5)) + [rng.choice(good if positive else bad)]
            rng.shuffle(words)
            writer.writerow([" ".join(words).capitalize() + ".", "positive" if positive else "negative"])


@pytest.mark.slow
def test_classification_head_learns_a_synthetic_task(tiny_model_dir, tmp_path, capsys):
    _sentiment_csv(tmp_path / "train.csv", 256, seed=0)  # enough for every seed to generalise
    _sentiment_csv(tmp_path / "validation.csv", 32, seed=1)
    output_dir = tmp_path / "run"
    run_cli(["--task", "classify", "--model_name_or_path", tiny_model_dir, "--train_file", str(tmp_path / "train.csv"),
             "--validation_file", str(tmp_path / "validation.csv"), "--text_column", "sentence",
             "--max_seq_length", "16", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
             "--learning_rate", "3e-3", "--warmup_steps", "5", "--max_steps", "96", "--logging_steps", "8",
             "--save_steps", "96", "--output_dir", str(output_dir)], capsys)
    final = read_metrics(output_dir)[-1]
    assert final["eval_accuracy"] >= 0.9, f"the classifier did not learn: {final}"
    config = json.loads((output_dir / "hf_model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["architectures"] == ["BartForSequenceClassification"]


@pytest.mark.slow
def test_question_answering_runs_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    output_dir = tmp_path / "run"
    run_cli(["--task", "qa", "--model_name_or_path", tiny_model_dir, "--train_file", SQUAD, "--validation_file",
             SQUAD, "--version_2_with_negative", "--max_seq_length", "64", "--per_device_train_batch_size", "4",
             "--max_steps", "3", "--save_steps", "3", "--output_dir", str(output_dir)], capsys)
    final = read_metrics(output_dir)[-1]
    assert {"eval_loss", "eval_exact_match", "eval_f1"} <= set(final), final
    assert 0.0 <= final["eval_exact_match"] <= final["eval_f1"] <= 1.0
    assert sorted(os.listdir(output_dir / "checkpoints")) == ["3"]
    assert json.loads((output_dir / "hf_model" / "config.json").read_text())["architectures"] == [
        "BartForQuestionAnswering"]


@pytest.mark.slow
def test_denoising_pre_training_from_a_config_preset_lowers_the_loss(tmp_path, capsys):
    output_dir = tmp_path / "run"
    run_cli(["--task", "denoise", "--config_name", os.path.join(REPOSITORY, "configs", "bart-base"),
             # No dropout: its random masks make the step slow to compile.
             "--config_overrides", TINY_OVERRIDES + ",dropout=0,attention_dropout=0,activation_dropout=0",
             "--tokenizer_name", str(TOKENIZER_DIR), "--train_file", XSUM_TRAIN, "--text_column", "document",
             "--max_source_length", "32", "--per_device_train_batch_size", "4",
             "--learning_rate", "2e-2", "--max_steps", "30", "--logging_steps", "5", "--save_steps", "30",
             "--output_dir", str(output_dir)], capsys)
    entries = read_metrics(output_dir)
    losses = [entry["loss"] for entry in entries if "loss" in entry]
    assert losses[-1] < losses[0] - 1.5, f"the denoising loss did not drop: {losses}"
    assert json.loads((output_dir / "model" / "config.json").read_text())["d_model"] == 16


CRASH_IN_SAVE = """
import os, sys
from orbax.checkpoint._src.path import atomicity

finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def crash_before_commit(self, *args, **kwargs):
    # The process dies with every file of this checkpoint written but not yet renamed into place.
    if self.get_final().name == sys.argv[1]:
        os._exit(3)
    return await finalize(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = crash_before_commit
from bart_jax.training import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_run_killed_while_saving_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    # Each run is its own process; they share a compilation cache so that only the first compiles.
    environment = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla-cache"),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

    def run(output_dir, crash_at: str = ""):
        # Dropout on, so that the restored dropout key matters too.
        arguments = seq2seq_arguments(tiny_model_dir, output_dir, "--config_overrides", "dropout=0.1", "--max_steps",
                                      "6", "--logging_steps", "1", "--save_steps", "2", "--disable_tqdm")
        command = ["-c", CRASH_IN_SAVE, crash_at] if crash_at else [os.path.join(REPOSITORY, "train.py")]
        return subprocess.run([sys.executable, *command, *arguments], cwd=REPOSITORY, env=environment,
                              capture_output=True, text=True, timeout=300)

    finished = run(tmp_path / "uninterrupted")
    assert finished.returncode == 0, finished.stderr[-2000:]
    crashed = run(tmp_path / "resumed", crash_at="4")
    assert crashed.returncode == 3, f"the run was meant to die saving step 4: {crashed.stderr[-2000:]}"
    reader = checkpointing.Checkpointer(str(tmp_path / "resumed"))
    assert reader.latest_step() == 2, "a checkpoint that was not committed must not count as the latest"
    reader.close()
    resumed = run(tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from the checkpoint of step 2" in resumed.stderr

    expected = safetensors.numpy.load_file(str(tmp_path / "uninterrupted" / "model" / "params.safetensors"))
    resumed_params = safetensors.numpy.load_file(str(tmp_path / "resumed" / "model" / "params.safetensors"))
    for name in expected:
        np.testing.assert_array_equal(resumed_params[name], expected[name], err_msg=f"{name} differs after resuming")
    losses = [(entry["step"], entry["loss"]) for entry in read_metrics(tmp_path / "uninterrupted")]
    assert [(entry["step"], entry["loss"]) for entry in read_metrics(tmp_path / "resumed")] == losses, \
        "the resumed run must see the same batches and dropout masks"
    progress = []
    for name in ("uninterrupted", "resumed"):
        reader = checkpointing.Checkpointer(str(tmp_path / name))
        progress.append(reader.progress(6))
        reader.close()
    assert progress[0] == progress[1], progress
    positions = [json.loads((tmp_path / name / "checkpoints" / "6" / "data" / "process_0-of-1.json").read_text())
                 for name in ("uninterrupted", "resumed")]
    assert positions[0] == positions[1], "the input pipelines must stand at the same place"


@pytest.mark.slow
def test_sharded_training_over_two_devices_matches_one_device(tiny_model_dir, tmp_path, capsys):
    def arguments(output_dir, per_device_batch):
        return ["--task", "classify", "--model_name_or_path", tiny_model_dir, "--train_file", MRPC,
                "--text_pair_column", "sentence2", "--max_seq_length", "32", "--per_device_train_batch_size",
                per_device_batch, "--max_steps", "1", "--learning_rate", "1e-3", "--output_dir", str(output_dir),
                "--disable_tqdm"]

    run_cli(arguments(tmp_path / "one", "4"), capsys)
    # Two host devices, the same 4 examples per step: 2 per device, parameters split (FSDP).
    environment = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    sharded = subprocess.run([sys.executable, os.path.join(REPOSITORY, "train.py"),
                              *arguments(tmp_path / "two", "2"), "--mesh", "fsdp"],
                             cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    one = safetensors.numpy.load_file(str(tmp_path / "one" / "model" / "params.safetensors"))
    two = safetensors.numpy.load_file(str(tmp_path / "two" / "model" / "params.safetensors"))
    for name in one:
        np.testing.assert_allclose(two[name], one[name], atol=1e-5, err_msg=f"{name}: sharded run differs")


@pytest.mark.slow
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path, capsys):
    output_dir = tmp_path / "run"
    code = main(seq2seq_arguments(tiny_model_dir, output_dir, "--learning_rate", "1e30", "--max_steps", "5",
                                  "--logging_steps", "1", "--save_steps", "1", "--disable_tqdm"))
    error = capsys.readouterr().err
    assert code == 1
    assert "the loss or gradient became" in error and "at step 2" in error, error
    assert "the last good checkpoint is step 1" in error, error
    assert sorted(os.listdir(output_dir / "checkpoints")) == ["1"]
    assert not (output_dir / "model").exists(), "a diverged run must not export a model"


def test_bad_inputs_are_refused_with_a_clear_message(tiny_model_dir, tmp_path, capsys):
    other_run = tmp_path / "other"
    (other_run / "checkpoints" / "3").mkdir(parents=True)
    (other_run / "run_config.json").write_text(json.dumps({"task": "classify"}))
    assert main(seq2seq_arguments(tiny_model_dir, other_run, "--max_steps", "1")) == 1
    assert "holds checkpoints of a different run" in capsys.readouterr().err

    assert main(seq2seq_arguments(tiny_model_dir, tmp_path / "new", "--summary_column", "headline",
                                  "--max_steps", "1")) == 1
    assert "has no column 'headline'; its columns are ['document', 'id', 'source_path', 'summary', 'url']" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_dataset_name_trains_on_the_named_splits_of_a_local_dataset(tiny_model_dir, tmp_path, capsys):
    """--dataset_name goes through `datasets.load_dataset`; offline, a local dataset directory."""
    pytest.importorskip("datasets", reason="--dataset_name reads through datasets")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(XSUM_TRAIN, corpus / "train.jsonl")
    shutil.copy(XSUM_VALIDATION, corpus / "validation.jsonl")
    output_dir = tmp_path / "run"
    run_cli(["--task", "seq2seq", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(corpus),
             "--validation_split", "validation", "--max_eval_samples", "4", "--max_train_samples", "16",
             "--max_source_length", "32", "--max_target_length", "8", "--per_device_train_batch_size", "4",
             "--max_steps", "3", "--eval_steps", "3", "--logging_steps", "1", "--output_dir", str(output_dir)], capsys)
    entries = read_metrics(output_dir)
    assert [entry["step"] for entry in entries if "eval_loss" in entry] == [3]
    # 16 examples in batches of 4: the epoch counts over the first 16 records only.
    assert [entry["epoch"] for entry in entries if "loss" in entry][-1] == 0.75
    assert json.loads((output_dir / "run_config.json").read_text())["dataset_name"] == str(corpus)
