"""Bad inputs, interruptions and concurrent runs of the commands (`bart-jax summarize`,
`convert_weights.py` / `bart-jax convert`, `train.py`) and of the library calls that take token
ids or options: a test module of bad-input cases that grows with every fix.

BAD_CALLS is the corpus: one row per call that must be refused, with the text its one-line
error must hold. Every refused command must exit non-zero without a traceback, before any model
is loaded or training data read, and leave every file of its sandbox as it was. Every refused
library call (rows whose command is "python") must raise ValueError naming the argument before
anything is computed, where it would otherwise return plausible-looking junk or fail deep inside
JAX or numpy. The tests after the table
check what a call that is not refused guarantees: results streamed in input order, an output
locked against a second job, resumable output after SIGKILL, conversions that replace a model
only when asked. Tests marked `slow` run the command in a subprocess to kill it.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types
import warnings
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from hf_reference import TOKENIZER_DIR, hf_model, save_hf_model

from bart_jax import BartTokenizer, load_pretrained, parallel
from bart_jax import pretrained as pretrained_module
from bart_jax.apps import cli, convert, document_io, pipelines, summarize
from bart_jax.checkpoints import files
from bart_jax.generation import generate, resolve_generation_config
from bart_jax.training import loop
from bart_jax.training import main as train_main

generate_module = importlib.import_module("bart_jax.generation.generate")  # the package exports the function

TEXTS = ("The river rose overnight and the old bridge was closed.",
         "Council members voted to keep the library open on Sundays.",
         "A late goal gave the visitors their first win of the season.")
NEVER_LOADED = "model-that-is-never-loaded"  # refused calls fail before the model would load


# --- the sandbox ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(Hugging Face directory, converted bart_jax directory) of one tiny random model."""
    root = tmp_path_factory.mktemp("reliability-models")
    hf = save_hf_model(hf_model("BartForConditionalGeneration", seed=3), root / "hf")
    files.convert_hf_directory(hf, root / "converted")
    return hf, root / "converted"


def fake_summaries(model, texts, batch_size=8, max_source_length=None, seed=0, stats=None, on_batch=None,
                   **options):
    """Stands in for iter_summaries: the summary of text i is "summary of <its first word>"."""
    for index, text in enumerate(texts):
        yield index, f"summary of {text.split()[0] if text.split() else ''}"


def summarize_argv(source, *extra) -> list[str]:
    return ["summarize", str(source), "--model", NEVER_LOADED, "--no-progress", "--no-compilation-cache", *extra]


@pytest.fixture
def fake_model(monkeypatch):
    """The summarize command with a stand-in model: no weights are loaded, nothing is generated."""
    monkeypatch.setattr(cli, "_load", lambda args: None)
    monkeypatch.setattr(cli, "iter_summaries", fake_summaries)


@pytest.fixture
def sandbox(tmp_path, model_dirs, monkeypatch):
    """A directory with inputs, a finished summarize output (`done.jsonl`, default options), a
    Hugging Face model, a converted model, a plain file and training data."""
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    (tmp_path / "file.txt").write_text("not a directory\n", encoding="utf-8")
    (tmp_path / "train.jsonl").write_text(json.dumps({"document": TEXTS[0], "summary": "x"}) + "\n")
    shutil.copytree(model_dirs[0], tmp_path / "hf")
    shutil.copytree(model_dirs[1], tmp_path / "converted")
    with monkeypatch.context() as patch:
        patch.setattr(cli, "_load", lambda args: None)
        patch.setattr(cli, "iter_summaries", fake_summaries)
        assert cli.main(summarize_argv(tmp_path / "in.txt", "-o", str(tmp_path / "done.jsonl"))) == 0
    return tmp_path


def snapshot(root: pathlib.Path) -> dict[str, str]:
    """Every path under root with a digest of its content (files) or target (links)."""
    state = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            state[str(path)] = "-> " + os.readlink(path)
        elif path.is_file():
            state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[str(path)] = "directory"
    return state


# --- preparations some rows need ----------------------------------------------------------------
def link_to_input(root):
    (root / "link.jsonl").symlink_to(root / "in.txt")


def write_a_csv_without_text(root):
    (root / "table.csv").write_text("title,body_text\nA,The river rose.\n", encoding="utf-8")


def input_named_like_the_temporary_output(root):
    shutil.copyfile(root / "in.txt", root / "out.jsonl.tmp")


def hold_the_lock(root):
    return document_io.OutputLock(str(root / "done.jsonl"))  # as another job would


def change_a_document(root):
    (root / "in.txt").write_text("\n".join([TEXTS[0], "A different second document.", TEXTS[2]]) + "\n")


