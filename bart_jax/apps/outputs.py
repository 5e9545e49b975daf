"""The records of `bart-jax summarize` and the formats they are written in.

One record per document: `id` (where the input has ids), `index` (its position in the input),
`summary` (the best sequence's text), `score` (its beam score, from beam search), with
`--output-ids` `summary_ids` (its token ids); with `num_return_sequences` > 1 also `summaries`,
`scores` and `summaries_ids`, every returned sequence best first; then `text_hash` and
`options_hash` (document_io.py), which `--resume` checks.

Formats: JSON lines (`jsonl`: results are appended to the output itself as they are produced,
and rewritten in input order at the end), Parquet and CSV (results are appended to the
journal `<output>.partial.jsonl`, which `--resume` reads, and converted to the output at the
end; the journal is then removed). In CSV, list values are JSON text.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Iterable, Optional

from bart_jax.apps import document_io
from bart_jax.apps.inputs import Document

FORMATS = ("jsonl", "parquet", "csv")
JOURNAL_SUFFIX = ".partial.jsonl"


def output_format(path: Optional[str], requested: Optional[str]) -> str:
    """The format asked for, else the one the output's name ends in (JSON lines by default)."""
    if requested is None:
        suffix = os.path.splitext(path or "")[1].lstrip(".").lower()
        requested = suffix if suffix in FORMATS else "jsonl"
    if requested not in FORMATS:
        raise ValueError(f"unknown output format {requested!r}; choose one of {', '.join(FORMATS)}")
    if path is None and requested != "jsonl":
        raise ValueError(f"--output-format {requested} needs an output file (-o); standard output gets JSON lines")
    return requested


def journal_path(path: str, fmt: str) -> str:
    """Where results are appended while the job runs."""
    return path if fmt == "jsonl" else path + JOURNAL_SUFFIX


def make_record(document: Document, summary, settings_hash: str, output_ids: bool = False) -> dict:
    """The output record of `document`; `summary` is an `apps.summarize.Summary` or a text."""
    texts = [summary] if isinstance(summary, str) else summary.texts
    scores = None if isinstance(summary, str) else summary.scores
    ids = None if isinstance(summary, str) else summary.token_ids
    record = {} if document.id is None else {"id": document.id}
    record.update(index=document.index, summary=texts[0])
    if scores is not None:
        record["score"] = scores[0]
    if output_ids and ids is not None:
        record["summary_ids"] = ids[0]
    if len(texts) > 1:
        record["summaries"] = texts
        if scores is not None:
            record["scores"] = scores
        if output_ids and ids is not None:
            record["summaries_ids"] = ids
    record.update(text_hash=document_io.text_hash(document.text), options_hash=settings_hash)
    return record


def finalize_output(path: str, fmt: str, total: int) -> None:
    """Writes the complete output in input order (atomically), once all `total` documents are done."""
    if fmt == "jsonl":
        document_io.finalize(path, total)
        return
    journal = journal_path(path, fmt)
    done = document_io.read_done(journal)
    if len(done) != total:
        raise ValueError(f"{journal} holds {len(done)} of {total} results; run again with --resume")
    write_output(path, fmt, (done[index] for index in range(total)))
    os.remove(journal)


def write_output(path: str, fmt: str, records: Iterable[dict]) -> None:
    """Writes `records` (in the order given) to `path` in `fmt`, atomically (through `path.tmp`)."""
    if fmt == "jsonl":
        document_io.write_atomically(path, records)
        return
    temporary = path + ".tmp"
    if fmt == "parquet":
        _write_parquet(list(records), temporary)
    else:
        _write_csv(list(records), temporary)
    os.replace(temporary, path)


def _columns(records: Iterable[dict]) -> list[str]:
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    return list(columns)


def _write_parquet(records: list[dict], path: str) -> None:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ValueError("--output-format parquet needs pyarrow: pip install pyarrow") from None
    columns = _columns(records)
    table = pyarrow.table({name: [record.get(name) for record in records] for name in columns})
    pyarrow.parquet.write_table(table, path)


def _write_csv(records: list[dict], path: str) -> None:
    columns = _columns(records)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for record in records:
            writer.writerow(["" if record.get(name) is None else
                             json.dumps(record[name], ensure_ascii=False) if isinstance(record[name], list)
                             else record[name] for name in columns])
