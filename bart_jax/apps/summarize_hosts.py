"""`bart-jax summarize` on several hosts: the same command on every process, each on its own share.

Process `k` of `n` summarizes the documents whose input index is `k` modulo `n` (balanced and
deterministic, whatever their lengths), data parallel over its own devices only, with no
collective between processes, so a slow or dead host never holds up the others. It writes its
results to its own part, `OUTPUT.part-0000k-of-0000n` (JSON lines, locked and resumable as a
single output is), puts the part in input order and marks it complete with
`OUTPUT.part-0000k-of-0000n.done` (its count of documents, the fingerprints of the whole input and
of the settings). Once every part is complete, one process merges them into OUTPUT in input order
(in any `--output-format`), then removes the markers and the parts: process 0 waits for the
others' markers (`--merge-timeout`), every other process merges if it completes the set last.
Merging is idempotent: a merge interrupted before the parts are removed is done again, the same.
The parts and the output must be on a file system every process sees.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import sys
import time
from typing import Iterator, Optional

import jax

from bart_jax.apps import document_io, outputs
from bart_jax.apps.inputs import Document
from bart_jax.parallel import distributed

DEFAULT_MERGE_TIMEOUT = 3600.0
POLL_SECONDS = 1.0
DONE_SUFFIX = ".done"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several hosts (each process summarizes its share and writes its part of -o)")
    group.add_argument("--num-processes", type=int, help="how many processes run this command (default: 1)")
    group.add_argument("--process-id", type=int, help="this process's id, 0 .. --num-processes - 1")
    group.add_argument("--coordinator-address",
                       help="host:port of process 0: start jax.distributed with --process-id and --num-processes")
    group.add_argument("--distributed", action="store_true",
                       help="start jax.distributed with the settings it finds itself (Cloud TPU pods, SLURM, "
                            "Open MPI) and take the process id and count from it")
    group.add_argument("--merge-timeout", type=float, default=DEFAULT_MERGE_TIMEOUT,
                       help="seconds process 0 waits for the other parts before merging (default: %(default)s)")


@dataclasses.dataclass(frozen=True)
class Hosts:
    """This process's place among the processes that run the command."""

    index: int = 0
    count: int = 1

    @property
    def several(self) -> bool:
        return self.count > 1

    def part(self, output: str, index: Optional[int] = None) -> str:
        index = self.index if index is None else index
        return f"{output}.part-{index:05d}-of-{self.count:05d}"

    def share_size(self, size: Optional[int]) -> Optional[int]:
        return None if size is None else len(range(self.index, size, self.count))


def identify(args: argparse.Namespace) -> Hosts:
    """The processes of `args` (starting jax.distributed where asked): call before any JAX work."""
    process_id, count = args.process_id, args.num_processes
    if args.merge_timeout < 0:
        raise ValueError(f"--merge-timeout must not be negative, got {args.merge_timeout}")
    if count is not None and count < 1:
        raise ValueError(f"--num-processes must be positive, got {count}")
    if process_id is not None and count is not None and not 0 <= process_id < count:
        raise ValueError(f"--process-id must be in 0 .. {count - 1} for --num-processes {count}, got {process_id}")
    if args.distributed or args.coordinator_address:
        distributed.initialize(args.coordinator_address, count, process_id)
        return Hosts(jax.process_index(), jax.process_count())
    if (process_id is None) != (count is None):
        raise ValueError("--process-id and --num-processes go together (or use --coordinator-address "
                         "or --distributed)")
    return Hosts() if count is None else Hosts(process_id, count)


class Share:
    """The documents of one process's share of a source; reading it to its end also fingerprints
    the whole input (every document's index, id and text), which the parts must agree on."""

    def __init__(self, source, hosts: Hosts):
        self.source = source
        self.hosts = hosts
        self.size = hosts.share_size(source.size)
        self.total = 0
        self.fingerprint = ""

    @property
    def counts(self):
        return self.source.counts

    def __iter__(self) -> Iterator[Document]:
        digest, total = hashlib.sha256(), 0
        for document in self.source:
            total += 1
            digest.update(json.dumps([document.index, document.id, document_io.text_hash(document.text)]).encode())
            if document.index % self.hosts.count == self.hosts.index:
                yield document
        self.total, self.fingerprint = total, digest.hexdigest()[:16]


def check_part(output: str, hosts: Hosts, resume: bool) -> None:
    """Before any work: refuses to resume from parts of another number of processes, or once
    OUTPUT was merged."""
    part = hosts.part(output)
    tails = (name[len(output):] for name in glob.glob(glob.escape(output) + ".part-*-of-*"))  # ".part-K-of-N..."
    others = sorted({output + tail[:tail.index("-of-") + 9] for tail in tails
                     if not tail[tail.index("-of-"):].startswith(f"-of-{hosts.count:05d}")})
    if resume and others:
        raise ValueError(f"{output} has parts of another number of processes ({', '.join(others)}); resume with "
                         f"that --num-processes, or drop --resume (and remove them) to start again")
    if resume and os.path.exists(output) and not os.path.exists(part) and not _any_done(output, hosts):
        raise ValueError(f"{output} is complete (its parts were merged); drop --resume to write it again")


