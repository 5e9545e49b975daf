"""BART's denoising noise (Lewis et al., 2019, section 2.2), applied to one tokenised document.

The transformations follow fairseq's `DenoisingDataset`, the code BART was pre-trained with:

* sentence permutation: the sentences of the document are shuffled;
* text infilling: spans of words with Poisson(λ) lengths are each replaced by one `<mask>`
  (a span of length 0 inserts a `<mask>`), until `mask_ratio` of the words are covered;
* token deletion: random tokens are removed (the model must find where input is missing);
* mask insertion: extra `<mask>` tokens are inserted at random positions;
* document rotation: the document is rotated to start at a random token.

A document is a 1-D int array `<s> tokens </s>`; the first and last tokens are never changed.
Everything runs in numpy on the host with an explicit `np.random.Generator`, so the noise of
an example is reproducible from (seed, epoch, example index) and training can resume exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

# Byte-level BPE writes a space as "Ġ", a newline as "Ċ", a tab as "ĉ", a carriage return as "č".
SPACE_CHARACTERS = "ĠĊĉč"
SENTENCE_END_TOKENS = (".", "!", "?", "Ċ", "ĊĊ")


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """Noise parameters; the defaults are those BART was pre-trained with (paper and fairseq recipe)."""

    # Fraction of the document's words covered by masked spans (paper: 30%).
    mask_ratio: float = 0.3
    # Fraction of masks (spans and insertions) that are a random token instead of `<mask>` (fairseq: 10%).
    random_ratio: float = 0.1
    # Mean of the Poisson distribution of span lengths, in words (paper: λ = 3).
    poisson_lambda: float = 3.0
    # Fraction of the sentences that are shuffled among themselves (paper: all of them).
    permute_sentence_ratio: float = 1.0
    # Fraction of the tokens deleted outright (paper's "token deletion"; off in the final recipe).
    deletion_ratio: float = 0.0
    # Number of extra `<mask>` tokens inserted, as a fraction of the tokens (off in the final recipe).
    insert_ratio: float = 0.0
    # Probability of rotating the document (off in the final recipe).
    rotate_ratio: float = 0.0

    def __post_init__(self):
        for name in ("mask_ratio", "random_ratio", "permute_sentence_ratio", "deletion_ratio", "rotate_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.insert_ratio < 0.0:
            raise ValueError(f"insert_ratio must be >= 0, got {self.insert_ratio}")
        if self.poisson_lambda <= 0.0:
            raise ValueError(f"poisson_lambda must be > 0, got {self.poisson_lambda}")


@dataclasses.dataclass(frozen=True)
class NoiseVocabulary:
    """What the noise needs to know about the vocabulary, as lookup tables over token ids."""

    mask_id: int
    # [ids] the ordinary (non-special) token ids, from which random replacements are drawn.
    random_ids: np.ndarray
    # [vocab] bool: the token starts with a space, i.e. begins a word.
    begins_word: np.ndarray
    # [vocab] bool: the token ends with whitespace, so the next token begins a word.
    ends_with_space: np.ndarray
    # [vocab] bool: the token ends a sentence.
    ends_sentence: np.ndarray

    @classmethod
    def from_vocab(cls, vocab: Mapping[str, int], mask_token: str = "<mask>",
                   special_tokens: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")) -> "NoiseVocabulary":
        """Tables for a byte-level BPE vocabulary {token: id} (e.g. `backend_tokenizer.get_vocab()`)."""
        size = max(vocab.values()) + 1
        begins_word = np.zeros(size, bool)
        ends_with_space = np.zeros(size, bool)
        ends_sentence = np.zeros(size, bool)
        for token, index in vocab.items():
            if token in special_tokens:
                continue
            begins_word[index] = token[0] in SPACE_CHARACTERS
            ends_with_space[index] = token[-1] in SPACE_CHARACTERS
            ends_sentence[index] = token in SENTENCE_END_TOKENS
        if mask_token not in vocab:
            raise ValueError(f"the vocabulary has no {mask_token} token, which text infilling needs")
        random_ids = np.array(sorted(index for token, index in vocab.items() if token not in special_tokens))
        return cls(vocab[mask_token], random_ids, begins_word, ends_with_space, ends_sentence)


def word_starts(tokens: np.ndarray, vocab: NoiseVocabulary) -> np.ndarray:
    """[length] bool: positions where a word begins. `<s>`/`</s>` are not words; the first token is."""
    starts = vocab.begins_word[tokens].copy()
    starts[1:] |= vocab.ends_with_space[tokens[:-1]]
    starts[min(1, len(tokens) - 1)] = True
    starts[0] = starts[-1] = False
    return starts


def permute_sentences(tokens: np.ndarray, vocab: NoiseVocabulary, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Shuffles ceil(ratio * sentences) of the sentences among themselves.

    A sentence ends after a run of sentence-ending tokens ("." then a newline ends one sentence);
    the text before `</s>` always ends one. tokens: [length] -> [length], same multiset.
    """
    body = tokens[1:-1]
    if len(body) == 0:
        return tokens
    is_end = vocab.ends_sentence[body]
    run_ends = is_end & ~np.append(is_end[1:], False)
    boundaries = np.flatnonzero(run_ends[:-1]) + 1  # split points inside the body
    sentences = np.split(body, boundaries)
    count = len(sentences)
    num_to_permute = math.ceil(count * ratio)
    chosen = rng.permutation(count)[:num_to_permute]
    order = np.arange(count)
    order[chosen] = chosen[rng.permutation(num_to_permute)]
    return np.concatenate([tokens[:1], *[sentences[i] for i in order], tokens[-1:]])