def drop_the_hashes(root):
    records = [json.loads(line) for line in (root / "done.jsonl").read_text().splitlines()]
    (root / "old.jsonl").write_text("".join(
        json.dumps({"index": r["index"], "summary": r["summary"]}) + "\n" for r in records))


def other_input(root):
    (root / "other.jsonl").write_text("".join(
        json.dumps({"id": f"doc-{i}", "text": text}) + "\n" for i, text in enumerate(TEXTS)))


def config_only(root):
    (root / "config_only").mkdir()
    shutil.copyfile(root / "hf" / "config.json", root / "config_only" / "config.json")


def data_where_the_run_writes(root):
    for relative in ("run/metrics.jsonl", "run/run_config.json", "run/model/data.jsonl"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "train.jsonl", root / relative)


@dataclasses.dataclass(frozen=True)
class BadCall:
    name: str
    argv: tuple[str, ...]  # the command first; "{tmp}" is the sandbox; ("python",) for a library call
    expected: str  # in the error line; "{pid}" is this process's pid
    prepare: Optional[Callable] = None
    needs: Optional[str] = None  # a path that must exist (else the row is skipped)
    call: Optional[Callable] = None  # a library call: call(library) with the `library` fixture's models

    def __str__(self):
        return self.name


def python(name: str, expected: str, call: Callable, needs: Optional[str] = None) -> BadCall:
    """A row for a library call (the `library` fixture: vocabulary 99, 64 positions, 3 labels)."""
    return BadCall(name, ("python",), expected, needs=needs, call=call)


IDS = np.array([[0, 5, 6, 2]])  # a valid input of the tiny models


def train_argv(*extra) -> tuple[str, ...]:
    return ("train.py", "--config_name", "configs/bart-base", "--train_file", "{tmp}/train.jsonl", *extra)


