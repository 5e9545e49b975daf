"""Properties of BART's denoising noise (bart_jax.training.noise)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bart_jax.training import noise

MASK = 999
BOS, EOS = 0, 2


def synthetic_vocabulary(size: int = 1000, continuation_ids=(), sentence_end_ids=()) -> noise.NoiseVocabulary:
    """Every id from 3 on begins a word unless listed as a continuation; MASK is the mask."""
    begins_word = np.ones(size, bool)
    begins_word[list(continuation_ids)] = False
    ends_sentence = np.zeros(size, bool)
    ends_sentence[list(sentence_end_ids)] = True
    return noise.NoiseVocabulary(MASK, np.arange(3, MASK), begins_word, np.zeros(size, bool), ends_sentence)


def document(num_tokens: int, first: int = 10) -> np.ndarray:
    """`<s> t t+1 ... </s>` with distinct inner tokens."""
    return np.concatenate([[BOS], np.arange(first, first + num_tokens), [EOS]])


def is_subsequence(part: np.ndarray, whole: np.ndarray) -> bool:
    iterator = iter(whole.tolist())
    return all(token in iterator for token in part.tolist())


def test_span_lengths_sum_to_the_budget_and_follow_poisson():
    rng = np.random.default_rng(0)
    drawn = []
    for _ in range(400):
        lengths = noise.span_lengths(60, 3.0, rng)
        assert lengths.sum() == 60, f"span lengths sum to {lengths.sum()}, not the budget 60"
        assert (lengths >= 0).all()
        drawn.extend(lengths[:-1].tolist())  # the last one is trimmed to fit
    drawn = np.array(drawn)
    for k in range(9):
        expected = math.exp(-3.0) * 3.0**k / math.factorial(k)
        observed = np.mean(drawn == k)
        assert abs(observed - expected) < 0.015, f"P(length={k}) is {observed:.3f}, Poisson(3) gives {expected:.3f}"


def test_infilling_masks_about_the_mask_ratio_of_words_and_keeps_the_rest_in_order():
    vocabulary = synthetic_vocabulary()
    tokens = document(200)
    covered_fractions = []
    for seed in range(100):
        noisy = noise.infill_text(tokens, vocabulary, 0.3, 3.0, 0.0, np.random.default_rng(seed))
        assert noisy[0] == BOS and noisy[-1] == EOS, "infilling changed <s> or </s>"
        kept = noisy[noisy != MASK]
        assert is_subsequence(kept, tokens), "unmasked tokens are not the original tokens in order"
        covered = len(tokens) - len(kept)
        assert covered <= math.ceil(0.3 * 200), f"{covered} words masked, more than the budget of 60"
        masks = int(np.sum(noisy == MASK))
        assert 1 <= masks <= math.ceil(0.3 * 200), f"{masks} masks for at most 60 spans"
        covered_fractions.append(covered / 200)
    # Spans that overlap cover fewer words than their lengths add up to, but most do not.
    assert 0.25 <= np.mean(covered_fractions) <= 0.3, f"mean masked fraction {np.mean(covered_fractions):.3f}"


def test_each_span_becomes_one_mask():
    vocabulary = synthetic_vocabulary()
    tokens = document(100)
    for seed in range(50):
        noisy = noise.infill_text(tokens, vocabulary, 0.3, 3.0, 0.0, np.random.default_rng(seed))
        kept_positions = np.flatnonzero(np.isin(tokens, noisy))
        removed_runs = np.sum(np.diff(kept_positions) > 1)
        masks = int(np.sum(noisy == MASK))
        # A removed run is one or more merged spans, each run gets one mask; zero-length spans add masks.
        assert masks >= removed_runs, f"{removed_runs} masked runs but only {masks} masks"


def test_infilling_masks_whole_words_only():
    continuation_ids = list(range(11, 400, 2))  # every other token continues the previous word
    vocabulary = synthetic_vocabulary(continuation_ids=continuation_ids)
    tokens = document(300)
    is_start = noise.word_starts(tokens, vocabulary)
    for seed in range(30):
        noisy = noise.infill_text(tokens, vocabulary, 0.3, 3.0, 0.0, np.random.default_rng(seed))
        removed = ~np.isin(tokens, noisy)
        run_starts = np.flatnonzero(removed & ~np.roll(removed, 1))
        run_ends = np.flatnonzero(removed & ~np.roll(removed, -1)) + 1
        # A run of replaced tokens (the mask takes the first one's place) starts where a word
        # begins and ends where a word (or </s>) begins.
        assert is_start[run_starts].all(), "a masked span did not start at a word start"
        ends_ok = is_start[run_ends] | (run_ends == len(tokens) - 1)
        assert ends_ok.all(), "a masked span ended inside a word"


def test_zero_mask_ratio_and_random_replacements():
    vocabulary = synthetic_vocabulary()
    tokens = document(50)
    unchanged = noise.infill_text(tokens, vocabulary, 0.0, 3.0, 0.1, np.random.default_rng(0))
    np.testing.assert_array_equal(unchanged, tokens)
    noisy = noise.infill_text(tokens, vocabulary, 1.0, 3.0, 1.0, np.random.default_rng(0))
    assert MASK not in noisy, "random_ratio=1 must replace every mask by a random token"


def test_sentence_permutation_keeps_every_sentence():
    full_stop = 5
    vocabulary = synthetic_vocabulary(sentence_end_ids=[full_stop])
    sentences = [np.array([10 + 10 * i, 11 + 10 * i, full_stop]) for i in range(6)]
    tokens = np.concatenate([[BOS], *sentences, [EOS]])
    orders = set()
    for seed in range(20):
        permuted = noise.permute_sentences(tokens, vocabulary, 1.0, np.random.default_rng(seed))
        assert permuted[0] == BOS and permuted[-1] == EOS
        found = [tuple(part) for part in np.split(permuted[1:-1], len(sentences))]
        assert sorted(found) == sorted(tuple(s) for s in sentences), "sentences were not kept whole"
        orders.add(tuple(found))
    assert len(orders) > 10, "sentence order barely changes with permute_sentence_ratio=1"
    same = noise.permute_sentences(tokens, vocabulary, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(same, tokens)


def test_rotation_insertion_and_deletion():
    vocabulary = synthetic_vocabulary()
    tokens = document(20)
    rng = np.random.default_rng(0)
    rotated = noise.rotate_document(tokens, rng)
    inner = tokens[1:-1].tolist()
    assert rotated[0] == BOS and rotated[-1] == EOS
    assert any(rotated[1:-1].tolist() == inner[k:] + inner[:k] for k in range(len(inner))), "not a rotation"

    inserted = noise.insert_masks(tokens, 5, 0.0, vocabulary, rng)
    assert len(inserted) == len(tokens) + 5 and np.sum(inserted == MASK) == 5
    assert inserted[0] == BOS and inserted[-1] == EOS
    np.testing.assert_array_equal(inserted[inserted != MASK], tokens)

    deleted = noise.delete_tokens(tokens, 0.25, rng)
    assert len(deleted) == len(tokens) - math.ceil(20 * 0.25)
    assert deleted[0] == BOS and deleted[-1] == EOS and is_subsequence(deleted, tokens)


def test_noise_is_a_function_of_seed_epoch_and_index():
    vocabulary = synthetic_vocabulary(sentence_end_ids=[5])
    tokens = np.concatenate([[BOS], np.tile([10, 11, 12, 5], 10), [EOS]])
    config = noise.NoiseConfig(rotate_ratio=0.5, insert_ratio=0.1, deletion_ratio=0.1)
    first = noise.add_noise(tokens, config, vocabulary, noise.example_rng(1, 2, 3))
    again = noise.add_noise(tokens, config, vocabulary, noise.example_rng(1, 2, 3))
    other = noise.add_noise(tokens, config, vocabulary, noise.example_rng(1, 3, 3))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other), "another epoch should draw other noise"


def test_noise_config_rejects_bad_values():
    with pytest.raises(ValueError, match="mask_ratio"):
        noise.NoiseConfig(mask_ratio=1.5)
    with pytest.raises(ValueError, match="poisson_lambda"):
        noise.NoiseConfig(poisson_lambda=0.0)


def test_vocabulary_tables_of_the_bart_tokenizer(bart_tokenizer):
    tokenizer = bart_tokenizer
    vocabulary = noise.NoiseVocabulary.from_vocab(tokenizer.backend_tokenizer.get_vocab())
    ids = np.array(tokenizer("Hello world. The end\nNew line")["input_ids"])
    tokens = tokenizer.convert_ids_to_tokens(ids)
    starts = noise.word_starts(ids, vocabulary)
    expected = [False] + [i == 1 or token.startswith(("Ġ", "Ċ")) or tokens[i - 1].endswith("Ċ")
                          for i, token in enumerate(tokens[1:-1], start=1)] + [False]
    assert starts.tolist() == expected, f"word starts of {tokens}"
    assert vocabulary.ends_sentence[tokenizer.convert_tokens_to_ids(".")]
    assert vocabulary.mask_id == tokenizer.mask_token_id
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id]
    assert not np.isin(special, vocabulary.random_ids).any(), "random replacements must not be special tokens"
