"""What `bart-jax summarize` reads and writes, with a stand-in model (no weights, nothing
generated): every input format (text, JSON lines, CSV/TSV, Parquet, Arrow, datasets saved to
disk, hub datasets, standard input), invalid lines, ids and references; output formats, all
returned sequences, ROUGE scores and the final report; windows that keep the input order."""

from __future__ import annotations

import io
import json
import os
import sys
import types

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet
import pytest
from rouge_score import rouge_scorer

from bart_jax.apps import cli, inputs, scores
from bart_jax.apps.summarize import Summary

ROWS = [{"id": f"doc-{i}", "article": f"Article number {i} says something.", "highlights": f"Summary {i}."}
        for i in range(5)]


def read(source):
    return [(d.index, d.id, d.text, d.reference) for d in source]


def expected(rows=ROWS, reference=True):
    return [(i, r["id"], r["article"], r["highlights"] if reference else None) for i, r in enumerate(rows)]


def write_arrow_stream(table, path):
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)


def save_to_disk_layout(table, directory):
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream files listed in state.json."""
    directory.mkdir(parents=True)
    write_arrow_stream(table.slice(0, 3), directory / "data-00000-of-00002.arrow")
    write_arrow_stream(table.slice(3), directory / "data-00001-of-00002.arrow")
    (directory / "state.json").write_text(json.dumps({"_data_files": [
        {"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}]}))
    (directory / "dataset_info.json").write_text("{}")


def test_tables_csv_tsv_parquet_arrow_and_saved_datasets(tmp_path):
    table = pa.Table.from_pylist(ROWS)
    pa.parquet.write_table(table, tmp_path / "in.parquet", row_group_size=2)
    write_arrow_stream(table, tmp_path / "stream.arrow")
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    for name, delimiter in (("in.csv", ","), ("in.tsv", "\t")):
        lines = [delimiter.join(ROWS[0])] + [delimiter.join(f'"{v}"' for v in row.values()) for row in ROWS]
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    save_to_disk_layout(table, tmp_path / "saved")
    (tmp_path / "dict").mkdir()
    save_to_disk_layout(table, tmp_path / "dict" / "test")
    save_to_disk_layout(table.slice(0, 1), tmp_path / "dict" / "train")
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    for name in ("in.parquet", "stream.arrow", "file.arrow", "in.csv", "in.tsv", "saved"):
        source = inputs.open_documents(str(tmp_path / name), reference_field="highlights")
        assert read(source) == expected(), name
        assert read(source) == expected(), f"{name} read a second time"
    assert read(inputs.open_documents(str(tmp_path / "dict"), split="test", reference_field="highlights")) == expected()
    assert inputs.open_documents(str(tmp_path / "in.parquet")).size == 5
    with pytest.raises(ValueError, match="choose one with --split"):
        inputs.open_documents(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"has no field 'body' \(fields: id, article, highlights\)"):
        inputs.open_documents(str(tmp_path / "in.csv"), text_field="body")
    with pytest.raises(ValueError, match="no field 'summary' for --reference-field"):
        inputs.open_documents(str(tmp_path / "in.parquet"), reference_field="summary")
    with pytest.raises(ValueError, match="which has no fields"):
        (tmp_path / "in.txt").write_text("one\n")
        inputs.open_documents(str(tmp_path / "in.txt"), text_field="article")
    keyed = inputs.open_documents(str(tmp_path / "in.csv"), id_field="highlights")
    assert [d.id for d in keyed] == [row["highlights"] for row in ROWS]


def test_invalid_json_lines_are_skipped_counted_and_named_unless_strict(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "first"}\nnot json\n[1, 2]\n\n{"body": "x"}\n{"text": "last", "id": 7}\n')
    source = inputs.open_documents(str(path))
    assert [(d.index, d.id, d.text) for d in source] == [(0, None, "first"), (1, "7", "last")]
    assert source.counts.invalid_lines == 3
    assert [w.split(" line ")[1][:1] for w in source.counts.warnings] == ["2", "3", "5"]
    assert "line 2 is not valid JSON" in source.counts.warnings[0]
    with pytest.raises(ValueError, match="line 2 is not valid JSON.*--strict"):
        list(inputs.open_documents(str(path), strict=True))
    path.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no field one of text, document, article"):
        inputs.open_documents(str(path))


def test_standard_input_text_or_json_lines(monkeypatch):
    cases = ((b'{"text": "a"}\n{"text": "b"}\n', ["a", "b"]), (b"plain \xff\nlines\n", ["plain \ufffd", "lines"]))
    for data, texts in cases:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        source = inputs.open_documents("-")
        assert [d.text for d in source] == texts
        source.close()
        assert source.spooled is not None and not os.path.exists(source.spooled)


class FakeDataset:
    column_names = ["id", "article", "highlights"]

    def __len__(self):
        return len(ROWS)

    def iter(self, batch_size):
        for start in range(0, len(ROWS), batch_size):
            rows = ROWS[start: start + batch_size]
            yield {name: [row[name] for row in rows] for name in self.column_names}


def test_hub_datasets_by_name_and_the_offline_error(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "offline":
            raise ConnectionError("Couldn't reach 'offline' on the Hub (LocalEntryNotFoundError)")
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    source = inputs.open_documents(None, dataset_name="cnn_dailymail", dataset_config="3.0.0",
                                   reference_field="highlights")
    assert read(source) == expected() and calls == [("cnn_dailymail", "3.0.0", "test")] and source.size == 5
    with pytest.raises(ValueError, match="cannot load split 'validation' of dataset 'offline' "
                                         r"\(the Hugging Face Hub is unreachable.*Couldn't reach.*save_to_disk"):
        inputs.open_documents(None, dataset_name="offline", split="validation")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ValueError, match="needs the `datasets` package"):
        inputs.open_documents(None, dataset_name="cnn_dailymail")


# --- the command with a stand-in model --------------------------------------------------------
def fake_summaries(model, texts, batch_size=8, max_source_length=None, seed=0, stats=None, on_batch=None,
                   details=False, num_return_sequences=1, **options):
    """Two candidates per text, in reverse order of the texts (as length sorting would)."""
    for index in reversed(range(len(texts))):
        words = texts[index].split()
        candidates = [" ".join(words[:3]), " ".join(words[:2])][:num_return_sequences]
        if stats is not None:
            stats.documents += 1
        yield index, (Summary(candidates, [[len(c)] for c in candidates], [-0.5, -0.75][:len(candidates)])
                      if details else candidates[0])


@pytest.fixture
def fake_model(monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda args: None)
    monkeypatch.setattr(cli, "iter_summaries", fake_summaries)


def summarize(*arguments):
    return cli.main(["summarize", *map(str, arguments), "--model", "never-loaded", "--no-progress",
                     "--no-compilation-cache"])


def report_of(error):
    return json.loads(error.split("summary: ")[1].splitlines()[0])


def test_outputs_parquet_csv_and_every_returned_sequence(fake_model, tmp_path, capsys):
    pa.parquet.write_table(pa.Table.from_pylist(ROWS), tmp_path / "in.parquet")
    assert summarize(tmp_path / "in.parquet", "-o", tmp_path / "out.parquet", "--num-return-sequences", "2",
                     "--output-ids", "--window", "2") == 0
    records = pa.parquet.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in records] == [r["id"] for r in ROWS] and [r["index"] for r in records] == list(range(5))
    assert records[1]["summary"] == "Article number 1" and records[1]["summaries"] == ["Article number 1",
                                                                                       "Article number"]
    assert records[1]["scores"] == [-0.5, -0.75] and records[1]["score"] == -0.5
    assert records[1]["summaries_ids"] == [[16], [14]] and records[1]["summary_ids"] == [16]
    assert not (tmp_path / "out.parquet.partial.jsonl").exists()
    assert summarize(tmp_path / "in.parquet", "-o", tmp_path / "out.csv") == 0
    header, first = (tmp_path / "out.csv").read_text().splitlines()[:2]
    assert header == "id,index,summary,score,text_hash,options_hash" and first.startswith("doc-0,0,Article number 0,")
    capsys.readouterr()
    assert summarize(tmp_path / "in.parquet", "--output-format", "parquet") == 2
    assert "needs an output file" in capsys.readouterr().err


def test_resume_a_parquet_output_from_its_journal(fake_model, tmp_path, capsys):
    pa.parquet.write_table(pa.Table.from_pylist(ROWS), tmp_path / "in.parquet")
    assert summarize(tmp_path / "in.parquet", "-o", tmp_path / "full.parquet") == 0
    complete = pa.parquet.read_table(tmp_path / "full.parquet").to_pylist()
    journal = tmp_path / "out.parquet.partial.jsonl"
    journal.write_text("".join(json.dumps(complete[i]) + "\n" for i in (3, 0)) + '{"index": 1, "sum')
    capsys.readouterr()
    assert summarize(tmp_path / "in.parquet", "-o", tmp_path / "out.parquet", "--resume") == 0
    assert pa.parquet.read_table(tmp_path / "out.parquet").to_pylist() == complete
    assert report_of(capsys.readouterr().err)["skipped_by_resume"] == 2
    assert summarize(tmp_path / "in.parquet", "-o", tmp_path / "out.parquet", "--resume") == 2
    assert "is complete (there is no" in capsys.readouterr().err


def test_references_are_scored_and_reported(fake_model, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    metrics = tmp_path / "metrics.json"
    assert summarize(source, "--reference-field", "highlights", "--metrics-output", metrics, "--window", "3") == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["index"] for line in captured.out.splitlines()] == list(range(5))
    report = report_of(captured.err)
    assert report == json.loads(metrics.read_text())
    summaries = [" ".join(row["article"].split()[:3]) for row in ROWS]
    assert report["rouge"] == scores.rouge(summaries, [row["highlights"] for row in ROWS])
    assert report["rouge"]["documents"] == 5 and report["documents"] == 5


def test_rouge_equals_rouge_score_with_sentences_on_lines():
    summaries = ["The cat sat on the mat. It was happy.", "Rain fell all day in the city."]
    references = ["A cat sat on a mat.\nThe cat was happy.", "It rained in the city for a whole day."]
    result = scores.rouge(summaries, references, bootstrap_samples=200)
    scorer = rouge_scorer.RougeScorer(list(scores.ROUGE_TYPES), use_stemmer=True)
    split = [(scores.split_sentences(r), scores.split_sentences(s)) for s, r in zip(summaries, references)]
    assert split[0] == ("A cat sat on a mat.\nThe cat was happy.", "The cat sat on the mat.\nIt was happy.")
    for name in scores.ROUGE_TYPES:
        mean = sum(scorer.score(r, s)[name].fmeasure for r, s in split) / 2
        assert result[name]["mid"] == pytest.approx(100 * mean, abs=1e-3)
        assert result[name]["low"] <= result[name]["mid"] <= result[name]["high"]
    assert result == scores.rouge(summaries, references, bootstrap_samples=200), "the interval is not seeded"
    assert scores.split_sentences("Mr. Smith met Dr. Jones in the U.S. on Monday. Then he left.") == (
        "Mr. Smith met Dr. Jones in the U.S. on Monday.\nThen he left.")