SUMMARIZE = ("bart-jax", "summarize", "{tmp}/in.txt")
BAD_CALLS = [
    # an output that is the input (also through a link, or as the temporary file finalize writes)
    BadCall("summarize-output-is-input", (*SUMMARIZE, "-o", "{tmp}/in.txt"), "would overwrite the input"),
    BadCall("summarize-resume-output-is-input", (*SUMMARIZE, "-o", "{tmp}/in.txt", "--resume"),
            "would overwrite the input"),
    BadCall("summarize-output-links-to-input", (*SUMMARIZE, "-o", "{tmp}/link.jsonl"), "would overwrite the input",
            link_to_input),
    BadCall("summarize-temporary-output-is-input",
            ("bart-jax", "summarize", "{tmp}/out.jsonl.tmp", "-o", "{tmp}/out.jsonl"), "would overwrite the input",
            input_named_like_the_temporary_output),
    # an output that cannot be written
    BadCall("summarize-output-parent-missing", (*SUMMARIZE, "-o", "{tmp}/missing/out.jsonl"), "does not exist"),
    BadCall("summarize-output-is-a-directory", (*SUMMARIZE, "-o", "{tmp}"), "is a directory"),
    BadCall("summarize-output-under-a-file", (*SUMMARIZE, "-o", "{tmp}/file.txt/out.jsonl"), "is not a directory"),
    BadCall("summarize-output-is-a-device", (*SUMMARIZE, "-o", "/dev/null"), "is not a regular file",
            needs="/dev/null"),
    BadCall("summarize-output-in-proc", (*SUMMARIZE, "-o", "/proc/out.jsonl"),
            "cannot write output /proc/out.jsonl", needs="/proc"),
    # an output another job is writing
    BadCall("summarize-output-locked", (*SUMMARIZE, "-o", "{tmp}/done.jsonl", "--resume"),
            "in use by another process (pid {pid}", hold_the_lock),
    # resuming from results that no longer fit the input or the options
    BadCall("summarize-resume-document-changed", (*SUMMARIZE, "-o", "{tmp}/done.jsonl", "--resume"),
            "document 1 of the input changed", change_a_document),
    BadCall("summarize-resume-other-options", (*SUMMARIZE, "-o", "{tmp}/done.jsonl", "--resume", "--num-beams", "3"),
            "written with other settings"),
    BadCall("summarize-resume-other-seed", (*SUMMARIZE, "-o", "{tmp}/done.jsonl", "--resume", "--seed", "1"),
            "written with other settings"),
    BadCall("summarize-resume-other-dtype", (*SUMMARIZE, "-o", "{tmp}/done.jsonl", "--resume", "--dtype", "bfloat16"),
            "written with other settings"),
    BadCall("summarize-resume-without-hashes", (*SUMMARIZE, "-o", "{tmp}/old.jsonl", "--resume"),
            "without text and options hashes", drop_the_hashes),
    BadCall("summarize-resume-other-input", ("bart-jax", "summarize", "{tmp}/other.jsonl", "-o", "{tmp}/done.jsonl",
                                             "--resume"), "does not belong to this input", other_input),
    # a destination that holds a model
    BadCall("convert-into-converted-directory", ("convert_weights.py", "{tmp}/hf", "{tmp}/converted"),
            "already holds a model"),
    BadCall("convert-into-hf-directory", ("convert_weights.py", "{tmp}/converted", "{tmp}/hf", "--to-hf"),
            "already holds a model"),
    BadCall("convert-into-config-only", ("bart-jax", "convert", "{tmp}/hf", "{tmp}/config_only"),
            "already holds a model (config.json)", config_only),
    BadCall("convert-into-itself", ("convert_weights.py", "{tmp}/hf", "{tmp}/hf", "--overwrite"),
            "is the source directory"),
    BadCall("convert-into-a-file", ("convert_weights.py", "{tmp}/hf", "{tmp}/file.txt"),
            "exists and is not a directory"),
    BadCall("convert-into-proc", ("convert_weights.py", "{tmp}/hf", "/proc/bart_jax_model"),
            "/proc/bart_jax_model: No such file or directory", needs="/proc"),
    # train.py's --output_dir
    BadCall("train-output-dir-is-a-file", train_argv("--output_dir", "{tmp}/file.txt"), "is a file"),
    BadCall("train-output-dir-under-a-file", train_argv("--output_dir", "{tmp}/file.txt/run"),
            "lies under"),
    BadCall("train-data-is-the-metrics-log", train_argv("--output_dir", "{tmp}/run", "--train_file",
                                                        "{tmp}/run/metrics.jsonl"),
            "lies where the run writes", data_where_the_run_writes),
    BadCall("train-validation-data-is-the-run-config",
            train_argv("--output_dir", "{tmp}/run", "--validation_file", "{tmp}/run/run_config.json"),
            "lies where the run writes", data_where_the_run_writes),
    BadCall("train-data-in-the-exported-model", train_argv("--output_dir", "{tmp}/run", "--train_file",
                                                           "{tmp}/run/model/data.jsonl"),
            "lies where the run writes", data_where_the_run_writes),
    BadCall("train-output-dir-in-proc", train_argv("--output_dir", "/proc/bart_jax_run"),
            "cannot write --output_dir /proc/bart_jax_run", needs="/proc"),
    # token ids the model has no row or position for (JAX would clamp them into junk output)
    python("generate-id-beyond-vocab", "input_ids holds ids outside the vocabulary [0, 99): [99]",
           lambda lib: generate(lib.module, lib.params, np.array([[0, 99, 2]]))),
    python("generate-negative-id", "input_ids holds ids outside the vocabulary [0, 99): [-3]",
           lambda lib: generate(lib.module, lib.params, np.array([[0, -3, 2]]))),
    python("generate-input-too-long", "input_ids has length 65, longer than the model's max_position_embeddings (64)",
           lambda lib: generate(lib.module, lib.params, np.zeros((1, 65), np.int32))),
    python("generate-mask-not-binary", "attention_mask must hold only 0 and 1",
           lambda lib: generate(lib.module, lib.params, IDS, np.array([[1, 1, 2, 1]]))),
    python("jit-generate-id-beyond-vocab", "input_ids holds ids outside the vocabulary [0, 99): [120]",
           lambda lib: lib.jit_generate(lib.params, np.array([[0, 120, 2]]), np.ones((1, 3), np.int32))),
    python("jit-forward-input-too-long", "input_ids has length 65, longer than",
           lambda lib: lib.jit_forward(lib.params, {"input_ids": np.zeros((1, 65), np.int32)})),
    python("jit-decode-step-negative-id", "decoder_input_ids holds ids outside the vocabulary [0, 99): [-1]",
           lambda lib: lib.jit_decode_step(lib.params, np.array([[-1]]), {}, 0, {}, np.ones((1, 4), np.int32))),
    python("pretrained-generate-id-beyond-vocab", "input_ids holds ids outside the vocabulary",
           lambda lib: lib.lm.generate(np.array([[0, 500, 2]]))),
    python("fill-mask-tokenizer-beyond-vocab", "input_ids holds ids outside the vocabulary [0, 99)",
           lambda lib: pipelines.fill_mask(lib.with_tokenizer(), "The river <mask> overnight."),
           needs=str(TOKENIZER_DIR / "tokenizer.json")),  # 50265 tokens for a model of 99
    # degenerate shapes (ZeroDivisionError in attention, numpy's "zero-size array" otherwise)
    python("generate-no-rows", "input_ids has no rows (shape (0, 4))",
           lambda lib: generate(lib.module, lib.params, np.zeros((0, 4), np.int32))),
    python("generate-empty-input", "input_ids is empty (shape (1, 0))",
           lambda lib: generate(lib.module, lib.params, np.zeros((1, 0), np.int32))),
    python("pretrained-no-rows", "input_ids has no rows", lambda lib: lib.lm(input_ids=np.zeros((0, 4), np.int32))),
    python("pretrained-empty-decoder-input-ids", "decoder_input_ids is empty",
           lambda lib: lib.lm(input_ids=IDS, decoder_input_ids=np.zeros((1, 0), np.int32))),
    # options of the wrong type
    python("generate-length-penalty-string", "length_penalty must be a number, got 'big'",
           lambda lib: generate(lib.module, lib.params, IDS, num_beams=2, length_penalty="big")),
    python("generate-temperature-nan", "temperature must be a number, got nan",
           lambda lib: generate(lib.module, lib.params, IDS, temperature=float("nan"))),
    python("generate-prng-key-int", "prng_key must be a JAX PRNG key",
           lambda lib: generate(lib.module, lib.params, IDS, do_sample=True, prng_key=5)),
    python("jit-generate-prng-key-int", "prng_key must be a JAX PRNG key",
           lambda lib: lib.jit_generate(lib.params, IDS, np.ones_like(IDS), 5)),
    # options transformers refuses
    python("generate-bad-words-beyond-vocab", "bad_words_ids holds token ids outside the vocabulary [0, 99): [120]",
           lambda lib: generate(lib.module, lib.params, IDS, bad_words_ids=[[5], [7, 120]])),
    python("fill-mask-top-k-negative", "top_k must be a positive integer, got -1",
           lambda lib: pipelines.fill_mask(lib.lm, "A <mask> day.", top_k=-1)),
    python("fill-mask-top-k-zero", "top_k must be a positive integer, got 0",
           lambda lib: pipelines.fill_mask(lib.lm, "A <mask> day.", top_k=0)),
    # classification labels outside [0, num_labels): a NaN loss above, a finite wrong one below
    python("classifier-label-beyond-num-labels", "labels holds class ids outside [0, 3) (num_labels is 3): [7]",
           lambda lib: lib.classifier(input_ids=IDS, labels=np.array([7]))),
    python("classifier-negative-label", "labels holds class ids outside [0, 3) (num_labels is 3): [-3]",
           lambda lib: lib.classifier(input_ids=IDS, labels=np.array([-3]))),
    python("classifier-labels-per-row", "labels has shape (2,) but input_ids has 1 rows",
           lambda lib: lib.classifier(input_ids=IDS, labels=np.array([0, 1]))),
    # several processes sharing one job
    BadCall("summarize-processes-to-stdout", (*SUMMARIZE, "--process-id", "0", "--num-processes", "2"),
            "cannot share standard output; name the output with -o"),
    BadCall("summarize-process-id-out-of-range",
            (*SUMMARIZE, "-o", "{tmp}/x.jsonl", "--process-id", "2", "--num-processes", "2"),
            "--process-id must be in 0 .. 1"),
    BadCall("summarize-process-id-alone", (*SUMMARIZE, "-o", "{tmp}/x.jsonl", "--process-id", "0"),
            "--process-id and --num-processes go together"),
    BadCall("summarize-no-processes", (*SUMMARIZE, "-o", "{tmp}/x.jsonl", "--num-processes", "0"),
            "--num-processes must be positive"),
    BadCall("summarize-negative-merge-timeout", (*SUMMARIZE, "-o", "{tmp}/x.jsonl", "--process-id", "0",
                                                 "--num-processes", "1", "--merge-timeout", "-1"),
            "--merge-timeout must not be negative"),
    python("jit-train-step-id-beyond-vocab", "input_ids holds ids outside the vocabulary [0, 99): [500]",
           lambda lib: parallel.jit_train_step(lambda state, batch, rng: (state, {}), parallel.make_mesh(),
                                               {"step": jnp.zeros((), jnp.int32)}, config=lib.lm.config)(
               {"step": jnp.zeros((), jnp.int32)}, {"input_ids": np.array([[0, 500, 2]])}, jax.random.PRNGKey(0))),
    # warmup shapes that no input can have
    BadCall("warmup-length-zero", ("bart-jax", "warmup", "--lengths", "0", "--model", NEVER_LOADED),
            "0 is not a positive integer"),
    python("warmup-length-beyond-positions", "warmup lengths must be in 1..64 (max_position_embeddings), got [4096]",
           lambda lib: summarize.warmup(lib.lm, 2, [4096])),
    # summarize inputs and outputs refused before the model loads
    BadCall("summarize-csv-without-text-field", ("bart-jax", "summarize", "{tmp}/table.csv"), "has no field",
            write_a_csv_without_text),
    BadCall("summarize-text-field-on-txt", (*SUMMARIZE, "--text-field", "body"), "which has no fields"),
    BadCall("summarize-parquet-to-stdout", (*SUMMARIZE, "--output-format", "parquet"), "needs an output file"),
    BadCall("summarize-metrics-in-missing-directory", (*SUMMARIZE, "--metrics-output", "{tmp}/missing/m.json"),
            "its directory does not exist"),
]
COMMANDS = [case for case in BAD_CALLS if case.call is None]
LIBRARY_CALLS = [case for case in BAD_CALLS if case.call is not None]


