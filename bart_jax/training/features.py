"""Records -> token-id features for each task, with counts of what was dropped or truncated.

A `TaskData` holds per-example arrays of different lengths ("input_ids", "labels") or fixed
shape ("labels" of a classifier, QA positions); `bart_jax.training.batching` pads and stacks
them. Denoising data holds the clean documents as labels and makes the noisy inputs per
(epoch, example) when a batch is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer

from bart_jax.tokenizer import BartTokenizer
from bart_jax.training import noise
from bart_jax.training.data import Record, column_values, is_empty_text


@dataclasses.dataclass
class DataStats:
    """What became of the records of one file."""

    records: int
    empty: int = 0  # dropped: an empty text, target or label
    truncated: int = 0  # cut to the maximum length (denoising: documents split into several blocks)
    truncation: str = "truncated to the maximum length"

    def describe(self, name: str) -> str:
        return f"{name}: {self.records} records, {self.empty} dropped as empty, {self.truncated} {self.truncation}"


@dataclasses.dataclass
class TaskData:
    """Features of one split.

    columns: name -> per-example values (1-D int arrays of varying length, or scalars / fixed
    vectors). padded_lengths: the length each varying column is padded to in a batch.
    references: per-example data for metrics (target texts, QA contexts and answers).
    make_inputs: (epoch, index) -> input_ids, for data whose inputs change every epoch (noise).
    """

    columns: dict[str, list]
    padded_lengths: dict[str, int]
    stats: DataStats
    references: Optional[list] = None
    make_inputs: Optional[Callable[[int, int], np.ndarray]] = None

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))


def own_backend(tokenizer: BartTokenizer) -> Tokenizer:
    """A private copy of the tokenizers pipeline, so that truncation settings do not leak."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


def encode(backend: Tokenizer, texts: Sequence, max_length: int, strategy: str = "longest_first"):
    """Encodes texts (or (text, pair) tuples) truncated to max_length tokens, special tokens included.

    Returns (encodings, [n] bool: was truncated).
    """
    backend.enable_truncation(max_length, strategy=strategy)
    try:
        encodings = backend.encode_batch(list(texts))
    except Exception as error:  # the backend raises a bare Exception, e.g. when truncation is impossible
        raise ValueError(f"cannot tokenize the data: {error}") from None
    finally:
        backend.no_truncation()
    truncated = np.array([bool(encoding.overflowing) for encoding in encodings])
    return encodings, truncated


def _ids(encodings) -> list[np.ndarray]:
    return [np.asarray(encoding.ids, np.int32) for encoding in encodings]


def text_values(records: list[Record], column: str, source: str, first_index: int = 0) -> list[Any]:
    """The values of a text column (`column_values`), each a string or empty (None, blank).

    A number, list or mapping would otherwise be trained on as its `str()`, silently.
    """
    values = column_values(records, column, source, first_index)
    for index, value in enumerate(values, first_index):
        if not isinstance(value, str) and not is_empty_text(value):
            raise ValueError(f"{source}: example {index} has {type(value).__name__} {_shorten(value)} in text column "
                             f"{column!r}; expected a string")
    return values


