"""Training data that train.py refuses, naming the example, rather than training on something else
than what it holds: class ids beyond --num_labels (a wider head would be trained), and text fields
that are not strings (they would be trained on as their `str()`)."""

from __future__ import annotations

import json

import pytest

from bart_jax.training import features, main

pytestmark = pytest.mark.shared_data


def test_label_ids_beyond_num_labels_are_refused_naming_the_example(bart_tokenizer):
    records = [{"sentence": f"Example number {i}.", "label": label} for i, label in enumerate([0, 1, 2, 4, 3])]
    scheme = features.infer_label_scheme([record["label"] for record in records], None, 3)
    assert scheme.num_labels == 3, "a given num_labels is the head's size"
    with pytest.raises(ValueError, match=r"train.jsonl: example 3 has label 4, outside the label ids 0..2 "
                                         r"\(num_labels is 3\)"):
        features.classification_data(records, bart_tokenizer, "sentence", None, "label", 32, scheme, "train.jsonl")
    assert features.infer_label_scheme([0, 4], None, None).num_labels == 5, "without num_labels the data decides"
    # Examples dropped as empty keep the numbering of the file.
    records = [{"sentence": "", "label": 0}, {"sentence": "Kept.", "label": "7"}]
    with pytest.raises(ValueError, match="example 1 has label '7'"):
        features.classification_data(records, bart_tokenizer, "sentence", None, "label", 32, scheme, "dev.csv")


@pytest.mark.parametrize("value", [12345, 3.5, ["a", "list"], {"a": "mapping"}, True])
def test_a_text_that_is_not_a_string_is_refused_naming_the_example(bart_tokenizer, value):
    records = [{"document": "A text.", "summary": "A summary."}, {"document": value, "summary": "Another."}]
    kind = type(value).__name__
    with pytest.raises(ValueError, match=f"train.jsonl: example 1 has {kind} .* in text column 'document'; "
                                         f"expected a string"):
        features.seq2seq_data(records, bart_tokenizer, "document", "summary", 16, 8, "train.jsonl")
    with pytest.raises(ValueError, match=f"example 1 has {kind}"):
        features.denoising_data(records, bart_tokenizer, "document", 32, features.noise.NoiseConfig(), 0, "train")
    records = [{"sentence": "A text.", "pair": value, "label": 0}]
    with pytest.raises(ValueError, match=f"example 0 has {kind} .* in text column 'pair'"):
        features.classification_data(records, bart_tokenizer, "sentence", "pair", "label", 32,
                                     features.infer_label_scheme([0], None, 2), "train")
    # Missing or blank texts are still dropped and counted, not refused.
    records = [{"document": None, "summary": "x"}, {"document": " ", "summary": "x"},
               {"document": "Kept.", "summary": "y"}]
    assert features.seq2seq_data(records, bart_tokenizer, "document", "summary", 16, 8, "train").stats.empty == 2


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def test_train_refuses_labels_beyond_num_labels_in_one_line(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [{"sentence1": f"Example {i}.", "label": i % 5} for i in range(10)])
    code = main(["--task", "classify", "--num_labels", "3", "--model_name_or_path", tiny_model_dir, "--train_file",
                 data, "--max_seq_length", "16", "--max_steps", "1", "--output_dir", str(tmp_path / "run"),
                 "--disable_tqdm"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert error == f"error: {data}: example 3 has label 3, outside the label ids 0..2 (num_labels is 3)", error
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "model").exists()


def test_train_refuses_a_text_that_is_not_a_string_in_one_line(tiny_model_dir, tmp_path, capsys):
    # Streamed records are checked as they are read: two steps of 8 rows read all 8 records.
    data = write_jsonl(tmp_path / "train.jsonl", [{"document": "A text.", "summary": "A summary."}] * 7
                       + [{"document": 20240101, "summary": "A date."}])
    code = main(["--task", "seq2seq", "--model_name_or_path", tiny_model_dir, "--train_file", data,
                 "--max_source_length", "16", "--max_target_length", "8", "--max_steps", "2",
                 "--output_dir", str(tmp_path / "run"), "--disable_tqdm"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert error == (f"error: {data}: example 7 has int 20240101 in text column 'document'; expected a string"), error