def call(argv: list[str]) -> int:
    """Runs a command line in this process, as its console script would (argparse's own errors
    exit with status 2)."""
    try:
        return _call(argv)
    except SystemExit as exit_:
        return exit_.code


def _call(argv: list[str]) -> int:
    command, arguments = argv[0], argv[1:]
    if arguments[:1] == ["summarize"]:
        return cli.main(summarize_argv(*arguments[1:]))
    if command == "bart-jax":
        return cli.main(arguments)
    if command == "convert_weights.py":
        return convert.main(arguments)
    return train_main([*arguments, "--disable_tqdm"])


def refuse_to_load(*args, **kwargs):
    raise AssertionError("a refused call loaded a model or read data")


@pytest.mark.parametrize("case", COMMANDS, ids=str)
def test_bad_call_is_refused_in_one_line_and_changes_nothing(case, sandbox, monkeypatch, capsys):
    if case.needs and not os.path.exists(case.needs):
        pytest.skip(f"no {case.needs} on this system")
    held = case.prepare(sandbox) if case.prepare else None
    monkeypatch.setattr(cli, "_load", refuse_to_load)
    monkeypatch.setattr(convert, "resolve_model_directory", refuse_to_load)
    monkeypatch.setattr(files, "load_hf_state_dict", refuse_to_load)
    monkeypatch.setattr(files, "open_hf_state_dict", refuse_to_load)
    monkeypatch.setattr(files, "load_converted", refuse_to_load)
    monkeypatch.setattr(files, "open_converted_as_hf", refuse_to_load)
    monkeypatch.setattr(loop, "_set_up", refuse_to_load)
    before = snapshot(sandbox)
    capsys.readouterr()
    try:
        code = call([part.format(tmp=sandbox) for part in case.argv])
        after = snapshot(sandbox)
    finally:
        if held is not None:
            held.release()
    error = capsys.readouterr().err
    assert code != 0, f"{case.name} was not refused: {error}"
    assert "Traceback" not in error
    lines = [line for line in error.splitlines() if line.strip()]
    assert lines and case.expected.format(pid=os.getpid()) in lines[-1], error
    assert after == before, f"{case.name} changed files although it was refused"