def _shorten(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _keep_nonempty(*value_lists: list) -> np.ndarray:
    """Indices of the examples whose values are all non-empty."""
    empty = np.zeros(len(value_lists[0]), bool)
    for values in value_lists:
        empty |= np.array([is_empty_text(value) for value in values], bool)
    return np.flatnonzero(~empty)


def seq2seq_data(records: list[Record], tokenizer: BartTokenizer, text_column: str, summary_column: str,
                 max_source_length: int, max_target_length: int, source: str) -> TaskData:
    """input_ids `<s> text </s>` and labels `<s> summary </s>`, each truncated (keeping `</s>`)."""
    texts = text_values(records, text_column, source)
    targets = text_values(records, summary_column, source)
    keep = _keep_nonempty(texts, targets)
    texts = [str(texts[i]) for i in keep]
    targets = [str(targets[i]) for i in keep]
    backend = own_backend(tokenizer)
    inputs, inputs_truncated = encode(backend, texts, max_source_length)
    labels, labels_truncated = encode(backend, targets, max_target_length)
    stats = DataStats(len(records), len(records) - len(keep), int(np.sum(inputs_truncated | labels_truncated)))
    return TaskData({"input_ids": _ids(inputs), "labels": _ids(labels)},
                    {"input_ids": max_source_length, "labels": max_target_length}, stats, references=targets)


def document_blocks(ids: np.ndarray, max_length: int, bos_id: int, eos_id: int) -> list[np.ndarray]:
    """`<s> ... </s>` split into blocks `<s> part </s>` of at most max_length tokens."""
    inner = ids[1:-1]
    size = max_length - 2
    return [np.concatenate([[bos_id], inner[i:i + size], [eos_id]]).astype(np.int32)
            for i in range(0, max(len(inner), 1), size)]


def denoising_data(records: list[Record], tokenizer: BartTokenizer, text_column: str, max_length: int,
                   noise_config: noise.NoiseConfig, seed: int, source: str) -> TaskData:
    """Documents (split into blocks of max_length tokens) as labels; inputs are their noisy copies.

    The noise of example i in epoch e is drawn from `noise.example_rng(seed, e, i)`.
    """
    texts = text_values(records, text_column, source)
    keep = _keep_nonempty(texts)
    backend = own_backend(tokenizer)
    documents = backend.encode_batch([str(texts[i]) for i in keep])
    blocks = []
    split = 0
    for document in documents:
        parts = document_blocks(np.asarray(document.ids), max_length, tokenizer.bos_token_id, tokenizer.eos_token_id)
        blocks.extend(parts)
        split += len(parts) > 1
    vocabulary = noise.NoiseVocabulary.from_vocab(tokenizer.backend_tokenizer.get_vocab())

    def make_inputs(epoch: int, index: int) -> np.ndarray:
        noisy = noise.add_noise(blocks[index], noise_config, vocabulary, noise.example_rng(seed, epoch, index))
        if len(noisy) > max_length:  # mask insertion can lengthen a full block
            noisy = np.append(noisy[: max_length - 1], noisy[-1])
        return noisy

    stats = DataStats(len(records), len(records) - len(keep), split, "split into blocks of the maximum length")
    return TaskData({"labels": blocks}, {"input_ids": max_length, "labels": max_length}, stats,
                    make_inputs=make_inputs)


# --- classification ---------------------------------------------------------------------------
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


@dataclasses.dataclass(frozen=True)
class LabelScheme:
    """How label values in the data map to model outputs."""

    problem_type: str
    names: tuple[str, ...]  # label names by id (regression: one name)

    @property
    def num_labels(self) -> int:
        return len(self.names)


def _as_number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def infer_label_scheme(values: list, problem_type: Optional[str], num_labels: Optional[int],
                       model_names: Sequence[str] = ()) -> LabelScheme:
    """The label scheme of the training labels.

    Lists of labels mean multi-label; non-integer numbers (or num_labels=1) mean regression;
    integers are label ids; strings are label names, ordered as `model_names` when those contain
    them all (the label names of a fine-tuned checkpoint), else sorted.
    """
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {problem_type!r}")
    flat = [item for value in values for item in (value if isinstance(value, list) else [value])]
    numbers = [_as_number(item) for item in flat]
    all_numbers = all(number is not None for number in numbers)
    if problem_type is None:
        if any(isinstance(value, list) for value in values):
            problem_type = "multi_label_classification"
        elif num_labels == 1 or (all_numbers and any(number != int(number) for number in numbers)):
            problem_type = "regression"
        else:
            problem_type = "single_label_classification"
    if problem_type == "regression":
        if not all_numbers:
            raise ValueError("regression labels must be numbers")
        count = num_labels or 1
        return LabelScheme(problem_type, tuple(f"LABEL_{i}" for i in range(count)))
    if all_numbers:
        ids = [int(number) for number in numbers]
        if min(ids) < 0:
            raise ValueError(f"label ids must be >= 0, found {min(ids)}")
        # A given num_labels is the head's size: ids beyond it are refused (encode_labels), not a wider head.
        count = num_labels if num_labels is not None else max(ids) + 1
        return LabelScheme(problem_type, tuple(f"LABEL_{i}" for i in range(count)))
    found = sorted({str(item) for item in flat})
    names = tuple(model_names) if set(found) <= set(model_names) else tuple(found)
    if num_labels is not None and num_labels != len(names):
        raise ValueError(f"num_labels is {num_labels} but the training labels have {len(names)} names: {list(names)}")
    return LabelScheme(problem_type, names)


def encode_labels(values: list, scheme: LabelScheme, source: str,
                  examples: Optional[Sequence[int]] = None) -> np.ndarray:
    """[n] int32 ids, [n, num_labels] float32 multi-hot, or [n] / [n, num_labels] float32 targets.

    examples: the example number of each value, for errors (default 0 .. n - 1).
    """
    index = {name: i for i, name in enumerate(scheme.names)}
    examples = list(range(len(values))) if examples is None else list(examples)

    def label_id(item, example: int) -> int:
        number = _as_number(item)
        if number is not None and str(item) not in index:
            label = int(number)
            if not 0 <= label < scheme.num_labels:
                raise ValueError(f"{source}: example {example} has label {item!r}, outside the label ids "
                                 f"0..{scheme.num_labels - 1} (num_labels is {scheme.num_labels})")
            return label
        if str(item) not in index:
            raise ValueError(f"{source}: example {example} has unknown label {item!r}; the labels are "
                             f"{list(scheme.names)}")
        return index[str(item)]

    if scheme.problem_type == "regression":
        targets = np.array([[_as_number(item) for item in (v if isinstance(v, list) else [v])] for v in values],
                           np.float32)
        if targets.shape[1] != scheme.num_labels:
            raise ValueError(
                f"{source}: regression targets have {targets.shape[1]} values, expected {scheme.num_labels}")
        return targets[:, 0] if scheme.num_labels == 1 else targets
    if scheme.problem_type == "multi_label_classification":
        hot = np.zeros((len(values), scheme.num_labels), np.float32)
        for row, value in enumerate(values):
            for item in value if isinstance(value, list) else [value]:
                hot[row, label_id(item, examples[row])] = 1.0
        return hot
    return np.array([label_id(value, example) for value, example in zip(values, examples)], np.int32)


def classification_data(records: list[Record], tokenizer: BartTokenizer, text_column: str,
                        text_pair_column: Optional[str], label_column: str, max_length: int,
                        scheme: LabelScheme, source: str) -> TaskData:
    """input_ids `<s> a </s>` or `<s> a </s></s> b </s>` (longest-first truncation) and labels."""
    texts = text_values(records, text_column, source)
    pairs = text_values(records, text_pair_column, source) if text_pair_column else None
    labels = column_values(records, label_column, source)
    keep = _keep_nonempty(texts, labels, *([pairs] if pairs else []))
    inputs = [(str(texts[i]), str(pairs[i])) if pairs else str(texts[i]) for i in keep]
    encodings, truncated = encode(own_backend(tokenizer), inputs, max_length)
    label_array = encode_labels([labels[i] for i in keep], scheme, source, examples=keep.tolist())
    stats = DataStats(len(records), len(records) - len(keep), int(truncated.sum()))
    return TaskData({"input_ids": _ids(encodings), "labels": list(label_array)}, {"input_ids": max_length}, stats,
                    references=list(label_array))


# --- per-record featurizers of the streaming pipeline (training.pipeline) ------------------------
def _truncating_backend(tokenizer: BartTokenizer, max_length: Optional[int]) -> Tokenizer:
    """A private backend whose truncation is set once: encoding with it from several threads is safe."""
    backend = own_backend(tokenizer)
    if max_length is not None:
        backend.enable_truncation(max_length)
    return backend


def seq2seq_featurizer(tokenizer: BartTokenizer, text_column: str, summary_column: str, max_source_length: int,
                       max_target_length: int, source: str) -> Callable[[int, Record], Optional[dict]]:
    """(index, record) -> {"input_ids", "labels"} as `seq2seq_data` makes them, or None when either
    is empty."""
    sources, targets = (_truncating_backend(tokenizer, length) for length in (max_source_length, max_target_length))

    def featurize(index: int, record: Record) -> Optional[dict]:
        text = text_values([record], text_column, source, index)[0]
        target = text_values([record], summary_column, source, index)[0]
        if is_empty_text(text) or is_empty_text(target):
            return None
        return {"input_ids": np.asarray(sources.encode(text).ids, np.int32),
                "labels": np.asarray(targets.encode(target).ids, np.int32)}

    return featurize


def document_featurizer(tokenizer: BartTokenizer, text_column: str, source: str) -> Callable[[int, Record], Optional[np.ndarray]]:
    """(index, record) -> [tokens + 1] the document's token ids ending in `</s>` (a stream piece for
    packing), or None when it is empty."""
    backend = _truncating_backend(tokenizer, None)

    def featurize(index: int, record: Record) -> Optional[np.ndarray]:
        text = text_values([record], text_column, source, index)[0]
        if is_empty_text(text):
            return None
        ids = backend.encode(text).ids  # <s> text </s>
        return np.asarray(ids[1:], np.int32)

    return featurize
