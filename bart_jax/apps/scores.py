"""ROUGE scores of summaries against references, as the Hugging Face summarization examples
compute them, with bootstrap confidence intervals.

ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures (`rouge-score`, Porter stemming), each
averaged over documents with a 95% bootstrap confidence interval
(`rouge_score.scoring.BootstrapAggregator`, seeded: the same inputs give the same interval),
in percent. ROUGE-Lsum reads sentences from lines: every summary and reference is split into
sentences, one per line, first, as the Hugging Face summarization examples do. They split with
`nltk.sent_tokenize`, whose trained model is a data file to download (`punkt_tab`); here each
line is split by nltk's Punkt algorithm given a built-in list of common English abbreviations
and nothing learned, which installs from PyPI alone and gives the same scores on every machine.
Where the two splitters disagree (rare abbreviations, initials), ROUGE-Lsum can differ slightly
from the examples'; ROUGE-1, -2 and -L do not depend on sentences. The splitter is reported.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from bart_jax.training import metrics

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# The sentence splitter of ROUGE-Lsum, shared with training's evaluation (bart_jax.training.metrics):
# nltk's Punkt given a list of abbreviations, nothing learned.
SENTENCE_SPLITTER = "nltk-punkt-untrained-with-abbreviations"


def split_sentences(text: str) -> str:
    """`text` with one sentence per line (lines already there are kept apart)."""
    return "\n".join(metrics.split_sentences(text))


class RougeAccumulator:
    """Adds (summary, reference) pairs one at a time; `result()` gives the scores so far."""

    def __init__(self, confidence_interval: float = 0.95, bootstrap_samples: int = 1000, seed: int = 0):
        from rouge_score import rouge_scorer, scoring

        self._scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
        self._aggregator = scoring.BootstrapAggregator(confidence_interval, bootstrap_samples)
        self.confidence_interval = confidence_interval
        self.seed = seed
        self.count = 0

    def add(self, summary: str, reference: str) -> None:
        self._aggregator.add_scores(self._scorer.score(split_sentences(reference), split_sentences(summary)))
        self.count += 1

    def result(self) -> dict:
        """{"rouge1": {"low", "mid", "high"}, ..., "documents", "confidence_interval",
        "sentence_splitter"}: F-measures in percent; "mid" is the median of the bootstrap means
        (what the Hugging Face examples report), close to the mean over documents."""
        metrics: dict = {"documents": self.count, "confidence_interval": self.confidence_interval,
                         "sentence_splitter": SENTENCE_SPLITTER}
        if not self.count:
            return metrics
        state = np.random.get_state()
        np.random.seed(self.seed)  # BootstrapAggregator draws from numpy's global generator
        try:
            aggregated = self._aggregator.aggregate()
        finally:
            np.random.set_state(state)
        for name in ROUGE_TYPES:
            score = aggregated[name]
            metrics[name] = {bound: round(100 * getattr(score, bound).fmeasure, 4) for bound in ("low", "mid", "high")}
        return metrics


def rouge(summaries: Sequence[str], references: Sequence[str], confidence_interval: float = 0.95,
          bootstrap_samples: int = 1000, seed: int = 0) -> dict:
    """ROUGE-1/2/L/Lsum of `summaries` against `references` (see `RougeAccumulator.result`)."""
    if len(summaries) != len(references):
        raise ValueError(f"{len(summaries)} summaries for {len(references)} references")
    accumulator = RougeAccumulator(confidence_interval, bootstrap_samples, seed)
    for summary, reference in zip(summaries, references):
        accumulator.add(summary, reference)
    return accumulator.result()


def evaluate(model, texts: Iterable[str], references: Iterable[str], batch_size: int = 8,
             max_source_length: Optional[int] = None, seed: int = 0, confidence_interval: float = 0.95,
             bootstrap_samples: int = 1000, **options) -> dict:
    """Summarizes `texts` with `model` (as `apps.summarize.summarize`, same options, on the
    model's mesh where it has one) and scores the summaries against `references`.

    Returns {"summaries": [...] in input order, "metrics": `rouge(...)`, "stats": counters}.
    """
    from bart_jax.apps.summarize import SummaryStats, iter_summaries

    texts, references = list(texts), list(references)
    if len(texts) != len(references):
        raise ValueError(f"{len(texts)} texts for {len(references)} references")
    stats = SummaryStats()
    summaries = [""] * len(texts)
    for index, summary in iter_summaries(model, texts, batch_size, max_source_length, seed, stats, **options):
        summaries[index] = summary
    metrics = rouge(summaries, references, confidence_interval, bootstrap_samples, seed)
    return {"summaries": summaries, "metrics": metrics, "stats": stats.as_dict()}