@pytest.fixture(scope="module")
def library(model_dirs, tmp_path_factory):
    """The models of the library rows: the tiny generation model (vocabulary 99, 64 positions),
    a 3-way classifier, and the sharded entry points over a one-device mesh."""
    lm = load_pretrained(model_dirs[1])
    classifier = load_pretrained(save_hf_model(hf_model("BartForSequenceClassification", seed=4, num_labels=3),
                                               tmp_path_factory.mktemp("classifier") / "hf"))
    mesh = parallel.make_mesh()
    shardings = parallel.tree_shardings(lm.params, mesh)
    config = resolve_generation_config(lm.module, lm.generation_config, max_new_tokens=4)
    return types.SimpleNamespace(
        lm=lm, classifier=classifier, module=lm.module, params=lm.params,
        with_tokenizer=lambda: dataclasses.replace(lm, tokenizer=BartTokenizer.from_pretrained(TOKENIZER_DIR)),
        jit_generate=parallel.jit_generate(lm.module, mesh, shardings, config),
        jit_forward=parallel.jit_forward(lm.module, mesh, shardings),
        jit_decode_step=parallel.jit_decode_step(lm.module, mesh, shardings),
    )


@pytest.mark.parametrize("case", LIBRARY_CALLS, ids=str)
def test_bad_library_call_is_refused_naming_the_argument(case, library, monkeypatch):
    if case.needs and not os.path.exists(case.needs):
        pytest.skip(f"no {case.needs} (the shared test data)")
    # Refused before generating or running the model (the sharded entry points are jitted already).
    monkeypatch.setattr(generate_module, "generate_static", refuse_to_load)
    monkeypatch.setattr(pretrained_module, "_apply", refuse_to_load)
    with pytest.raises(ValueError) as refused:
        case.call(library)
    assert case.expected in str(refused.value)


