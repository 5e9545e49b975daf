"""Reading documents for batch jobs and writing their results as JSON lines, resumably.

Inputs: `.txt` (one document per line), `.jsonl` (one object per line, text in a chosen
field, optional `id`), or `-` for standard input (JSON lines if every line is an object,
otherwise text). Bytes that are not UTF-8 are replaced (U+FFFD) and counted, never fatal.

Results are appended to the output as they are produced (one line per document, with its
input `index`), so an interrupted job loses nothing; `finalize` rewrites the file in input
order once the job is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Iterable, Optional

TEXT_FIELDS = ("text", "document", "article")


@dataclasses.dataclass(frozen=True)
class Document:
    index: int
    id: Optional[str]
    text: str


@dataclasses.dataclass
class ReadReport:
    documents: list[Document]
    replaced_bytes_lines: int = 0


def _decode_lines(data: bytes) -> tuple[list[str], int]:
    lines, replaced = [], 0
    for raw in data.splitlines():
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(raw.decode("utf-8", errors="replace"))
            replaced += 1
    return lines, replaced


def _text_of(record: dict, text_field: Optional[str], line_number: int, source: str) -> str:
    fields = (text_field,) if text_field else TEXT_FIELDS
    for field in fields:
        if field in record:
            value = record[field]
            if value is None:
                return ""
            if not isinstance(value, str):
                raise ValueError(f"{source} line {line_number}: field {field!r} is not a string")
            return value
    wanted = repr(text_field) if text_field else f"one of {', '.join(TEXT_FIELDS)}"
    raise ValueError(
        f"{source} line {line_number} has no field {wanted} (fields: {', '.join(sorted(record))}); "
        f"choose one with --text-field"
    )


def read_documents(path: str, text_field: Optional[str] = None) -> ReadReport:
    """Reads `path` (.txt, .jsonl or "-" for stdin) into documents in input order."""
    source = "standard input" if path == "-" else path
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        if not os.path.isfile(path):
            raise ValueError(f"input file {path} does not exist")
        with open(path, "rb") as f:
            data = f.read()
    lines, replaced = _decode_lines(data)
    is_jsonl = path.endswith(".jsonl") or path.endswith(".json")
    if path == "-":
        stripped = [line for line in lines if line.strip()]
        is_jsonl = bool(stripped) and all(line.lstrip().startswith("{") for line in stripped)
    documents = []
    if is_jsonl:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source} line {number} is not valid JSON: {error.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{source} line {number} is not a JSON object")
            identifier = record.get("id")
            documents.append(Document(len(documents), None if identifier is None else str(identifier),
                                      _text_of(record, text_field, number, source)))
    else:
        documents = [Document(index, None, line) for index, line in enumerate(lines)]
    return ReadReport(documents, replaced)


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


class ResultWriter:
    """Appends one JSON line per result and flushes it, so that an interrupted job keeps them."""

    def __init__(self, path: str, resume: bool):
        self.path = path
        if resume:
            # Keep the complete results only: a line torn by the interruption would glue onto the next.
            _write_atomically(path, read_done(path).values())
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
    _write_atomically(path, (done[index] for index in range(total)))


def _write_atomically(path: str, records: Iterable[dict]) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(format_records(records))
    os.replace(temporary, path)


def format_records(records: Iterable[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
