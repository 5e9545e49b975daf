"""Reading small data files whole: `.jsonl`/`.json`, `.csv`/`.tsv` as a list of records (dicts),
and the columns of records.

Columns are named as in the file; a dotted name reaches into nested records
(`translation.en` for `{"translation": {"en": ..., "ro": ...}}`). Training corpora, and the other
formats, are read record by record through `training.sources`.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterable

Record = dict[str, Any]
FILE_FORMATS = (".jsonl", ".json", ".csv", ".tsv")


def read_records(path: str | os.PathLike) -> list[Record]:
    """All records of a data file, in file order."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"data file not found: {path}")
    extension = os.path.splitext(path)[1].lower()
    readers = {".jsonl": _read_json, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_tsv}
    if extension not in readers:
        raise ValueError(f"cannot read {path}: expected one of {', '.join(FILE_FORMATS)}")
    records = readers[extension](path)
    if not records:
        raise ValueError(f"{path} holds no examples")
    return records


def _read_json(path: str) -> list[Record]:
    """JSON lines, or one JSON document: a list of records or {"data": [records]} (SQuAD-style)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None
    if isinstance(document, list):
        records = document
    elif isinstance(document, dict) and isinstance(document.get("data"), list):
        records = document["data"]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number} is not valid JSON: {error}") from None
    bad = next((i for i, record in enumerate(records) if not isinstance(record, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: example {bad} is a {type(records[bad]).__name__}, expected a JSON object")
    return records


def _read_csv(path: str) -> list[Record]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _read_tsv(path: str) -> list[Record]:
    # GLUE's TSV files contain unbalanced quotes: read them unquoted.
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def column_values(records: list[Record], column: str, source: str = "data", first_index: int = 0) -> list[Any]:
    """The values of `column` (dotted names reach into nested records) in every record
    (`first_index`: the number of the first record, for messages).

    Raises ValueError naming the available columns when a record lacks the column; a
    present but empty value (None, "") is returned as is for the caller to count and drop.
    """
    values = []
    for index, record in enumerate(records, first_index):
        value: Any = record
        for part in column.split("."):
            if not isinstance(value, dict) or part not in value:
                columns = sorted(_column_names(record))
                raise ValueError(f"{source}: example {index} has no column {column!r}; its columns are {columns}")
            value = value[part]
        values.append(value)
    return values


def _column_names(record: Record, prefix: str = "") -> Iterable[str]:
    for key, value in record.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from _column_names(value, prefix + key + ".")


def is_empty_text(value: Any) -> bool:
    """Whether a text field is missing or blank."""
    return value is None or (isinstance(value, str) and not value.strip())