def test_valid_library_calls_pass_the_checks(library):
    """The checks of the rows above let valid calls through (the sharded ones too)."""
    key = jax.random.PRNGKey(0)
    assert generate(library.module, library.params, IDS, max_new_tokens=3, bad_words_ids=[[5], [7, 98]]).shape[0] == 1
    assert generate(library.module, library.params, IDS, do_sample=True, prng_key=key, max_new_tokens=3,
                    length_penalty=2).shape[0] == 1
    assert generate(library.module, library.params, IDS, do_sample=True, prng_key=jax.random.key(0),
                    max_new_tokens=3).shape[0] == 1
    assert library.jit_generate(library.params, IDS, np.ones_like(IDS)).sequences.shape[0] == 1
    assert library.jit_forward(library.params, {"input_ids": IDS}).logits.shape == (1, 4, 99)
    loss = library.classifier(input_ids=IDS, labels=np.array([2])).loss
    assert np.isfinite(float(loss))
    assert library.classifier(input_ids=IDS, labels=np.array([-100])).logits.shape == (1, 3)  # ignored, as in torch


def test_min_length_above_max_length_warns_as_transformers(library):
    with pytest.warns(UserWarning, match=r"min_length \(12\) is larger than max_length \(5\)"):
        resolve_generation_config(library.module, library.lm.generation_config, max_length=5, min_length=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_generation_config(library.module, library.lm.generation_config, max_length=12, min_length=5)


# --- results on standard output are streamed in input order -----------------------------------
class RecordingStream:
    def __init__(self):
        self.text, self.flushed = "", ""

    def write(self, text):
        self.text += text

    def flush(self):
        self.flushed = self.text


def test_ordered_writer_flushes_each_completed_prefix():
    stream = RecordingStream()
    writer = document_io.OrderedWriter(stream, [0, 1, 2, 4, 5])  # 3 was done before (resume)
    seen = []
    for index in (2, 0, 1, 5, 4):
        writer.write({"index": index})
        seen.append([json.loads(line)["index"] for line in stream.flushed.splitlines()])
    assert seen == [[], [0], [0, 1, 2], [0, 1, 2], [0, 1, 2, 4, 5]]


def test_stdout_keeps_the_completed_prefix_when_generation_fails(fake_model, monkeypatch, tmp_path, capsys):
    def failing(model, texts, *args, **kwargs):
        yield 1, "second"
        yield 0, "first"
        yield 3, "fourth"  # waits for document 2, which never comes
        raise RuntimeError("the accelerator went away")

    monkeypatch.setattr(cli, "iter_summaries", failing)
    source = tmp_path / "in.txt"
    source.write_text("one\ntwo\nthree\nfour\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="went away"):
        cli.main(summarize_argv(source))
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["index"], r["summary"]) for r in records] == [(0, "first"), (1, "second")]


# --- a write that fails during the job ----------------------------------------------------------
def test_disk_full_stops_with_one_line_and_keeps_the_results_written(sandbox, fake_model, monkeypatch, capsys):
    output = sandbox / "out.jsonl"
    write = document_io.ResultWriter.write

    def fill_the_disk(writer, record):
        if record["index"] == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), writer.path)
        write(writer, record)

    monkeypatch.setattr(document_io.ResultWriter, "write", fill_the_disk)
    assert cli.main(summarize_argv(sandbox / "in.txt", "-o", str(output))) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"bart-jax summarize: error: {output}: No space left on device"
    assert [json.loads(line)["index"] for line in output.read_text().splitlines()] == [0]
    assert not (sandbox / "out.jsonl.lock").exists()
    monkeypatch.setattr(document_io.ResultWriter, "write", write)
    assert cli.main(summarize_argv(sandbox / "in.txt", "-o", str(output), "--resume")) == 0
    assert output.read_text() == (sandbox / "done.jsonl").read_text()


