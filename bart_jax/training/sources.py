"""Training corpora as random-access sources that read one record at a time.

A source has `len(source)` and `source[i]` -> record (a dict), the protocol of grain's
`RandomAccessDataSource`, so that `grain.MapDataset.source(source)` can shuffle and slice it
without reading it. What stays in memory does not grow with the corpus's text:

    .jsonl              an index of line offsets (8 bytes a line), built by one scan of the
                        file and cached beside the run's other caches; records are read with
                        `os.pread` when asked for
    .arrow              memory-mapped Arrow IPC (file or stream format), zero copy
    saved dataset dir   `datasets.load_from_disk`, memory-mapped Arrow
    .parquet            converted once to memory-mapped Arrow by `datasets` (parquet is
                        compressed in row groups, so reading one row would decode its group)
    --dataset_name      `datasets.load_dataset(name, config, split=...)`, memory-mapped Arrow
    .json/.csv/.tsv     read whole (`training.data.read_records`): fine-tuning files (GLUE,
                        SQuAD) that are small, and whose formats have no cheap record index

A path may be a glob (`shards/*.jsonl`): its files, sorted, read as one source.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
import threading
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa

from bart_jax.training.data import Record, read_records

STREAMED_FORMATS = (".jsonl", ".arrow", ".parquet")
SOURCE_FORMATS = STREAMED_FORMATS + (".json", ".csv", ".tsv")
_SCAN_BYTES = 1 << 24


def _cache_directory() -> str:
    root = os.environ.get("BART_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "bart_jax")
    return os.path.join(root, "jsonl-index")


def line_spans(path: str, limit: Optional[int] = None) -> np.ndarray:
    """[records, 2] int64: the byte range [start, end) of each record line of `path` (blank lines
    hold none). With `limit`, only the first `limit` records are indexed, and the scan stops there."""
    spans, count, offset, line_start = [], 0, 0, 0
    with open(path, "rb") as f:
        while limit is None or count < limit:
            chunk = f.read(_SCAN_BYTES)
            if not chunk:
                break
            newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + offset
            if len(newlines):
                found = np.stack([np.concatenate([[line_start], newlines[:-1] + 1]), newlines], axis=1)
                # An empty line, or a lone "\r" of a Windows line end, is blank.
                found = found[found[:, 1] - found[:, 0] > 1]
                spans.append(found)
                count += len(found)
                line_start = int(newlines[-1]) + 1
            offset += len(chunk)
        if (limit is None or count < limit) and offset - line_start > 1:
            spans.append(np.array([[line_start, offset]]))
    spans = np.concatenate(spans).astype(np.int64) if spans else np.zeros((0, 2), np.int64)
    return spans if limit is None else spans[:limit]


class JsonLinesSource:
    """The records of a JSON-lines file, read by offset. The index is cached (keyed by the file's
    path, size and modification time), so that a resumed run does not scan the file again."""

    def __init__(self, path: str, limit: Optional[int] = None):
        self.path = os.path.abspath(path)
        self._spans = self._index(limit)
        if not len(self._spans):
            raise ValueError(f"{path} holds no examples")
        self._fd = os.open(self.path, os.O_RDONLY)

    def _index(self, limit: Optional[int]) -> np.ndarray:
        stat = os.stat(self.path)
        if limit is not None:  # a prefix: cheap to scan, not worth a cache entry
            return line_spans(self.path, limit)
        key = hashlib.sha256(f"{self.path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
        cached = os.path.join(_cache_directory(), key + ".npy")
        try:
            return np.load(cached)
        except (OSError, ValueError):
            pass
        spans = line_spans(self.path)
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            temporary = f"{cached}.{os.getpid()}.tmp.npy"
            np.save(temporary, spans)
            os.replace(temporary, cached)
        except OSError:  # a read-only cache only costs the scan next time
            pass
        return spans

    def __len__(self) -> int:
        return len(self._spans)

    def __getitem__(self, index: int) -> Record:
        start, end = (int(value) for value in self._spans[index])
        line = os.pread(self._fd, end - start, start)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.path}: record {index} (byte {start}) is not valid JSON: {error}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{self.path}: record {index} is a {type(record).__name__}, expected a JSON object")
        return record

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __getstate__(self):  # worker processes reopen the file
        return {"path": self.path, "_spans": self._spans}

    def __setstate__(self, state):
        self.path, self._spans = state["path"], state["_spans"]
        self._fd = os.open(self.path, os.O_RDONLY)


class ArrowSource:
    """The rows of an Arrow IPC file (file or stream format), memory-mapped."""

    def __init__(self, path: str):
        self.path = path
        memory_map = pa.memory_map(path, "r")
        try:
            self._table = pa.ipc.open_file(memory_map).read_all()
        except pa.ArrowInvalid:
            memory_map.seek(0)
            self._table = pa.ipc.open_stream(memory_map).read_all()
        if not len(self._table):
            raise ValueError(f"{path} holds no examples")

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, index: int) -> Record:
        return self._table.slice(index, 1).to_pylist()[0]


class DatasetSource:
    """A `datasets.Dataset` (memory-mapped Arrow) as a source."""

    def __init__(self, dataset: Any, name: str):
        self.name = name
        self._dataset = dataset
        if not len(dataset):
            raise ValueError(f"{name} holds no examples")

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> Record:
        return self._dataset[int(index)]


class RecordsSource:
    """Records already in memory (small fine-tuning files)."""

    def __init__(self, records: list[Record]):
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Record:
        return self._records[index]


class ConcatSource:
    """Several sources read as one, in order (the shards of a glob)."""

    def __init__(self, sources: Sequence[Any]):
        self._sources = list(sources)
        self._ends = np.cumsum([len(source) for source in self._sources]).tolist()

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index: int) -> Record:
        shard = bisect.bisect_right(self._ends, index)
        begin = self._ends[shard - 1] if shard else 0
        return self._sources[shard][index - begin]


class LimitedSource:
    """The first `count` records of a source."""

    def __init__(self, source: Any, count: int):
        self._source, self._count = source, min(count, len(source))

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self._source[index]


def _datasets_module():
    try:
        import datasets
    except ImportError:
        raise ValueError("reading parquet files, saved datasets and hub datasets needs the `datasets` package "
                         "(pip install datasets)") from None
    return datasets


def expand_paths(pattern: str) -> list[str]:
    """The files a path or glob names, sorted; ValueError when there are none."""
    if glob.has_magic(pattern):
        paths = sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
        if not paths:
            raise ValueError(f"no data files match {pattern}")
        return paths
    if not os.path.exists(pattern):
        raise ValueError(f"data file not found: {pattern}")
    return [pattern]


def _saved_dataset(path: str) -> DatasetSource:
    datasets = _datasets_module()
    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{path} holds a DatasetDict with splits {sorted(dataset)}; pass one split's directory")
    return DatasetSource(dataset, path)


def open_source(pattern: str, limit: Optional[int] = None) -> Any:
    """The records of a data file, glob of files or saved dataset directory, as a source; with
    `limit`, its first `limit` records (a JSON-lines file is then indexed only that far)."""
    paths = expand_paths(pattern)
    if len(paths) == 1 and os.path.isdir(paths[0]):
        source = _saved_dataset(paths[0])
    else:
        extensions = {os.path.splitext(path)[1].lower() for path in paths}
        if len(extensions) > 1:
            raise ValueError(f"{pattern} mixes file formats: {sorted(extensions)}")
        extension = extensions.pop()
        if extension not in SOURCE_FORMATS:
            raise ValueError(f"cannot read {pattern}: expected one of {', '.join(SOURCE_FORMATS)} or a saved "
                             f"dataset directory")
        if extension == ".parquet":
            datasets = _datasets_module()
            dataset = datasets.load_dataset("parquet", data_files=paths, split="train")
            source = DatasetSource(dataset, pattern)
        elif extension == ".jsonl":
            source = _concat([JsonLinesSource(path, limit) for path in paths])
        elif extension == ".arrow":
            source = _concat([ArrowSource(path) for path in paths])
        else:
            source = _concat([RecordsSource(read_records(path)) for path in paths])
    return source if limit is None else LimitedSource(source, limit)


def _concat(sources: list[Any]) -> Any:
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


_HUB_LOCK = threading.Lock()
UNREACHABLE = " (the Hugging Face Hub is unreachable or HF_DATASETS_OFFLINE is set)"
OFFLINE_HINT = ". Offline, save it with `save_to_disk` where the hub can be reached and pass that directory"


def load_hub_split(name: str, config_name: Optional[str], split: str):
    """`datasets.load_dataset(name, config_name, split=split)`: one split of a Hugging Face dataset
    (a hub name, or a local dataset directory or script), downloaded once into datasets' Arrow
    cache. ValueError naming the dataset when it cannot be loaded, saying so when the hub is
    unreachable (offline: `save_to_disk` it elsewhere and pass that directory)."""
    datasets = _datasets_module()
    with _HUB_LOCK:
        try:
            return datasets.load_dataset(name, config_name, split=split)
        except (ValueError, FileNotFoundError, ConnectionError, OSError) as error:
            unreachable, hint = (UNREACHABLE, OFFLINE_HINT) if _offline(error) else ("", "")
            raise ValueError(f"cannot load split {split!r} of dataset {name!r}"
                             f"{f' ({config_name})' if config_name else ''}{unreachable}: {error}{hint}") from None


def hub_source(name: str, config_name: Optional[str], split: str, limit: Optional[int] = None) -> DatasetSource:
    """One split of a Hugging Face dataset (`load_hub_split`), as memory-mapped Arrow."""
    source = DatasetSource(load_hub_split(name, config_name, split), f"{name}[{split}]")
    return source if limit is None else LimitedSource(source, limit)


def _offline(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(word in text for word in ("connection", "offline", "resolve", "network", "unreachable", "timed out"))
