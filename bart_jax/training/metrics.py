"""Evaluation metrics: ROUGE, accuracy/F1, SQuAD exact match/F1 (the log they go to is
bart_jax.training.reporting).

Every metric is a percentage-free float in [0, 1] except losses and lengths.
"""

from __future__ import annotations

import collections
import functools
import re
import string
from typing import Sequence

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Abbreviations (without their final period) that end no sentence, for the sentence splitter that
# ROUGE-Lsum uses here and in bart_jax.apps.scores.
ABBREVIATIONS = (
    "mr mrs ms dr prof sr jr st mt gen col lt sgt capt cmdr adm gov sen rep rev hon pres supt insp det "
    "inc ltd co corp bros plc llc dept univ assn ave blvd rd no nos vol vols fig figs approx est vs etc "
    "e.g i.e u.s u.k u.n u.s.a a.m p.m jan feb mar apr jun jul aug sep sept oct nov dec"
).split()


# --- generation -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _sentence_tokenizer():
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    parameters = PunktParameters()
    parameters.abbrev_types = set(ABBREVIATIONS)
    return PunktSentenceTokenizer(parameters)


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`: its lines, each split with nltk's Punkt algorithm given
    ABBREVIATIONS and nothing learned (no data files to download)."""
    tokenizer = _sentence_tokenizer()
    return [sentence for line in text.splitlines() for sentence in tokenizer.tokenize(line.strip()) if sentence]


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures (Porter stemming), as the transformers summarization examples:
    each text is stripped and put one sentence a line (split_sentences), which only rougeLsum sees."""
    try:
        from rouge_score import rouge_scorer, scoring
    except ImportError:
        raise ValueError("ROUGE needs the rouge-score package (pip install rouge-score)") from None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    aggregator = scoring.BootstrapAggregator()
    for prediction, reference in zip(predictions, references):
        aggregator.add_scores(scorer.score("\n".join(split_sentences(reference)),
                                           "\n".join(split_sentences(prediction))))
    result = aggregator.aggregate()
    return {name: float(result[name].mid.fmeasure) for name in ROUGE_TYPES}


# --- classification ---------------------------------------------------------------------------
def classification_metrics(logits: np.ndarray, labels: np.ndarray, problem_type: str) -> dict[str, float]:
    """Single-label: accuracy and macro F1 (binary: F1 of label 1); multi-label: exact-match
    accuracy and micro F1 (logit > 0); regression: MSE and Pearson correlation.

    logits: [n, num_labels]; labels: [n] ids, [n, num_labels] multi-hot, or regression targets.
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    if problem_type == "regression":
        predictions = logits.reshape(labels.shape)
        metrics = {"mse": float(np.mean((predictions - labels) ** 2))}
        if labels.ndim == 1 and len(labels) > 1 and np.std(labels) > 0 and np.std(predictions) > 0:
            metrics["pearson"] = float(np.corrcoef(predictions, labels)[0, 1])
        return metrics
    if problem_type == "multi_label_classification":
        predicted = logits > 0
        truth = labels > 0.5
        return {"accuracy": float(np.mean(np.all(predicted == truth, axis=1))),
                "f1": _f1(np.sum(predicted & truth), np.sum(predicted & ~truth), np.sum(~predicted & truth))}
    predicted = np.argmax(logits, axis=-1)
    num_labels = logits.shape[-1]
    per_label = [_f1(np.sum((predicted == k) & (labels == k)), np.sum((predicted == k) & (labels != k)),
                     np.sum((predicted != k) & (labels == k))) for k in range(num_labels)]
    f1 = per_label[1] if num_labels == 2 else float(np.mean(per_label))
    return {"accuracy": float(np.mean(predicted == labels)), "f1": f1}


def _f1(true_positives, false_positives, false_negatives) -> float:
    denominator = 2 * true_positives + false_positives + false_negatives
    return float(2 * true_positives / denominator) if denominator else 0.0


# --- question answering -----------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, reference: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and token F1, each the best over an example's gold answers (none: the answer is "")."""
    exact, f1 = [], []
    for prediction, answers in zip(predictions, references):
        answers = list(answers) or [""]
        exact.append(max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers))
        f1.append(max(_token_f1(prediction, a) for a in answers))
    return {"exact_match": float(np.mean(exact)), "f1": float(np.mean(f1))}