def test_corrupt_model_fails_in_one_line_and_writes_no_output(sandbox, capsys):
    weights = sandbox / "hf" / files.SAFE_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    output = sandbox / "out.jsonl"
    assert cli.main(["summarize", str(sandbox / "in.txt"), "-o", str(output), "--model", str(sandbox / "hf"),
                     "--no-progress", "--no-compilation-cache"]) == 2
    error = capsys.readouterr().err.strip()
    assert "model.safetensors is not a readable safetensors file" in error and len(error.splitlines()) == 1
    assert not output.exists() and not (sandbox / "out.jsonl.lock").exists()


def corrupt_weights(path, how: str) -> str:
    """Damages a safetensors file so that it still parses; returns the name of the tensor hit."""
    tensors = safetensors.numpy.load_file(str(path))
    name = sorted(key for key in tensors if key.replace("/", ".").endswith("fc1.weight"))[0]
    if how == "int32":
        tensors[name] = tensors[name].astype(np.int32)
        safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})
        return name
    # Overwrite bytes in the middle of the tensor's data, as a damaged disk block would: 0xff bytes
    # are NaN in float32 and bfloat16.
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:header])[name]["data_offsets"]
    middle = header + (start + end) // 2 // 4 * 4
    path.write_bytes(data[:middle] + b"\xff" * 64 + data[middle + 64:])
    return name


