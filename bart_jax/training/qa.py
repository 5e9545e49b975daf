"""Extractive question answering (SQuAD-style): token start/end labels from character offsets,
and answer texts from predicted start/end logits.

An example is `<s> question </s></s> context </s>` (longest-first truncation: the context is cut
when the pair is too long). The answer's character span is mapped to the context tokens that
cover it, using the offsets of the `tokenizers` encoding. An example without an answer, or whose
answer was cut off, points at position 0 (`<s>`), as transformers' question-answering scripts do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bart_jax.tokenizer import BartTokenizer
from bart_jax.training.data import Record, column_values, is_empty_text
from bart_jax.training.features import DataStats, TaskData, encode, own_backend, text_values

NO_ANSWER_POSITION = 0


@dataclasses.dataclass
class QAReference:
    """What answer extraction and scoring need for one example."""

    context: str
    offsets: np.ndarray  # [length, 2] character span of each token
    is_context: np.ndarray  # [length] bool: the token belongs to the context
    answers: list[str]  # the gold answer texts ([] for an unanswerable question)


def _answer_fields(value: Any, source: str, index: int) -> tuple[list[str], list[int]]:
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        raise ValueError(f"{source}: example {index}'s answers must be {{'text': [...], 'answer_start': [...]}}")
    texts, starts = value["text"], value["answer_start"]
    texts = [texts] if isinstance(texts, str) else list(texts)
    starts = [starts] if isinstance(starts, int) else list(starts)
    if len(texts) != len(starts):
        raise ValueError(f"{source}: example {index} has {len(texts)} answer texts but {len(starts)} answer starts")
    return [str(text) for text in texts], [int(start) for start in starts]


def token_span(offsets: np.ndarray, is_context: np.ndarray, start_char: int, end_char: int) -> tuple[int, int]:
    """(first, last) context token covering characters [start_char, end_char), or the no-answer
    position twice when the kept context does not hold the whole answer."""
    context_positions = np.flatnonzero(is_context)
    if len(context_positions) == 0:
        return NO_ANSWER_POSITION, NO_ANSWER_POSITION
    starts = offsets[context_positions, 0]
    ends = offsets[context_positions, 1]
    if start_char < starts[0] or end_char > ends[-1]:
        return NO_ANSWER_POSITION, NO_ANSWER_POSITION
    first = context_positions[np.searchsorted(starts, start_char, side="right") - 1]
    last = context_positions[np.searchsorted(ends, end_char, side="left")]
    return int(first), int(last)


def qa_data(records: list[Record], tokenizer: BartTokenizer, question_column: str, context_column: str,
            answer_column: str, max_length: int, source: str) -> TaskData:
    """input_ids and start/end positions (the first gold answer) for each example."""
    # Questions and contexts must be text: a number or a list would be trained on as its str().
    questions = text_values(records, question_column, source)
    contexts = text_values(records, context_column, source)
    answers = column_values(records, answer_column, source)
    keep = [i for i in range(len(records)) if not is_empty_text(questions[i]) and not is_empty_text(contexts[i])]
    # transformers' QA scripts strip the question's leading whitespace, which only wastes tokens.
    pairs = [(str(questions[i]).lstrip(), str(contexts[i])) for i in keep]
    encodings, truncated = encode(own_backend(tokenizer), pairs, max_length)
    input_ids, starts, ends, references = [], [], [], []
    for position, (i, encoding) in enumerate(zip(keep, encodings)):
        texts, answer_starts = _answer_fields(answers[i], source, i)
        offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
        is_context = np.array([sequence == 1 for sequence in encoding.sequence_ids])
        if texts and texts[0]:
            start, end = token_span(offsets, is_context, answer_starts[0], answer_starts[0] + len(texts[0]))
        else:
            start = end = NO_ANSWER_POSITION
        input_ids.append(np.asarray(encoding.ids, np.int32))
        starts.append(start)
        ends.append(end)
        references.append(QAReference(pairs[position][1], offsets, is_context, [t for t in texts if t]))
    stats = DataStats(len(records), len(records) - len(keep), int(truncated.sum()))
    return TaskData({"input_ids": input_ids, "start_positions": starts, "end_positions": ends},
                    {"input_ids": max_length}, stats, references=references)


def extract_answer(start_logits: np.ndarray, end_logits: np.ndarray, reference: QAReference,
                   max_answer_length: int, allow_no_answer: bool, null_score_threshold: float = 0.0) -> str:
    """The context text of the best span (start <= end < start + max_answer_length, inside the context).

    start_logits, end_logits: [padded_length]. With `allow_no_answer` (SQuAD 2.0), "" is returned
    when the score of position 0 beats the best span by more than `null_score_threshold`.
    """
    length = len(reference.offsets)
    start_logits = np.asarray(start_logits[:length], np.float64)
    end_logits = np.asarray(end_logits[:length], np.float64)
    first, last = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    valid = (reference.is_context[:, None] & reference.is_context[None, :]
             & (first <= last) & (last < first + max_answer_length))
    if not valid.any():
        return ""
    scores = np.where(valid, start_logits[:, None] + end_logits[None, :], -np.inf)
    best = np.unravel_index(np.argmax(scores), scores.shape)
    null_score = start_logits[NO_ANSWER_POSITION] + end_logits[NO_ANSWER_POSITION]
    if allow_no_answer and null_score > scores[best] + null_score_threshold:
        return ""
    start_char = reference.offsets[best[0], 0]
    end_char = reference.offsets[best[1], 1]
    return reference.context[start_char:end_char]


def extract_answers(start_logits: np.ndarray, end_logits: np.ndarray, references: list[QAReference],
                    max_answer_length: int, allow_no_answer: bool,
                    null_score_threshold: float = 0.0) -> list[str]:
    """Answers for a batch: start_logits, end_logits [n, padded_length]."""
    return [extract_answer(s, e, reference, max_answer_length, allow_no_answer, null_score_threshold)
            for s, e, reference in zip(start_logits, end_logits, references)]
