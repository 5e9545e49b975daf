"""Task pipelines over a loaded model (`bart_jax.load_pretrained`): mask filling, zero-shot
classification with an MNLI head, and extractive question answering.

Each follows what the matching transformers pipeline computes; summarization lives in
bart_jax/apps/summarize.py.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from bart_jax.model.registry import head_spec, heads_where

DEFAULT_HYPOTHESIS_TEMPLATE = "This example is {}."
# transformers' QA convention: logits of tokens outside the context are pushed to this value.
OUTSIDE_CONTEXT_LOGIT = -10000.0


def _require(model, task: str) -> None:
    """Raises ValueError unless the model's head serves the pipeline `task` and it has a tokenizer."""
    if task not in head_spec(model.head).pipelines:
        raise ValueError(f"{task} needs a {' or '.join(heads_where('pipelines', task))} model, got {model.head}")
    if model.tokenizer is None:
        raise ValueError(f"{task} needs a tokenizer; the model directory has no tokenizer files")


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=-1, keepdims=True)


def fill_mask(model, text: str, top_k: int = 5) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
    """The `top_k` most likely tokens for each `<mask>` in `text`, as transformers' fill-mask pipeline.

    Returns, for a single mask, a list of {"score", "token", "token_str", "sequence"}; for
    several masks, one such list per mask.
    """
    # transformers' top-k would fail on these; a slice would return the whole vocabulary or nothing.
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    _require(model, "fill_mask")
    tokenizer = model.tokenizer
    input_ids = tokenizer(text, return_tensors="np")["input_ids"]
    masked = np.nonzero(input_ids[0] == tokenizer.mask_token_id)[0]
    if masked.size == 0:
        raise ValueError(f"no {tokenizer.convert_ids_to_tokens(tokenizer.mask_token_id)} token in the text")
    logits = np.asarray(model(input_ids=input_ids).logits, dtype=np.float32)[0]
    probabilities = _softmax(logits[masked])  # [masks, vocab]
    single_mask = masked.size == 1
    results = []
    for mask_row, position in enumerate(masked):
        # A stable sort keeps the lowest id first among equal scores, as torch.topk does on CPU.
        best = np.argsort(-probabilities[mask_row], kind="stable")[:top_k]
        row = []
        for token in best.tolist():
            filled = input_ids[0].copy()
            filled[position] = token
            filled = filled[filled != tokenizer.pad_token_id]
            row.append({
                "score": float(probabilities[mask_row, token]),
                "token": token,
                "token_str": tokenizer.decode([token]),
                "sequence": tokenizer.decode(filled, skip_special_tokens=single_mask),
            })
        results.append(row)
    return results[0] if single_mask else results


def _entailment_id(config) -> int:
    for label, index in config.label2id.items():
        if label.lower().startswith("entail"):
            return index
    raise ValueError(f"the model's labels {list(config.label2id)} have no 'entailment' label for zero-shot use")


def zero_shot_classify(
    model,
    text: str,
    candidate_labels: Sequence[str] | str,
    hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE,
    multi_label: bool = False,
) -> dict[str, Any]:
    """Scores `candidate_labels` for `text` with an NLI head (bart-large-mnli style), as
    transformers' zero-shot-classification pipeline.

    Each label becomes the hypothesis `hypothesis_template.format(label)`. Without multi_label
    the entailment logits are soft-maxed across labels; with it (or a single label) each label's
    entailment-vs-contradiction pair is. Returns {"sequence", "labels", "scores"}, best first.
    """
    _require(model, "zero_shot_classify")
    if isinstance(candidate_labels, str):
        candidate_labels = [label.strip() for label in candidate_labels.split(",") if label.strip()]
    if not candidate_labels:
        raise ValueError("give at least one candidate label")
    if "{}" not in hypothesis_template:
        raise ValueError(f"hypothesis_template {hypothesis_template!r} must contain {{}} for the label")
    hypotheses = [hypothesis_template.format(label) for label in candidate_labels]
    # A tokenizer without a model_max_length would not truncate: the model's positions bound the pair.
    limit = min(model.tokenizer.model_max_length, model.config.max_position_embeddings)
    encoded = model.tokenizer([text] * len(hypotheses), hypotheses, padding=True, truncation="only_first",
                              max_length=limit, return_tensors="np")
    logits = np.asarray(model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits,
                        dtype=np.float32)  # [labels, classes]
    entailment = _entailment_id(model.config)
    if multi_label or len(candidate_labels) == 1:
        contradiction = -1 if entailment == 0 else 0
        scores = _softmax(logits[:, [contradiction, entailment]])[:, 1]
    else:
        scores = _softmax(logits[:, entailment])
    order = list(reversed(scores.argsort()))
    return {
        "sequence": text,
        "labels": [candidate_labels[i] for i in order],
        "scores": [float(scores[i]) for i in order],
    }


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, in_context: np.ndarray,
              max_answer_length: int) -> tuple[int, int, float]:
    """The (start, end, probability) token span maximising p(start) * p(end), end >= start,
    at most `max_answer_length` tokens, both ends inside the context.

    start_logits, end_logits, in_context: [length].
    """
    start = _softmax(np.where(in_context, start_logits, OUTSIDE_CONTEXT_LOGIT))
    end = _softmax(np.where(in_context, end_logits, OUTSIDE_CONTEXT_LOGIT))
    scores = np.triu(np.tril(np.outer(start, end), max_answer_length - 1))
    scores = np.where(np.outer(in_context, in_context), scores, 0.0)
    best = int(np.argmax(scores))
    start_index, end_index = np.unravel_index(best, scores.shape)
    return int(start_index), int(end_index), float(scores[start_index, end_index])


def answer_question(model, question: str, context: str, max_answer_length: int = 15) -> dict[str, Any]:
    """Extracts the answer span of `question` from `context` with a question-answering head.

    The pair is encoded `<s> question </s></s> context </s>` (the context truncated to fit);
    returns {"answer", "start", "end", "score"} with character offsets into `context`.
    """
    _require(model, "answer_question")
    if not context.strip():
        raise ValueError("the context is empty")
    backend = model.tokenizer.backend_tokenizer
    backend.no_padding()
    backend.enable_truncation(min(model.tokenizer.model_max_length, model.config.max_position_embeddings),
                              strategy="only_second")
    try:
        encoding = backend.encode(question, context)
    finally:
        backend.no_truncation()
    input_ids = np.array([encoding.ids])
    output = model(input_ids=input_ids)
    in_context = np.array([sequence == 1 for sequence in encoding.sequence_ids])
    start, end, score = best_span(np.asarray(output.start_logits, np.float32)[0],
                                  np.asarray(output.end_logits, np.float32)[0], in_context, max_answer_length)
    char_start, char_end = encoding.offsets[start][0], encoding.offsets[end][1]
    return {"answer": context[char_start:char_end], "start": char_start, "end": char_end, "score": score}
