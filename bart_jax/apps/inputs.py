"""Documents for batch jobs, read lazily from files, directories, standard input or the
Hugging Face hub, in input order.

Sources (`open_documents`):

    .txt                one document per line
    .jsonl / .json      one JSON object per line
    .csv / .tsv         a header row, then one document per row
    .parquet            Parquet, read batch by batch
    .arrow              Arrow IPC (file or stream format, as `datasets` writes)
    a directory         written by `datasets.Dataset.save_to_disk` (or a `DatasetDict`: --split)
    "-"                 standard input: JSON lines if every line is an object, otherwise text
    dataset_name=...    a dataset of the Hugging Face hub, through `datasets.load_dataset`

Records with fields take their text from `text_field` (default: the first of text, document,
article), their id from `id_field` (default: `id` where there is one) and, to score summaries,
a reference from `reference_field`. Bytes that are not UTF-8 are replaced (U+FFFD) and counted.
A JSON line that is not an object, or lacks the text field, is reported with its number,
skipped and counted; with `strict` it stops the job instead. Opening a source checks what can
be checked without reading it all (the file exists, the fields exist), so that a bad call fails
before any model is loaded; iterating it reads it again from the start each time, holding one
batch of records at a time.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
import tempfile
from typing import Any, Callable, Iterator, Optional

from bart_jax.training.sources import load_hub_split

TEXT_FIELDS = ("text", "document", "article")
TABLE_SUFFIXES = (".parquet", ".arrow")
SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv") + TABLE_SUFFIXES
ROWS_PER_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class Document:
    index: int
    id: Optional[str]
    text: str
    reference: Optional[str] = None


@dataclasses.dataclass
class ReadCounts:
    """What reading found besides documents; complete once the source has been read to its end."""

    replaced_bytes_lines: int = 0
    invalid_lines: int = 0
    warnings: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Fields:
    text: Optional[str] = None
    id: Optional[str] = None
    reference: Optional[str] = None
    strict: bool = False

    def choose(self, columns: list[str], source: str) -> "Fields":
        """The fields of a source with `columns`: the text field found, the id field if any."""
        text = self.text or next((name for name in TEXT_FIELDS if name in columns), None)
        wanted = repr(self.text) if self.text else f"one of {', '.join(TEXT_FIELDS)}"
        if text is None or text not in columns:
            raise ValueError(f"{source} has no field {wanted} (fields: {', '.join(map(str, columns))}); "
                             f"choose one with --text-field")
        for flag, name in (("--id-field", self.id), ("--reference-field", self.reference)):
            if name is not None and name not in columns:
                raise ValueError(f"{source} has no field {name!r} for {flag} (fields: {', '.join(map(str, columns))})")
        identifier = self.id if self.id is not None else ("id" if "id" in columns else None)
        return Fields(text, identifier, self.reference, self.strict)


def _string(value: Any) -> Optional[str]:
    return None if value is None else value if isinstance(value, str) else str(value)


class DocumentSource:
    """Documents of one source; iterate it (again and again) for `Document`s in input order.
    `size`: how many there are, where the source tells without being read (Parquet, hub datasets)."""

    def __init__(self, name: str, rows: Callable[[ReadCounts], Iterator[tuple[Optional[str], str, Optional[str]]]],
                 size: Optional[int] = None):
        self.name = name
        self._rows = rows
        self.size = size
        self.counts = ReadCounts()
        self.spooled: Optional[str] = None  # standard input's temporary copy

    def close(self) -> None:
        if self.spooled is not None and os.path.exists(self.spooled):
            os.remove(self.spooled)

    def __iter__(self) -> Iterator[Document]:
        self.counts = ReadCounts()
        for index, (identifier, text, reference) in enumerate(self._rows(self.counts)):
            yield Document(index, identifier, text, reference)


# --- lines: text and JSON lines ------------------------------------------------------------------
def _lines(path: str, counts: ReadCounts) -> Iterator[str]:
    with open(path, "rb") as f:
        for raw in f:
            for part in raw.splitlines() or [b""]:
                try:
                    yield part.decode("utf-8")
                except UnicodeDecodeError:
                    counts.replaced_bytes_lines += 1
                    yield part.decode("utf-8", errors="replace")


def _text_rows(path: str):
    def rows(counts):
        for line in _lines(path, counts):
            yield None, line, None
    return rows


def _json_record(line: str) -> tuple[Optional[dict], str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"is not valid JSON: {error.msg}"
    if not isinstance(record, dict):
        return None, "is not a JSON object"
    return record, ""


def _json_value(record: dict, field: Optional[str]) -> Optional[str]:
    return None if field is None else _string(record.get(field))


def _jsonl_rows(path: str, source: str, fields: Fields):
    def rows(counts):
        for number, line in enumerate(_lines(path, counts), start=1):
            if not line.strip():
                continue
            record, problem = _json_record(line)
            if record is not None and fields.text not in record:
                problem = f"has no field {fields.text!r} (fields: {', '.join(sorted(record))})"
            elif record is not None and not isinstance(record[fields.text], (str, type(None))):
                problem = f"field {fields.text!r} is not a string"
            if problem:
                message = f"{source} line {number} {problem}"
                if fields.strict:
                    raise ValueError(message + " (--strict)")
                counts.invalid_lines += 1
                counts.warnings.append(f"skipped: {message}")
                continue
            identifier = record.get(fields.id) if fields.id else record.get("id")
            yield _string(identifier), record[fields.text] or "", _json_value(record, fields.reference)
    return rows


def _first_record(path: str) -> Optional[dict]:
    """The first valid JSON object of a JSON lines file (None where there is none)."""
    for line in _lines(path, ReadCounts()):
        if line.strip():
            record, _ = _json_record(line)
            if record is not None:
                return record
    return None


def _open_jsonl(path: str, source: str, fields: Fields) -> DocumentSource:
    first = _first_record(path)
    if first is not None:
        chosen = fields.choose(list(first), f"{source} (first record)")
        fields = dataclasses.replace(chosen, id=fields.id)  # ids: the `id` of each record, where it has one
    else:
        fields = dataclasses.replace(fields, text=fields.text or TEXT_FIELDS[0])
    return DocumentSource(source, _jsonl_rows(path, source, fields))


# --- CSV and TSV ---------------------------------------------------------------------------------
def _open_csv(path: str, fields: Fields) -> DocumentSource:
    delimiter = "\t" if path.endswith(".tsv") else ","
    csv.field_size_limit(2**31 - 1)  # documents longer than csv's default of 131,072 characters

    def reader(f):
        return csv.reader(io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline=""), delimiter=delimiter)

    with open(path, "rb") as f:
        header = next(reader(f), None)
    if not header:
        raise ValueError(f"{path} has no header row; a .csv or .tsv input names its columns in its first row")
    chosen = fields.choose(header, path)
    columns = {name: header.index(name) for name in (chosen.text, chosen.id, chosen.reference) if name is not None}

    def rows(counts):
        with open(path, "rb") as f:
            lines = reader(f)
            next(lines, None)
            for row in lines:
                if not row:
                    continue
                value = {name: row[column] if column < len(row) else None for name, column in columns.items()}
                text = value[chosen.text] or ""
                if "\ufffd" in text:
                    counts.replaced_bytes_lines += 1
                yield (value.get(chosen.id) if chosen.id else None), text, (
                    value.get(chosen.reference) if chosen.reference else None)

    return DocumentSource(path, rows)


# --- Arrow tables: Parquet, Arrow files, datasets saved to disk ----------------------------------
def _pyarrow():
    try:
        import pyarrow  # noqa: F401 - an optional import, made where needed
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ValueError("reading .parquet, .arrow and saved datasets needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _arrow_batches(path: str):
    """(schema, a function of the columns wanted giving the record batches) of a .parquet or
    .arrow file."""
    pa = _pyarrow()
    if path.endswith(".parquet"):
        try:
            schema = pa.parquet.ParquetFile(path).schema_arrow
        except pa.ArrowException as error:
            raise ValueError(f"{path} is not a readable Parquet file: {error}") from None

        def batches(columns):
            yield from pa.parquet.ParquetFile(path).iter_batches(ROWS_PER_BATCH, columns=columns)
        return schema, batches

    def open_reader(source):
        try:
            return pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source)

    try:
        with pa.memory_map(path) as source:
            schema = open_reader(source).schema
    except pa.ArrowException as error:
        raise ValueError(f"{path} is not a readable Arrow file: {error}") from None

    def batches(columns):  # a memory map: the columns not wanted are never read
        with pa.memory_map(path) as source:
            reader = open_reader(source)
            if hasattr(reader, "num_record_batches"):  # the file format
                for number in range(reader.num_record_batches):
                    yield reader.get_batch(number)
            else:
                yield from reader
    return schema, batches


def _table_rows(parts, fields: Fields):
    wanted = [name for name in (fields.text, fields.id, fields.reference) if name is not None]

    def rows(counts):
        for batches in parts:
            for batch in batches(wanted):
                columns = {name: batch.column(batch.schema.get_field_index(name)).to_pylist() for name in wanted}
                for position in range(batch.num_rows):
                    yield (_string(columns[fields.id][position]) if fields.id else None,
                           _string(columns[fields.text][position]) or "",
                           _string(columns[fields.reference][position]) if fields.reference else None)
    return rows


def _open_tables(paths: list[str], source: str, fields: Fields) -> DocumentSource:
    opened = [_arrow_batches(path) for path in paths]
    chosen = fields.choose(opened[0][0].names if opened else [], source)
    size = None
    if all(path.endswith(".parquet") for path in paths):
        size = sum(_pyarrow().parquet.ParquetFile(path).metadata.num_rows for path in paths)
    return DocumentSource(source, _table_rows([batches for _, batches in opened], chosen), size)


def _saved_dataset_files(directory: str, split: Optional[str]) -> list[str]:
    """The Arrow files of a `save_to_disk` directory (of `split` for a DatasetDict)."""
    splits_file = os.path.join(directory, "dataset_dict.json")
    if os.path.isfile(splits_file):
        with open(splits_file, encoding="utf-8") as f:
            splits = json.load(f).get("splits", [])
        if split is None and len(splits) != 1:
            raise ValueError(f"{directory} holds the splits {', '.join(splits)}; choose one with --split")
        split = split or splits[0]
        if split not in splits:
            raise ValueError(f"{directory} has no split {split!r} (splits: {', '.join(splits)})")
        directory = os.path.join(directory, split)
    state_file = os.path.join(directory, "state.json")
    if not os.path.isfile(state_file):
        raise ValueError(f"input directory {directory} is not a dataset saved with save_to_disk (no state.json)")
    with open(state_file, encoding="utf-8") as f:
        names = [entry["filename"] for entry in json.load(f).get("_data_files", [])]
    return [os.path.join(directory, name) for name in names]


# --- the hub -------------------------------------------------------------------------------------
def _open_hub(name: str, config: Optional[str], split: Optional[str], fields: Fields) -> DocumentSource:
    dataset = load_hub_split(name, config, split or "test")
    chosen = fields.choose(list(dataset.column_names), f"dataset {name}")

    def rows(counts):
        for batch in dataset.iter(batch_size=ROWS_PER_BATCH):
            for position, text in enumerate(batch[chosen.text]):
                yield (_string(batch[chosen.id][position]) if chosen.id else None, _string(text) or "",
                       _string(batch[chosen.reference][position]) if chosen.reference else None)

    return DocumentSource(f"dataset {name}", rows, len(dataset))


# --- standard input ------------------------------------------------------------------------------
def _spool_stdin() -> str:
    """Standard input copied to a temporary file (read twice: to detect its format, then to read)."""
    handle, path = tempfile.mkstemp(prefix="bart_jax-stdin-")
    with os.fdopen(handle, "wb") as f:
        while chunk := sys.stdin.buffer.read(1 << 20):
            f.write(chunk)
    return path


def _all_objects(path: str) -> bool:
    seen = False
    for line in _lines(path, ReadCounts()):
        if line.strip():
            if not line.lstrip().startswith("{"):
                return False
            seen = True
    return seen


def open_documents(path: Optional[str], text_field: Optional[str] = None, id_field: Optional[str] = None,
                   reference_field: Optional[str] = None, strict: bool = False, *, dataset_name: Optional[str] = None,
                   dataset_config: Optional[str] = None, split: Optional[str] = None) -> DocumentSource:
    """The documents of `path` (a file, a saved dataset directory, or "-") or of the hub dataset
    `dataset_name`; see the module's docstring. Raises ValueError for a source that cannot be read."""
    fields = Fields(text_field, id_field, reference_field, strict)
    if dataset_name is not None:
        if path is not None:
            raise ValueError("give an input file or --dataset-name, not both")
        return _open_hub(dataset_name, dataset_config, split, fields)
    if path is None:
        raise ValueError("give an input file, - for standard input, or --dataset-name")
    if path == "-":
        spooled = _spool_stdin()
        source = (_open_jsonl(spooled, "standard input", fields) if _all_objects(spooled)
                  else DocumentSource("standard input", _text_rows(spooled)))
        source.spooled = spooled
        return source
    if os.path.isdir(path):
        return _open_tables(_saved_dataset_files(path, split), path, fields)
    if not os.path.isfile(path):
        raise ValueError(f"input file {path} does not exist")
    if path.endswith((".jsonl", ".json")):
        return _open_jsonl(path, path, fields)
    if path.endswith((".csv", ".tsv")):
        return _open_csv(path, fields)
    if path.endswith(TABLE_SUFFIXES):
        return _open_tables([path], path, fields)
    if text_field or id_field or reference_field:
        raise ValueError(f"{path} is read as text, one document per line, which has no fields; "
                         f"name a file ending in one of {', '.join(SUFFIXES)} to read fields")
    return DocumentSource(path, _text_rows(path))
