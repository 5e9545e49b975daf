"""rougeLsum as the Hugging Face summarization examples compute it: texts split into sentences,
one a line, before rouge_score sees them."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from bart_jax.apps import scores
from bart_jax.training import metrics

PREDICTION = "The cat sat on the mat. It was happy there. Mr. Smith fed it fish."
REFERENCE = "Mr. Smith fed the cat. The cat sat on the mat and it was happy."


def test_sentences_split_without_downloaded_data():
    assert metrics.split_sentences(PREDICTION) == ["The cat sat on the mat.", "It was happy there.",
                                                   "Mr. Smith fed it fish."]
    assert metrics.split_sentences("  Rain fell (mostly).\nThe U.S. team won! Did J. R. Smith play?  ") == [
        "Rain fell (mostly).", "The U.S. team won!", "Did J. R. Smith play?"]
    assert metrics.split_sentences('He said "Stop." Then he left.') == ['He said "Stop."', "Then he left."]
    assert metrics.split_sentences("") == []
    for text in (PREDICTION, REFERENCE, "No. 10 said so. Gen. Lee (ret.) agreed.\n\nDone"):
        assert "\n".join(metrics.split_sentences(text)) == scores.split_sentences(text), \
            "training's evaluation and bart-jax's scoring must split alike"


def test_rouge_lsum_scores_sentence_per_line_text():
    result = metrics.rouge([PREDICTION], [REFERENCE])
    scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    one_line = scorer.score(REFERENCE, PREDICTION)
    by_sentence = scorer.score("Mr. Smith fed the cat.\nThe cat sat on the mat and it was happy.",
                               "The cat sat on the mat.\nIt was happy there.\nMr. Smith fed it fish.")
    assert result["rougeLsum"] == pytest.approx(by_sentence["rougeLsum"].fmeasure)
    assert result["rougeL"] == pytest.approx(one_line["rougeL"].fmeasure)
    assert result["rougeLsum"] > result["rougeL"] + 0.1, "summary-level LCS differs from plain rougeL here"
    assert one_line["rougeLsum"].fmeasure == pytest.approx(one_line["rougeL"].fmeasure), \
        "without the split, rouge_score's rougeLsum is rougeL"
