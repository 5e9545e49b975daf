"""bart_jax.training.features: tokenized examples of each task (seq2seq, denoising blocks,
classification of texts and text pairs) and label schemes, on the real BART tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from bart_jax.training import data, features


def test_seq2seq_features_drop_empty_and_truncate_long_examples(bart_tokenizer):
    long_text = "word " * 100
    records = [{"document": "A short text.", "summary": "Short."}, {"document": "  ", "summary": "x"},
               {"document": long_text, "summary": None}, {"document": long_text, "summary": "Fine."}]
    task_data = features.seq2seq_data(records, bart_tokenizer, "document", "summary", 16, 8, "train")
    assert (task_data.stats.records, task_data.stats.empty, task_data.stats.truncated) == (4, 2, 1)
    expected = bart_tokenizer(["A short text.", long_text], truncation=True, max_length=16)["input_ids"]
    assert [ids.tolist() for ids in task_data.columns["input_ids"]] == expected
    assert task_data.columns["labels"][0].tolist() == bart_tokenizer("Short.")["input_ids"]
    assert task_data.references == ["Short.", "Fine."]


def test_denoising_splits_long_documents_into_blocks(bart_tokenizer):
    text = " ".join(f"Sentence number {i}." for i in range(40))
    task_data = features.denoising_data([{"text": text}, {"text": ""}], bart_tokenizer, "text", 32,
                                        features.noise.NoiseConfig(), seed=0, source="train")
    ids = bart_tokenizer(text)["input_ids"]
    blocks = task_data.columns["labels"]
    assert task_data.stats.empty == 1 and task_data.stats.truncated == 1
    assert all(len(block) <= 32 and block[0] == 0 and block[-1] == 2 for block in blocks)
    assert np.concatenate([block[1:-1] for block in blocks]).tolist() == ids[1:-1], "blocks must cover the document"
    noisy = task_data.make_inputs(0, 0)
    np.testing.assert_array_equal(noisy, task_data.make_inputs(0, 0))
    assert len(noisy) <= 32 and noisy[0] == 0 and noisy[-1] == 2


def test_label_schemes():
    names = features.infer_label_scheme(["b", "a", "b"], None, None)
    assert names == features.LabelScheme("single_label_classification", ("a", "b"))
    mnli = features.infer_label_scheme(["entailment"], None, None, ("contradiction", "neutral", "entailment"))
    assert mnli.names == ("contradiction", "neutral", "entailment"), "a checkpoint's label order is kept"
    assert features.infer_label_scheme(["3.8", "1.0"], None, None).problem_type == "regression"
    assert features.infer_label_scheme([0, 2], None, None).num_labels == 3
    multi = features.infer_label_scheme([["x", "y"], ["y"]], None, None)
    assert multi.problem_type == "multi_label_classification"
    np.testing.assert_array_equal(features.encode_labels([["x", "y"], ["y"]], multi, "train"), [[1, 1], [0, 1]])
    with pytest.raises(ValueError, match="unknown label 'c'"):
        features.encode_labels(["c"], names, "validation")
    with pytest.raises(ValueError, match="num_labels is 3"):
        features.infer_label_scheme(["a", "b"], None, 3)


def test_classification_features_of_text_pairs(bart_tokenizer, shared_data):
    records = data.read_records(shared_data / "classification" / "mrpc_hf_fixture" / "dev.csv")
    scheme = features.infer_label_scheme(data.column_values(records, "label"), None, None)
    task_data = features.classification_data(records, bart_tokenizer, "sentence1", "sentence2", "label", 24, scheme,
                                             "dev.csv")
    first, second = data.column_values(records, "sentence1"), data.column_values(records, "sentence2")
    expected = bart_tokenizer(first, second, truncation=True, max_length=24)["input_ids"]
    assert [ids.tolist() for ids in task_data.columns["input_ids"]] == expected
    assert task_data.stats.truncated == sum(
        len(ids) > 24 for ids in bart_tokenizer(first, second)["input_ids"])
    assert scheme.names == ("equivalent", "not_equivalent")
    assert [int(label) for label in task_data.columns["labels"]] == [
        scheme.names.index(name) for name in data.column_values(records, "label")]
