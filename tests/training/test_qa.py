"""bart_jax.training.qa: answer positions of SQuAD examples and answer extraction from span logits,
on the real BART tokenizer."""

from __future__ import annotations

import numpy as np

from bart_jax.training import data, qa


def test_qa_positions_point_at_the_answer_text(bart_tokenizer, shared_data):
    records = data.read_records(shared_data / "qa" / "squad_hf_fixture_sample.json")
    task_data = qa.qa_data(records, bart_tokenizer, "question", "context", "answers", 384, "train")
    answerable = 0
    for record, start, end, reference in zip(records, task_data.columns["start_positions"],
                                             task_data.columns["end_positions"], task_data.references):
        if not record["answers"]["text"]:
            assert start == end == qa.NO_ANSWER_POSITION
            continue
        answerable += 1
        span = reference.context[reference.offsets[start, 0]:reference.offsets[end, 1]]
        assert span == record["answers"]["text"][0], f"positions {start}-{end} give {span!r}"
        # Logits that pick the gold span give back the gold answer.
        start_logits, end_logits = np.full(384, -10.0), np.full(384, -10.0)
        start_logits[start] = end_logits[end] = 10.0
        assert qa.extract_answer(start_logits, end_logits, reference, 30, True) == span
    assert answerable == 8


def test_qa_answer_cut_off_by_truncation_points_at_position_zero(bart_tokenizer):
    context = "filler " * 60 + "The answer is Paris."
    record = {"question": "Where?", "context": context,
              "answers": {"text": ["Paris"], "answer_start": [context.index("Paris")]}}
    task_data = qa.qa_data([record], bart_tokenizer, "question", "context", "answers", 32, "train")
    assert task_data.stats.truncated == 1
    assert task_data.columns["start_positions"][0] == task_data.columns["end_positions"][0] == 0
    # Logits favouring position 0 mean "no answer" in SQuAD 2.0 mode, and are ignored otherwise.
    start_logits, end_logits = np.zeros(32), np.zeros(32)
    start_logits[0] = end_logits[0] = 5.0
    reference = task_data.references[0]
    assert qa.extract_answer(start_logits, end_logits, reference, 30, allow_no_answer=True) == ""
    assert qa.extract_answer(start_logits, end_logits, reference, 30, allow_no_answer=False) != ""