@pytest.mark.parametrize("how", ["corrupt-data", "int32"])
def test_damaged_weights_are_refused_naming_the_tensor_and_file(sandbox, how, capsys):
    weights = sandbox / "hf" / files.SAFE_WEIGHTS_NAME
    name = corrupt_weights(weights, how)
    expected = "NaN or infinite values" if how == "corrupt-data" else "weights must be floating point"
    # Conversion: one line, naming the file and the tensor; no destination is left behind.
    assert convert.main([str(sandbox / "hf"), str(sandbox / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and expected in error and name in error and str(weights) in error, error
    assert not (sandbox / "out").exists()
    # Loading, also with strict=False.
    with pytest.raises(ValueError, match=expected) as refused:
        load_pretrained(sandbox / "hf", strict=False)
    assert name in str(refused.value)
    # A converted directory whose params file was damaged after the conversion.
    corrupt_weights(sandbox / "converted" / files.CONVERTED_PARAMS_NAME, how)
    with pytest.raises(ValueError, match=expected):
        files.load_converted(sandbox / "converted")


# --- one job per output ------------------------------------------------------------------------
HOLD_LOCK = """
import fcntl, os, sys, time
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(descriptor, fcntl.LOCK_EX)
os.write(descriptor, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_output_locked_by_another_process_is_refused_naming_it(sandbox, fake_model, capsys):
    lock = sandbox / "done.jsonl.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (sandbox / "done.jsonl").read_text()
        assert cli.main(summarize_argv(sandbox / "in.txt", "-o", str(sandbox / "done.jsonl"))) == 2
        assert f"in use by another process (pid {holder.pid}" in capsys.readouterr().err
        assert (sandbox / "done.jsonl").read_text() == before
    finally:
        holder.kill()
        holder.wait()
    # Its holder gone, the lock is free although the file stays.
    assert cli.main(summarize_argv(sandbox / "in.txt", "-o", str(sandbox / "done.jsonl"))) == 0
    assert not lock.exists(), "a finished job leaves no lock file"


def test_lock_file_left_by_a_killed_job_does_not_block(sandbox, fake_model):
    (sandbox / "out.jsonl.lock").write_text("999999999\n")  # no process holds it
    assert cli.main(summarize_argv(sandbox / "in.txt", "-o", str(sandbox / "out.jsonl"))) == 0
    assert len((sandbox / "out.jsonl").read_text().splitlines()) == len(TEXTS)
    assert not (sandbox / "out.jsonl.lock").exists()


# --- resuming checks the documents and the settings ----------------------------------------------
def test_resume_keeps_results_of_unchanged_documents(sandbox, fake_model, monkeypatch, capsys):
    complete = (sandbox / "done.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in complete]
    assert all(r["text_hash"] == document_io.text_hash(text) for r, text in zip(records, TEXTS))
    (sandbox / "done.jsonl").write_text(complete[2] + "\n" + complete[0] + "\n")
    summarized = []

    def recording(model, texts, *args, **kwargs):
        summarized.extend(texts)
        yield from fake_summaries(model, texts)

    monkeypatch.setattr(cli, "iter_summaries", recording)
    capsys.readouterr()
    assert cli.main(summarize_argv(sandbox / "in.txt", "-o", str(sandbox / "done.jsonl"), "--resume")) == 0
    assert summarized == [TEXTS[1]]
    assert (sandbox / "done.jsonl").read_text().splitlines() == complete


# --- conversions replace a model only when asked ---------------------------------------------------
def test_convert_overwrite_replaces_the_model_and_leaves_no_stale_weights(sandbox, capsys):
    destination = sandbox / "converted"
    assert convert.main([str(sandbox / "hf"), str(destination), "--dtype", "bfloat16", "--overwrite"]) == 0
    assert json.loads((destination / files.CONVERTED_MARKER_NAME).read_text())["dtype"] == "bfloat16"
    # A replaced model leaves no weights that the new config does not describe: sharded weights
    # replace a single file, and a converted directory replaces sharded weights.
    assert convert.main([str(sandbox / "converted"), str(sandbox / "hf"), "--overwrite", "--to-hf",
                         "--max-shard-size", "20KB"]) == 0
    assert not (sandbox / "hf" / files.SAFE_WEIGHTS_NAME).exists()
    assert (sandbox / "hf" / files.SAFE_WEIGHTS_INDEX_NAME).exists()
    target = sandbox / "again"
    shutil.copytree(sandbox / "hf", target)
    assert convert.main([str(sandbox / "hf"), str(target), "--overwrite"]) == 0
    assert sorted(p.name for p in target.iterdir() if p.name.endswith(".safetensors")) == [files.CONVERTED_PARAMS_NAME]
    files.load_converted(target)


def test_failed_conversion_leaves_no_new_destination(sandbox, capsys):
    (sandbox / "broken").mkdir()
    shutil.copyfile(sandbox / "hf" / "config.json", sandbox / "broken" / "config.json")
    (sandbox / "broken" / files.SAFE_WEIGHTS_NAME).write_bytes(b"not safetensors")
    assert convert.main([str(sandbox / "broken"), str(sandbox / "new" / "model")]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert not (sandbox / "new").exists(), "the directories created for the conversion stay"


# --- interruptions by SIGKILL, in a subprocess -------------------------------------------------------
@pytest.fixture(scope="module")
def summarizer_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random summarization model with the real BART tokenizer."""
    directory = save_hf_model(hf_model("BartForConditionalGeneration", seed=5, vocab_size=50265, d_model=16,
                                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                       decoder_ffn_dim=32, encoder_layers=1, decoder_layers=1),
                              tmp_path_factory.mktemp("summarizer") / "model")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def summarize_process(model, source, *extra, stdout=subprocess.PIPE):
    command = [sys.executable, "-m", "bart_jax", "summarize", str(source), "--model", str(model), "--no-progress",
               "--no-compilation-cache", "--max-length", "8", "--batch-size", "1", *extra]
    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})


def many_documents(path, count):
    # Equal documents are summarized in input order, so the ordered output can grow from the start.
    path.write_text("".join(f"{TEXTS[0]}\n" for _ in range(count)), encoding="utf-8")


def kill(process):
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, (
        f"the job ended (status {process.returncode}) before it could be killed:\n{process.stderr.read()[-3000:]}")


@pytest.mark.slow
def test_sigkill_leaves_the_completed_prefix_on_stdout(summarizer_dir, tmp_path):
    source = tmp_path / "in.txt"
    many_documents(source, 2000)
    process = summarize_process(summarizer_dir, source)
    lines = [process.stdout.readline(), process.stdout.readline()]
    kill(process)
    lines += process.stdout.read().splitlines(keepends=True)
    assert all(line.endswith("\n") for line in lines), "a record was written in pieces"
    indices = [json.loads(line)["index"] for line in lines]
    assert indices == list(range(len(indices))) and 2 <= len(indices) < 2000


@pytest.mark.slow
def test_sigkills_then_resume_give_every_document_once(summarizer_dir, tmp_path):
    source, output = tmp_path / "in.txt", tmp_path / "out.jsonl"
    count = 2000
    many_documents(source, count)
    kept = 0
    for attempt in range(3):
        resume = ("--resume",) if attempt else ()
        process = summarize_process(summarizer_dir, source, "-o", str(output), *resume, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while len(document_io.read_done(str(output))) < kept + 3:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no results were written"
            time.sleep(0.05)
        kill(process)
        assert (tmp_path / "out.jsonl.lock").exists(), "the killed job's lock file stays (unlocked)"
        done = len(document_io.read_done(str(output)))
        assert kept + 3 <= done < count
        kept = done
    resumed = summarize_process(summarizer_dir, source, "-o", str(output), "--resume", "--batch-size", "64",
                                stdout=subprocess.DEVNULL)
    _, error = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, error
    assert f'"skipped_by_resume": {kept}' in error
    indices = [json.loads(line)["index"] for line in output.read_text().splitlines()]
    assert indices == list(range(count))
    assert not (tmp_path / "out.jsonl.lock").exists()
