"""bart_jax.training.data: reading JSON Lines, JSON, CSV and TSV records, nested columns, bad files."""

from __future__ import annotations

import json

import pytest

from bart_jax.training import data


def test_reads_every_file_format(tmp_path, shared_data):
    rows = [{"document": "a b", "summary": "a", "meta": {"lang": "en"}}, {"document": "c", "summary": "d",
                                                                         "meta": {"lang": "fr"}}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    (tmp_path / "x.json").write_text(json.dumps({"version": 1, "data": rows}))
    (tmp_path / "x.csv").write_text('document,summary\n"a b",a\nc,d\n')
    (tmp_path / "x.tsv").write_text('document\tsummary\n"a b\ta\nc\td\n')
    for name in ("x.jsonl", "x.json"):
        records = data.read_records(tmp_path / name)
        assert data.column_values(records, "meta.lang") == ["en", "fr"], f"{name}: nested column"
    assert data.column_values(data.read_records(tmp_path / "x.csv"), "document") == ["a b", "c"]
    # TSV is read unquoted, as GLUE files need.
    assert data.column_values(data.read_records(tmp_path / "x.tsv"), "document") == ['"a b', "c"]
    squad = data.read_records(shared_data / "qa" / "squad_hf_fixture_sample.json")
    assert len(squad) == 14 and "answers" in squad[0]


def test_bad_data_files_are_reported(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{"a": \n')
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="holds no examples"):
        data.read_records(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        data.read_records(tmp_path / "broken.jsonl")
    with pytest.raises(ValueError, match="expected one of"):
        data.read_records(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="not found"):
        data.read_records(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"no column 'summary'; its columns are \['document'\]"):
        data.column_values([{"document": "x"}], "summary", "train.jsonl")
