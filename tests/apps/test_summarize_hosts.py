"""`bart-jax summarize` on several processes: shares, parts, the merge and --resume.

The fast tests run the command in this process with a stand-in model, one process id after
the other; the slow one starts 2 processes of 4 simulated CPU devices each on a tiny random
model with the real tokenizer and compares their merged output with that of one process."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
from hf_reference import tiny_summarizer, write_xsum_documents

from bart_jax.apps import cli, summarize_hosts

REPO = pathlib.Path(__file__).resolve().parents[2]
WORDS = ("river", "council", "goal", "storm", "harvest", "museum", "bridge")


def fake_summaries(model, texts, batch_size=8, max_source_length=None, seed=0, stats=None, on_batch=None,
                   **options):
    """Stands in for iter_summaries: the summary of a text is "summary of <its first word>"."""
    for index, text in enumerate(texts):
        yield index, f"summary of {text.split()[0]}"


@pytest.fixture
def job(tmp_path, monkeypatch):
    """Runs `summarize IN -o OUT` with a stand-in model: job(*extra) -> (exit code, stderr)."""
    monkeypatch.setattr(cli, "_load", lambda args: None)
    monkeypatch.setattr(cli, "iter_summaries", fake_summaries)
    (tmp_path / "in.txt").write_text("".join(f"{word} news of the day\n" for word in WORDS), encoding="utf-8")

    def run(*extra, output="out.jsonl"):
        error = []
        monkeypatch.setattr(summarize_hosts, "note", error.append)
        code = cli.main(["summarize", str(tmp_path / "in.txt"), "-o", str(tmp_path / output), "--model", "none",
                         "--no-progress", "--no-compilation-cache", "--window", "2", *extra])
        return code, "\n".join(error)

    return run


def processes(process_id, count=3, *extra):
    return ("--process-id", str(process_id), "--num-processes", str(count), *extra)


def leftovers(root):
    return sorted(path.name for path in root.iterdir()
                  if path.name.startswith("out.") and (".part-" in path.name or path.name.endswith(".lock")))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_parts_merge_into_the_output_of_one_process(job, tmp_path, fmt):
    assert job(output=f"one.{fmt}")[0] == 0
    for process_id in (2, 1):
        code, message = job(*processes(process_id), output=f"out.{fmt}")
        assert code == 0 and "is merged by the last process" in message
        assert (tmp_path / f"out.{fmt}.part-{process_id:05d}-of-00003.done").exists()
    shares = [json.loads(line)["index"] for line in (tmp_path / f"out.{fmt}.part-00001-of-00003").read_text()
              .splitlines()]
    assert shares == [1, 4]  # index % 3 == 1, in input order
    code, message = job(*processes(0), output=f"out.{fmt}")
    assert code == 0 and "merged the 3 parts" in message, message
    assert (tmp_path / f"out.{fmt}").read_bytes() == (tmp_path / f"one.{fmt}").read_bytes()
    assert leftovers(tmp_path) == []


def test_the_last_part_to_complete_merges(job, tmp_path):
    code, message = job(*processes(0, 2, "--merge-timeout", "0"))  # process 0 does not wait either
    assert code == 0 and "is merged by the last process" in message and not (tmp_path / "out.jsonl").exists()
    code, message = job(*processes(1, 2, "--metrics-output", str(tmp_path / "m.json")))
    assert code == 0 and "merged the 2 parts" in message
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == len(WORDS)
    assert json.loads((tmp_path / "m.json.part-00001-of-00002").read_text())["skipped_by_resume"] == 0
    assert leftovers(tmp_path) == []


def test_a_missing_part_fails_the_wait_clearly_and_resume_completes(job, tmp_path, capsys):
    code, _ = job(*processes(0, 2, "--merge-timeout", "0.2"))
    assert code == 2
    error = capsys.readouterr().err
    assert "the parts of process 1 are not complete after 0.2 s" in error and "out.jsonl.part-00001-of-00002" in error
    assert "--resume" in error and not (tmp_path / "out.jsonl").exists()
    # Process 1 was killed after writing some results: a torn part without a marker.
    assert job(output="one.jsonl")[0] == 0
    kept = [line for line in (tmp_path / "one.jsonl").read_text().splitlines() if json.loads(line)["index"] % 2]
    (tmp_path / "out.jsonl.part-00001-of-00002").write_text(kept[0] + "\n" + kept[1][:20])
    code, message = job(*processes(1, 2, "--resume"))
    assert code == 0 and "merged the 2 parts" in message
    assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert leftovers(tmp_path) == []
    assert job(*processes(1, 2, "--resume"))[0] == 2
    assert "is complete (its parts were merged)" in capsys.readouterr().err


def test_merging_again_after_a_crash_gives_the_same_output(job, tmp_path, monkeypatch):
    assert job(output="one.jsonl")[0] == 0
    assert job(*processes(1, 2))[0] == 0
    removed = []
    real_remove = os.remove

    def crash_after_the_markers(path):
        if ".part-" in path and not path.endswith((".done", ".lock")):
            raise KeyboardInterrupt  # the merging process dies before removing the parts
        removed.append(path)
        real_remove(path)

    monkeypatch.setattr(os, "remove", crash_after_the_markers)
    with pytest.raises(KeyboardInterrupt):
        job(*processes(0, 2))
    monkeypatch.setattr(os, "remove", real_remove)
    assert len([path for path in removed if path.endswith(".done")]) == 2
    assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    for process_id in (1, 0):  # the complete parts are re-checked, not summarized again, and merged again
        assert job(*processes(process_id, 2, "--resume"))[0] == 0
    assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("argv, expected", [
    (("--process-id", "0", "--num-processes", "2"), "cannot share standard output; name the output with -o"),
    (("--process-id", "2", "--num-processes", "2", "-o", "x.jsonl"), "--process-id must be in 0 .. 1"),
    (("--process-id", "0", "-o", "x.jsonl"), "--process-id and --num-processes go together"),
    (("--num-processes", "0", "-o", "x.jsonl"), "--num-processes must be positive"),
])
def test_bad_process_settings_are_refused(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("one\n")
    assert cli.main(["summarize", "in.txt", "--model", "none", "--no-progress", *argv]) == 2
    assert expected in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.txt"]


def test_resume_with_another_number_of_processes_is_refused(job, tmp_path, capsys):
    assert job(*processes(1, 3))[0] == 0
    assert job(*processes(0, 2, "--resume"))[0] == 2
    error = capsys.readouterr().err
    assert "out.jsonl has parts of another number of processes (" in error and "part-00001-of-00003)" in error
    assert not (tmp_path / "out.jsonl.part-00000-of-00002").exists()


def test_parts_of_other_settings_are_refused(job, tmp_path, capsys):
    assert job(*processes(1, 2, "--seed", "1"))[0] == 0
    assert job(*processes(0, 2))[0] == 2
    assert "out.jsonl.part-00001-of-00002 was written for other settings" in capsys.readouterr().err
    assert job(*processes(1, 2, "--resume"))[0] == 2  # the part's results are checked as a single output's are
    assert "was written with other settings" in capsys.readouterr().err
    assert (tmp_path / "out.jsonl.part-00001-of-00002.done").exists()  # a refused call changes nothing
    assert job(*processes(1, 2))[0] == 0 and (tmp_path / "out.jsonl").exists()  # rewritten, then merged


@pytest.mark.slow
def test_two_processes_of_four_devices_equal_one_process(tmp_path, tokenizer_dir):
    directory = tiny_summarizer(tmp_path / "model", tokenizer_dir, seed=11, max_position_embeddings=64)
    documents = write_xsum_documents(tmp_path / "in.jsonl", 5, with_ids=True)
    environment = {**os.environ, "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}

    def start(output, *extra):
        command = [sys.executable, "-m", "bart_jax", "summarize", str(tmp_path / "in.jsonl"), "-o",
                   str(tmp_path / output), "--model", str(directory), "--no-progress", "--no-compilation-cache",
                   "--num-beams", "2", "--max-length", "12", "--batch-size", "4", "--max-source-length", "40",
                   "--window", "3", *extra]
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def finish(process):
        _, error = process.communicate(timeout=300)
        return process.returncode, error

    # One process, and process 0 alone: it waits for the part of process 1, which is not run.
    one, alone = start("one.jsonl"), start("out.jsonl", *processes(0, 2, "--merge-timeout", "1"))
    code, error = finish(alone)
    assert code == 2 and "the parts of process 1 are not complete after 1 s" in error, error[-3000:]
    code, error = finish(one)
    assert code == 0 and '"mesh": {"data": 4' in error, error[-3000:]
    # Both processes at once, with --resume: the part of process 0 is kept, process 0 merges.
    first, second = start("out.jsonl", *processes(0, 2, "--resume")), start("out.jsonl", *processes(1, 2))
    for process, skipped in ((first, 3), (second, 0)):
        code, error = finish(process)
        assert code == 0 and f'"skipped_by_resume": {skipped}' in error, error[-3000:]
        assert '"mesh": {"data": 4' in error
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == \
        [f"d{i}" for i in range(len(documents))]
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_two_processes_joined_by_jax_distributed_equal_one_process(tmp_path, tokenizer_dir):
    """With --coordinator-address the processes start jax.distributed (as on a pod slice, where
    --distributed finds the same settings itself); each still summarizes on its own devices."""
    directory = tiny_summarizer(tmp_path / "model", tokenizer_dir, seed=12, max_position_embeddings=64)
    write_xsum_documents(tmp_path / "in.jsonl", 4)
    environment = {**os.environ, "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"}
    with socket.socket() as probe:  # a free port on this machine for the coordinator
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def start(output, *extra):
        command = [sys.executable, "-m", "bart_jax", "summarize", str(tmp_path / "in.jsonl"), "-o",
                   str(tmp_path / output), "--model", str(directory), "--no-progress", "--no-compilation-cache",
                   "--num-beams", "2", "--max-length", "10", "--batch-size", "2", "--max-source-length", "32", *extra]
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    runs = [start("one.jsonl")] + [start("out.jsonl", *processes(k, 2, "--coordinator-address", f"127.0.0.1:{port}"))
                                   for k in (0, 1)]
    for process in runs:
        _, error = process.communicate(timeout=300)
        assert process.returncode == 0, error[-3000:]
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