def withdraw_part(output: str, hosts: Hosts) -> None:
    """Removes this process's completion marker: its part is about to change."""
    marker = hosts.part(output) + DONE_SUFFIX
    if os.path.exists(marker):
        os.remove(marker)


def _any_done(output: str, hosts: Hosts) -> bool:
    return any(os.path.exists(hosts.part(output, index) + DONE_SUFFIX) for index in range(hosts.count))


def finish_part(output: str, hosts: Hosts, share: Share, settings_hash: str) -> None:
    """Puts this process's part in input order (atomically) and marks it complete."""
    part = hosts.part(output)
    done = document_io.read_done(part)
    expected = range(hosts.index, share.total, hosts.count)
    if len(done) != len(expected) or any(index not in done for index in expected):
        raise ValueError(f"{part} holds {len(done)} of {len(expected)} results; run again with --resume")
    document_io.write_atomically(part, (done[index] for index in expected))
    marker = {"process_id": hosts.index, "num_processes": hosts.count, "documents": len(expected),
              "input_documents": share.total, "input_hash": share.fingerprint, "options_hash": settings_hash}
    temporary = part + DONE_SUFFIX + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(marker, f)
        f.write("\n")
    os.replace(temporary, part + DONE_SUFFIX)


def _markers(output: str, hosts: Hosts) -> list[Optional[dict]]:
    markers = []
    for index in range(hosts.count):
        try:
            with open(hosts.part(output, index) + DONE_SUFFIX, encoding="utf-8") as f:
                markers.append(json.load(f))
        except (FileNotFoundError, json.JSONDecodeError):
            markers.append(None)
    return markers


def merge(output: str, fmt: str, hosts: Hosts, timeout: float) -> bool:
    """Merges the complete parts into `output` in input order, waiting up to `timeout` seconds for
    the others to complete; returns whether `output` is complete (merged here or by another process).
    Raises, naming the parts and what to run, where they are not complete when the wait ends."""
    deadline = time.monotonic() + timeout
    while True:
        markers = _markers(output, hosts)
        missing = [index for index, marker in enumerate(markers) if marker is None]
        if not missing:
            break
        if os.path.exists(output) and not any(markers) and not os.path.exists(hosts.part(output)):
            return True  # merged by another process meanwhile
        if time.monotonic() >= deadline:
            if timeout == 0:
                return False
            names = ", ".join(hosts.part(output, index) for index in missing)
            raise ValueError(f"{output}: the parts of process{'es' if len(missing) > 1 else ''} "
                             f"{', '.join(map(str, missing))} are not complete after {timeout:g} s ({names}); "
                             f"run {'them' if len(missing) > 1 else 'it'} again with --resume (the last "
                             f"process to complete its part merges them into {output})")
        time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.0)))
    _check_markers(output, hosts, markers)
    try:
        lock = document_io.OutputLock(output)
    except ValueError:
        return False  # another process is merging
    try:
        if _markers(output, hosts) != markers:
            return os.path.exists(output)  # merged (or being rewritten) meanwhile
        _write_merged(output, fmt, hosts, markers[0]["input_documents"])
        for index in range(hosts.count):  # the markers first: complete parts without one are only re-checked
            os.remove(hosts.part(output, index) + DONE_SUFFIX)
        for index in range(hosts.count):
            os.remove(hosts.part(output, index))
    finally:
        lock.release()
    return True


def _check_markers(output: str, hosts: Hosts, markers: list[dict]) -> None:
    first = markers[0]
    for index, marker in enumerate(markers):
        for key, what in (("num_processes", "another number of processes"), ("input_hash", "another input"),
                          ("input_documents", "another input"), ("options_hash", "other settings")):
            if marker.get(key) != first.get(key) or marker.get("process_id") != index:
                raise ValueError(f"{hosts.part(output, index)} was written for {what} than "
                                 f"{hosts.part(output, 0)}; run every process with the same input and settings "
                                 f"(drop --resume for the part that differs)")


def _write_merged(output: str, fmt: str, hosts: Hosts, total: int) -> None:
    files = [open(hosts.part(output, index), encoding="utf-8") for index in range(hosts.count)]
    try:
        def records() -> Iterator[dict]:
            for index in range(total):
                line = files[index % hosts.count].readline()
                record = json.loads(line) if line else None
                if not isinstance(record, dict) or record.get("index") != index:
                    raise ValueError(f"{hosts.part(output, index % hosts.count)} lacks the result of document "
                                     f"{index}; run its process again with --resume")
                yield record

        outputs.write_output(output, fmt, records())
    finally:
        for f in files:
            f.close()


def report_path(path: str, hosts: Hosts) -> str:
    """Where this process writes its report (`--metrics-output`): one file per process."""
    return hosts.part(path) if hosts.several else path


def note(message: str) -> None:
    print(message, file=sys.stderr)
