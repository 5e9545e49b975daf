"""Writing the results of batch jobs as JSON lines, resumably (documents are read by `inputs`).

Results are appended to the output as they are produced (one line per document, with its
input `index`), so an interrupted job loses nothing; `finalize` rewrites the file in input
order once the job is complete. Each result also carries `text_hash` (a fingerprint of its
document's text) and `options_hash` (of the settings that produced it), so that a resumed job
can tell that the input or the settings changed since (`check_done`). An output is written by
one job at a time (`OutputLock`); results sent to a stream are written in input order as soon
as that order allows (`OrderedWriter`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from typing import IO, Iterable, Optional

from bart_jax.apps.inputs import Document, open_documents

__all__ = ["Document", "OrderedWriter", "OutputLock", "ResultWriter", "check_done", "check_output", "finalize",
           "open_documents", "options_hash", "read_done", "text_hash", "write_atomically"]


def read_done(path: str) -> dict[int, dict]:
    """Results already in an output file, by input index (a torn last line is ignored)."""
    done: dict[int, dict] = {}
    if not os.path.isfile(path):
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # an interrupted write
            if isinstance(record, dict) and isinstance(record.get("index"), int):
                done[record["index"]] = record
    return done


def text_hash(text: str) -> str:
    """The fingerprint of a document's text: the first 16 hex digits of the SHA-256 of its UTF-8."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]


def options_hash(options: dict) -> str:
    """The fingerprint of the settings that produce the results (a JSON-serialisable dict)."""
    return text_hash(json.dumps(options, sort_keys=True))


def check_output(path: str, input_path: Optional[str], journal: Optional[str] = None) -> None:
    """Refuses, before any work, an output that cannot be written or whose writing (the output,
    its `.tmp` and `.lock` files, the `journal` of results) would replace the input file."""
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a directory; name a file")
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"output {path} is not a regular file (the output is replaced as the job finishes); "
                         f"name a file, or leave out -o to write to standard output")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        state = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise ValueError(f"output {path} cannot be written: {parent} {state}")
    if input_path is None or input_path == "-" or not os.path.exists(input_path):
        return
    for written in (path, path + ".tmp", path + OutputLock.suffix) + ((journal,) if journal else ()):
        if os.path.exists(written) and os.path.samefile(written, input_path):
            raise ValueError(f"output {path} would overwrite the input {input_path}; choose another output")


def check_done(path: str, done: dict[int, dict], documents: Iterable[Document], options: str) -> int:
    """Refuses to resume from results of other documents, of changed documents, or made with
    other settings (`options` is their `options_hash`). Reads `documents` once, holding one at a
    time; returns how many there are. `documents` may be a share of the input (one process's):
    results of documents outside it are refused too."""
    count, unseen = 0, set(done)
    for document in documents:
        count += 1
        if document.index in done:
            _check_result(path, done[document.index], document, options)
            unseen.discard(document.index)
    beyond = sorted(unseen)  # results of documents that `documents` lacks
    if beyond:
        raise ValueError(f"{path} does not belong to this input (index {min(beyond)} differs); "
                         f"drop --resume or choose another output")
    return count


def _check_result(path: str, record: dict, document: Document, options: str) -> None:
    index = document.index
    if record.get("id") != document.id:
        raise ValueError(f"{path} does not belong to this input (index {index} differs); "
                         f"drop --resume or choose another output")
    if "text_hash" not in record or "options_hash" not in record:
        raise ValueError(f"{path} holds results without text and options hashes (index {index}), so they "
                         f"cannot be checked against this input; drop --resume or choose another output")
    if record["options_hash"] != options:
        raise ValueError(f"{path} was written with other settings (generation options, seed, "
                         f"max source length, model or dtype); use the same ones, or drop --resume")
    if record["text_hash"] != text_hash(document.text):
        raise ValueError(f"document {index} of the input changed since {path} was written; "
                         f"drop --resume or choose another output")


class OutputLock:
    """An exclusive lock on an output, held through `<output>.lock` (which holds the holder's pid),
    so that two jobs never write the same output. The system releases it when the holding process
    ends, however it ends; a lock file left by a killed job does not block the next one."""

    suffix = ".lock"

    def __init__(self, path: str):
        self.path = path + self.suffix
        while True:
            try:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise ValueError(f"cannot write output {path}: {error.strerror} ({self.path})") from None
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 32).decode("ascii", errors="replace").strip() or "unknown"
                os.close(descriptor)
                raise ValueError(f"output {path} is in use by another process (pid {holder}, lock "
                                 f"{self.path}); wait for it to finish or choose another output") from None
            except BaseException:
                os.close(descriptor)
                raise
            # The previous holder removes the file as it finishes: hold the lock of the file the path names.
            try:
                current = os.path.samestat(os.fstat(descriptor), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(descriptor)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode("ascii"))
        self._descriptor: Optional[int] = descriptor

    def release(self) -> None:
        if self._descriptor is None:
            return
        try:
            os.remove(self.path)  # while still holding it; see __init__
        except FileNotFoundError:
            pass
        os.close(self._descriptor)
        self._descriptor = None


class OrderedWriter:
    """Writes results to a stream in input order as soon as that order allows: a result waits only
    until every result before it is written, and each run of results that completes the order so
    far is written and flushed at once, so an interrupted job leaves its complete prefix."""

    def __init__(self, stream: IO[str], indices: Iterable[int]):
        self._stream = stream
        self._order = iter(sorted(indices))
        self._next = next(self._order, None)
        self._waiting: dict[int, dict] = {}

    def write(self, record: dict) -> None:
        self._waiting[record["index"]] = record
        ready = []
        while self._next is not None and self._next in self._waiting:
            ready.append(self._waiting.pop(self._next))
            self._next = next(self._order, None)
        if ready:
            self._stream.write(format_records(ready))
            self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


class ResultWriter:
    """Appends one JSON line per result and flushes it, so that an interrupted job keeps them."""

    def __init__(self, path: str, resume: bool):
        self.path = path
        if resume:
            # Keep the complete results only: a line torn by the interruption would glue onto the next.
            write_atomically(path, read_done(path).values())
        elif os.path.exists(path):
            os.remove(path)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def finalize(path: str, total: int) -> None:
    """Rewrites the output in input order (atomically) once all `total` documents are in it."""
    done = read_done(path)
    if len(done) != total:
        raise ValueError(f"{path} holds {len(done)} of {total} results; run again with --resume")
    write_atomically(path, (done[index] for index in range(total)))


def write_atomically(path: str, records: Iterable[dict]) -> None:
    """Writes `records` as JSON lines to `path` through `path.tmp`, so that `path` is never torn."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def format_records(records: Iterable[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