def span_lengths(num_words: int, poisson_lambda: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson(λ) span lengths whose sum is exactly `num_words`, the last one trimmed to fit.

    Returns [spans] int (zeros included: a zero-length span inserts a mask).
    """
    lengths = rng.poisson(poisson_lambda, size=num_words)
    while lengths.sum() < num_words:
        lengths = np.concatenate([lengths, rng.poisson(poisson_lambda, size=num_words)])
    total = np.cumsum(lengths)
    last = int(np.searchsorted(total, num_words))  # first span that reaches the budget
    lengths = lengths[: last + 1].copy()
    lengths[last] = num_words - (total[last - 1] if last > 0 else 0)
    return lengths


def random_tokens(count: int, vocab: NoiseVocabulary, rng: np.random.Generator) -> np.ndarray:
    """[count] ordinary tokens drawn uniformly."""
    return vocab.random_ids[rng.integers(0, len(vocab.random_ids), size=count)]


def _mask_or_random(count: int, random_ratio: float, vocab: NoiseVocabulary, rng: np.random.Generator) -> np.ndarray:
    """[count] replacement tokens: `<mask>`, or with probability random_ratio a random token."""
    replacement = np.full(count, vocab.mask_id, dtype=np.int64)
    is_random = rng.random(count) < random_ratio
    replacement[is_random] = random_tokens(int(is_random.sum()), vocab, rng)
    return replacement


def infill_text(tokens: np.ndarray, vocab: NoiseVocabulary, mask_ratio: float, poisson_lambda: float,
                random_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Text infilling: spans covering ceil(mask_ratio * words) words each become one mask.

    Spans start at random distinct word starts and extend over whole words (never past `</s>`);
    overlapping spans merge into one mask. Zero-length spans become inserted masks.
    tokens: [length] -> [new_length].
    """
    starts = np.flatnonzero(word_starts(tokens, vocab))
    num_to_mask = math.ceil(len(starts) * mask_ratio)
    if num_to_mask == 0:
        return tokens
    lengths = span_lengths(num_to_mask, poisson_lambda, rng)
    num_inserts = int(np.sum(lengths == 0))
    lengths = lengths[lengths > 0]
    # A span of k words starting at word w ends where word w + k starts (or at `</s>`).
    word_index = rng.permutation(len(starts))[: len(lengths)]
    boundaries = np.append(starts, len(tokens) - 1)
    span_start = starts[word_index]
    span_end = boundaries[np.minimum(word_index + lengths, len(starts))]
    # Each span keeps its first token (as the mask) and drops the rest; a start inside another span is dropped.
    inside = np.zeros(len(tokens) + 1, np.int64)
    np.add.at(inside, span_start + 1, 1)
    np.add.at(inside, span_end, -1)
    keep = np.cumsum(inside)[:-1] == 0
    noisy = tokens.copy()
    noisy[span_start] = _mask_or_random(len(span_start), random_ratio, vocab, rng)
    noisy = noisy[keep]
    return insert_masks(noisy, num_inserts, random_ratio, vocab, rng)


def insert_masks(tokens: np.ndarray, count: int, random_ratio: float, vocab: NoiseVocabulary,
                 rng: np.random.Generator) -> np.ndarray:
    """Inserts `count` masks (ceil(random_ratio * count) of them random tokens) at random inner positions.

    tokens: [length] -> [length + count].
    """
    if count == 0:
        return tokens
    length = len(tokens) + count
    positions = rng.permutation(length - 2)[:count] + 1
    is_new = np.zeros(length, bool)
    is_new[positions] = True
    result = np.empty(length, np.int64)
    result[~is_new] = tokens
    num_random = math.ceil(count * random_ratio)
    result[positions[num_random:]] = vocab.mask_id
    result[positions[:num_random]] = random_tokens(num_random, vocab, rng)
    return result


def delete_tokens(tokens: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Deletes ceil(ratio * inner tokens) random tokens other than `<s>` and `</s>`."""
    inner = len(tokens) - 2
    count = math.ceil(inner * ratio)
    if count == 0:
        return tokens
    keep = np.ones(len(tokens), bool)
    keep[rng.permutation(inner)[:count] + 1] = False
    return tokens[keep]


def rotate_document(tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotates the inner tokens to start at a random one: `<s> b c a </s>` from `<s> a b c </s>`."""
    offset = int(rng.integers(1, max(1, len(tokens) - 1), endpoint=True))
    return np.concatenate([tokens[:1], tokens[offset:-1], tokens[1:offset], tokens[-1:]])


def add_noise(tokens: np.ndarray, config: NoiseConfig, vocab: NoiseVocabulary, rng: np.random.Generator) -> np.ndarray:
    """The noisy encoder input for one document `<s> ... </s>` (the decoder target is `tokens`).

    Order as in fairseq: permute sentences, (delete tokens), infill spans, insert masks, rotate.
    tokens: [length] int -> [new_length] int64, still `<s> ... </s>`.
    """
    tokens = np.asarray(tokens, np.int64)
    if len(tokens) < 2:
        raise ValueError(f"a document needs at least <s> and </s>, got {len(tokens)} tokens")
    if config.permute_sentence_ratio > 0.0:
        tokens = permute_sentences(tokens, vocab, config.permute_sentence_ratio, rng)
    if config.deletion_ratio > 0.0:
        tokens = delete_tokens(tokens, config.deletion_ratio, rng)
    if config.mask_ratio > 0.0:
        tokens = infill_text(tokens, vocab, config.mask_ratio, config.poisson_lambda, config.random_ratio, rng)
    if config.insert_ratio > 0.0:
        tokens = insert_masks(tokens, math.ceil(len(tokens) * config.insert_ratio), config.random_ratio, vocab, rng)
    if config.rotate_ratio > 0.0 and rng.random() < config.rotate_ratio:
        tokens = rotate_document(tokens, rng)
    return tokens


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one example's noise: a function of (seed, epoch, index) only."""
    return np.random.default_rng((seed, epoch, index))
