"""Evaluation metrics (ROUGE, accuracy/F1, SQuAD exact match/F1) and the metrics log.

Every metric is a percentage-free float in [0, 1] except losses and lengths.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import string
from typing import Any, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# --- generation -------------------------------------------------------------------------------
def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures (Porter stemming), as the transformers summarization examples.

    rougeLsum treats each line as a sentence; texts are compared as given.
    """
    try:
        from rouge_score import rouge_scorer, scoring
    except ImportError:
        raise ValueError("ROUGE needs the rouge-score package (pip install rouge-score)") from None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    aggregator = scoring.BootstrapAggregator()
    for prediction, reference in zip(predictions, references):
        aggregator.add_scores(scorer.score(reference, prediction))
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


# --- the log ----------------------------------------------------------------------------------
METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON object per logged step to `<output_dir>/metrics.jsonl`, and mirrors the
    numbers to TensorBoard when asked and a TensorBoard writer is installed."""

    def __init__(self, output_dir: str, tensorboard: bool = False):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._writer = _tensorboard_writer(os.path.join(output_dir, "tensorboard")) if tensorboard else None

    def truncate_after(self, step: int) -> None:
        """Drops entries logged after `step`: a resumed run redoes those steps and logs them again."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            entries = [line for line in f if _logged_step(line) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(entries)

    def write(self, step: int, values: dict[str, Any]) -> None:
        entry = {"step": int(step), **{key: _plain(value) for key, value in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self._writer is not None:
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _logged_step(line: str) -> float:
    """The step of a log line; infinity for a blank or partial line (a crash while writing it)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "item"):
        return np.asarray(value).item()
    return value


def _tensorboard_writer(directory: str) -> Optional[Any]:
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            writer_class = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
            return writer_class(directory)
        except ImportError:
            continue
    logger.warning("report_to=tensorboard, but neither tensorboardX nor tensorboard is installed: not writing it")
    return None
