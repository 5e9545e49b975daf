"""The training input pipeline (bart_jax/training/pipeline.py): its batches do not depend on how
many processes build them, every epoch visits every example once, a saved state resumes exactly,
and denoising packs documents into full blocks."""

from __future__ import annotations

import grain
import numpy as np
import pytest

from bart_jax.training import noise
from bart_jax.training.pipeline import PackingConfig, example_source, training_dataset

PAD, BOS, EOS = 1, 0, 2
LENGTHS = {"input_ids": 6, "labels": 4}


def numbered_examples(count: int) -> grain.MapDataset:
    """Example i: input_ids [i, i + 1000], labels [i]."""
    return grain.MapDataset.range(count).map(
        lambda i: {"input_ids": np.array([i, i + 1000], np.int32), "labels": np.array([i], np.int32)})


def take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


def assert_same_batches(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for step, (got, want) in enumerate(zip(actual, expected)):
        assert sorted(got) == sorted(want), f"batch {step}: columns {sorted(got)} != {sorted(want)}"
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"batch {step}, column {name}")


def test_each_epoch_visits_every_example_once_in_a_new_order():
    batches = take(iter(training_dataset(numbered_examples(24), range(8), 8, 0, LENGTHS, PAD)), 6)
    ids = np.concatenate([batch["labels"][:, 0] for batch in batches])
    first, second = ids[:24], ids[24:]
    assert sorted(first) == sorted(second) == list(range(24)), "an epoch missed or repeated examples"
    assert list(first) != list(second), "the second epoch repeated the first one's order"
    assert list(first) != list(range(24)), "the examples were not shuffled"
    batch = batches[0]
    assert batch["input_ids"].shape == (8, 6) and batch["labels"].shape == (8, 4)
    np.testing.assert_array_equal(batch["attention_mask"].sum(1), 2)
    np.testing.assert_array_equal(batch["labels"][:, 1:], -100)


def test_batches_are_the_same_however_many_processes_build_them():
    examples, seed = numbered_examples(19), 3
    whole = take(iter(training_dataset(examples, range(8), 8, seed, LENGTHS, PAD)), 5)
    halves = [take(iter(training_dataset(examples, rows, 8, seed, LENGTHS, PAD)), 5)
              for rows in (range(0, 4), range(4, 8))]
    joined = [{name: np.concatenate([first[name], second[name]]) for name in first}
              for first, second in zip(*halves)]
    assert_same_batches(joined, whole)
    # Rows need not be contiguous: a process holding rows 1 and 6 gets those rows of the batch.
    spread = take(iter(training_dataset(examples, [1, 6], 8, seed, LENGTHS, PAD)), 5)
    assert_same_batches(spread, [{name: batch[name][[1, 6]] for name in batch} for batch in whole])


def test_a_saved_state_resumes_with_exactly_the_batches_that_would_have_come():
    dataset = training_dataset(numbered_examples(13), [1, 4, 6], 8, 7, LENGTHS, PAD)
    iterator = iter(dataset)
    take(iterator, 4)
    state = iterator.get_state()
    expected = take(iterator, 6)
    resumed = iter(dataset)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 6), expected)


def test_empty_examples_are_skipped_and_a_stream_of_them_is_an_error(monkeypatch):
    examples = numbered_examples(10).map(lambda example: None if example["labels"][0] % 3 == 0 else example)
    ids = np.concatenate([b["labels"][:, 0] for b in take(iter(training_dataset(examples, range(2), 2, 0, LENGTHS,
                                                                                    PAD)), 12)])
    assert set(ids) == {1, 2, 4, 5, 7, 8}
    monkeypatch.setattr("bart_jax.training.pipeline.MAX_CONSECUTIVE_EMPTY", 50)
    nothing = grain.MapDataset.range(4).map(lambda i: None)
    with pytest.raises(ValueError, match="batch row 0 met 50 empty examples in a row"):
        next(iter(training_dataset(nothing, [0], 1, 0, LENGTHS, PAD)))


def test_rows_outside_the_global_batch_are_refused():
    with pytest.raises(ValueError, match="at least one batch row"):
        training_dataset(numbered_examples(4), [], 4, 0, LENGTHS, PAD)
    with pytest.raises(ValueError, match=r"batch rows 2\.\.4 lie outside a global batch of 4"):
        training_dataset(numbered_examples(4), [2, 4], 4, 0, LENGTHS, PAD)


# --- denoising: packing -------------------------------------------------------------------------
def packing_without_noise(max_length: int) -> PackingConfig:
    vocab = {"<s>": BOS, "<pad>": PAD, "</s>": EOS, "<unk>": 3, "<mask>": 4, **{f"Ġw{i}": 5 + i for i in range(100)}}
    quiet = noise.NoiseConfig(mask_ratio=0.0, random_ratio=0.0, permute_sentence_ratio=0.0, rotate_ratio=0.0)
    return PackingConfig(max_length, BOS, EOS, quiet, noise.NoiseVocabulary.from_vocab(vocab))


def documents(count: int) -> list[np.ndarray]:
    """Document i: i + 1 distinct word ids, then </s>."""
    rng = np.random.default_rng(0)
    return [np.append(rng.integers(5, 105, i % 7 + 1), EOS).astype(np.int32) for i in range(count)]


def test_denoising_packs_each_rows_documents_into_full_blocks():
    docs, max_length = documents(20), 9
    examples = grain.MapDataset.source(docs)
    lengths = {"input_ids": max_length, "labels": max_length}
    batches = take(iter(training_dataset(examples, range(2), 2, 5, lengths, PAD, packing_without_noise(max_length))), 12)
    for batch in batches:
        labels = batch["labels"]
        assert (labels != -100).all(), "a block was not full"
        np.testing.assert_array_equal(labels[:, 0], BOS)
        np.testing.assert_array_equal(labels[:, -1], EOS)
        np.testing.assert_array_equal(batch["input_ids"], labels)  # no noise configured
    # Row 0's blocks, unwrapped and joined, are its documents in its shuffled order, back to back.
    stream = np.concatenate([batch["labels"][0, 1:-1] for batch in batches])
    order = grain.MapDataset.range(len(docs)).shuffle(5).repeat()[0::2]  # the same permutation
    expected = np.concatenate([docs[order[i]] for i in range(len(docs))])  # more than the blocks hold
    np.testing.assert_array_equal(stream, expected[:len(stream)])


def test_denoising_resumes_in_the_middle_of_a_document_with_the_same_noise():
    docs, max_length = documents(15), 8
    lengths = {"input_ids": max_length, "labels": max_length}
    packing = PackingConfig(max_length, BOS, EOS, noise.NoiseConfig(permute_sentence_ratio=0.0),
                            packing_without_noise(max_length).vocabulary)
    dataset = training_dataset(grain.MapDataset.source(docs), [0, 3], 4, 11, lengths, PAD, packing)
    iterator = iter(dataset)
    take(iterator, 3)
    state = iterator.get_state()
    expected = take(iterator, 5)
    assert any((b["input_ids"] != b["labels"]).any() for b in expected), "the noise changed nothing"
    resumed = iter(dataset)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 5), expected)


def test_example_source_featurizes_records_with_their_index():
    seen = []
    examples = example_source(["a", "b", "c"], lambda index, record: seen.append((index, record)) or index)
    assert [examples[i] for i in range(3)] == [0, 1, 2]
    assert sorted(seen) == [(0, "a"), (1, "b"), (2, "c")]
