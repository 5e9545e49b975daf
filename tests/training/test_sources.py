"""The training corpora's random-access sources (bart_jax/training/sources.py): every format
reads the records it was given, in order, without reading the whole corpus into memory."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bart_jax.training import sources

datasets = pytest.importorskip("datasets", reason="the parquet, saved-dataset and hub sources read through datasets")

RECORDS = [{"document": f"Document number {i}. " * (1 + i % 3), "summary": f"Summary {i}.", "id": i}
           for i in range(23)]


def all_records(source) -> list[dict]:
    return [source[i] for i in range(len(source))]


def write_jsonl(path, records, line_end="\n", blank_every=0) -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        for i, record in enumerate(records):
            f.write(json.dumps(record) + line_end)
            if blank_every and i % blank_every == 0:
                f.write(line_end)
    return str(path)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BART_JAX_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_line_spans_skip_blank_lines_and_read_a_last_line_without_newline(tmp_path, monkeypatch, line_end):
    path = write_jsonl(tmp_path / "data.jsonl", RECORDS, line_end=line_end, blank_every=4)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"document": "last", "summary": "no newline"}))
    monkeypatch.setattr(sources, "_SCAN_BYTES", 64)  # records straddle the scan's chunks
    spans = sources.line_spans(path)
    raw = open(path, "rb").read()
    lines = [json.loads(raw[start:end]) for start, end in spans]
    assert lines == RECORDS + [{"document": "last", "summary": "no newline"}]
    np.testing.assert_array_equal(sources.line_spans(path, limit=5), spans[:5])


def test_jsonl_source_reads_records_by_offset_and_caches_its_index(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "data.jsonl", RECORDS, blank_every=5)
    source = sources.JsonLinesSource(path)
    assert all_records(source) == RECORDS
    assert source[7] == RECORDS[7] and source[-1] == RECORDS[-1]
    assert list((tmp_path / "cache" / "jsonl-index").iterdir()), "the index was not cached"

    def scan(*args, **kwargs):
        raise AssertionError("the cached index was scanned again")

    monkeypatch.setattr(sources, "line_spans", scan)
    assert all_records(sources.JsonLinesSource(path)) == RECORDS
    assert all_records(pickle.loads(pickle.dumps(source))) == RECORDS


def test_jsonl_limit_indexes_only_the_first_records(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    with open(path, "a", encoding="utf-8") as f:
        f.write("this line is never read\n")
    source = sources.open_source(path, limit=4)
    assert all_records(source) == RECORDS[:4]


def test_jsonl_source_names_a_bad_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{not json\n[1, 2]\n", encoding="utf-8")
    source = sources.JsonLinesSource(str(path))
    with pytest.raises(ValueError, match=r"record 1 \(byte \d+\) is not valid JSON"):
        source[1]
    with pytest.raises(ValueError, match="record 2 is a list, expected a JSON object"):
        source[2]


def test_a_glob_reads_its_shards_in_order_as_one_source(tmp_path):
    shards = [RECORDS[:9], RECORDS[9:10], RECORDS[10:]]
    for i, shard in enumerate(shards):
        write_jsonl(tmp_path / f"train-{i:05d}-of-00003.jsonl", shard)
    source = sources.open_source(str(tmp_path / "train-*.jsonl"))
    assert len(source) == len(RECORDS) and all_records(source) == RECORDS
    assert all_records(sources.open_source(str(tmp_path / "train-*.jsonl"), limit=11)) == RECORDS[:11]


@pytest.mark.parametrize("stream_format", [False, True], ids=["file", "stream"])
def test_arrow_source_is_memory_mapped_and_reads_every_row(tmp_path, stream_format):
    table = pa.Table.from_pylist(RECORDS)
    path = str(tmp_path / "data.arrow")
    with pa.OSFile(path, "wb") as sink:
        writer = (pa.ipc.new_stream if stream_format else pa.ipc.new_file)(sink, table.schema)
        for batch in table.to_batches(max_chunksize=5):  # several record batches
            writer.write_batch(batch)
        writer.close()
    source = sources.open_source(path)
    assert all_records(source) == RECORDS
    allocated = pa.total_allocated_bytes()
    sources.open_source(path)
    assert pa.total_allocated_bytes() == allocated, "reading the Arrow file copied it into memory"


def test_parquet_shards_read_through_an_arrow_cache(tmp_path):
    pq.write_table(pa.Table.from_pylist(RECORDS[:12]), tmp_path / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(RECORDS[12:]), tmp_path / "part-1.parquet")
    source = sources.open_source(str(tmp_path / "part-*.parquet"))
    assert all_records(source) == RECORDS
    assert all_records(sources.open_source(str(tmp_path / "part-*.parquet"), limit=3)) == RECORDS[:3]


def test_saved_dataset_directory_is_a_source_and_a_dataset_dict_is_refused(tmp_path):
    dataset = datasets.Dataset.from_list(RECORDS)
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert all_records(sources.open_source(str(tmp_path / "saved"))) == RECORDS
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['test', 'train'\]; pass one split's directory"):
        sources.open_source(str(tmp_path / "splits"))


def test_hub_source_loads_a_named_split_of_a_local_dataset(tmp_path):
    """`--dataset_name` takes what `datasets.load_dataset` takes: here a directory of split files."""
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "train.jsonl", RECORDS[:15])
    write_jsonl(tmp_path / "corpus" / "validation.jsonl", RECORDS[15:])
    assert all_records(sources.hub_source(str(tmp_path / "corpus"), None, "train")) == RECORDS[:15]
    assert all_records(sources.hub_source(str(tmp_path / "corpus"), None, "validation", limit=2)) == RECORDS[15:17]
    with pytest.raises(ValueError, match="cannot load split 'test' of dataset"):
        sources.hub_source(str(tmp_path / "corpus"), None, "test")


def test_hub_source_offline_says_the_hub_is_unreachable(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"cannot load split 'train' of dataset 'someone/no-such-dataset' "
                                         r"\(the Hugging Face Hub is unreachable"):
        sources.hub_source("someone/no-such-dataset", None, "train")


def test_bad_paths_are_refused_with_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="no data files match"):
        sources.open_source(str(tmp_path / "missing-*.jsonl"))
    with pytest.raises(ValueError, match="data file not found"):
        sources.open_source(str(tmp_path / "missing.jsonl"))
    write_jsonl(tmp_path / "a.jsonl", RECORDS)
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"mixes file formats: \['.jsonl', '.parquet'\]"):
        sources.open_source(str(tmp_path / "*.*"))
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no examples"):
        sources.open_source(str(tmp_path / "empty.jsonl"))
