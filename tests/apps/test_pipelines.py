"""Pipelines against transformers' own pipelines (fill-mask, zero-shot) on the same random
weights and the real BART tokenizer; question answering against a brute-force span search."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import transformers
from hf_reference import TOKENIZER_DIR, hf_model, save_hf_model

from bart_jax import load_pretrained
from bart_jax.apps.pipelines import answer_question, fill_mask, zero_shot_classify

REAL_VOCAB = dict(vocab_size=50265, d_model=16, encoder_attention_heads=2, decoder_attention_heads=2,
                  encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128)
NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}
# Every model here has the real vocabulary and tokenizer.
pytestmark = pytest.mark.shared_data


def _with_tokenizer(model, directory):
    save_hf_model(model, directory)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_DIR / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.BartTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def generation_pair(tmp_path_factory):
    model = hf_model("BartForConditionalGeneration", seed=3, **REAL_VOCAB)
    return model, load_pretrained(_with_tokenizer(model, tmp_path_factory.mktemp("fill")))


@pytest.mark.parametrize("text", [
    "Plants create <mask> through a process known as photosynthesis.",
    "My <mask> is <mask> today.",
])
def test_fill_mask_matches_transformers_pipeline(generation_pair, hf_tokenizer, text):
    model, pretrained = generation_pair
    reference = transformers.pipeline("fill-mask", model=model, tokenizer=hf_tokenizer, device="cpu")(text, top_k=4)
    ours = fill_mask(pretrained, text, top_k=4)
    if isinstance(ours[0], dict):
        reference, ours = [reference], [ours]
    assert len(ours) == len(reference)
    for reference_row, our_row in zip(reference, ours):
        assert [r["token"] for r in our_row] == [r["token"] for r in reference_row]
        assert [r["token_str"] for r in our_row] == [r["token_str"] for r in reference_row]
        assert [r["sequence"] for r in our_row] == [r["sequence"] for r in reference_row]
        np.testing.assert_allclose([r["score"] for r in our_row], [r["score"] for r in reference_row], atol=1e-5)


def test_fill_mask_without_mask_is_an_error(generation_pair):
    with pytest.raises(ValueError, match="no <mask> token"):
        fill_mask(generation_pair[1], "Nothing to fill.")


@pytest.fixture(scope="module")
def nli_pair(tmp_path_factory):
    model = hf_model("BartForSequenceClassification", seed=4, id2label=NLI_LABELS,
                     label2id={v: k for k, v in NLI_LABELS.items()}, **REAL_VOCAB)
    return model, load_pretrained(_with_tokenizer(model, tmp_path_factory.mktemp("nli")))


@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("labels", [["politics", "sport", "cooking science"], ["weather"]])
def test_zero_shot_matches_transformers_pipeline(nli_pair, hf_tokenizer, multi_label, labels):
    model, pretrained = nli_pair
    text = "The minister announced a new budget for the national football league on Tuesday."
    classifier = transformers.pipeline("zero-shot-classification", model=model, tokenizer=hf_tokenizer, device="cpu")
    reference = classifier(text, candidate_labels=labels, multi_label=multi_label)
    ours = zero_shot_classify(pretrained, text, labels, multi_label=multi_label)
    assert ours["labels"] == reference["labels"]
    np.testing.assert_allclose(ours["scores"], reference["scores"], atol=1e-5)
    if not multi_label and len(labels) > 1:
        assert abs(sum(ours["scores"]) - 1.0) < 1e-5


def test_zero_shot_needs_an_entailment_label(tmp_path):
    model = hf_model("BartForSequenceClassification", seed=5, **REAL_VOCAB)
    pretrained = load_pretrained(_with_tokenizer(model, tmp_path / "plain"))
    with pytest.raises(ValueError, match="no 'entailment' label"):
        zero_shot_classify(pretrained, "text", ["a", "b"])


def test_answer_question_is_the_best_valid_span(tmp_path, hf_tokenizer):
    model = hf_model("BartForQuestionAnswering", seed=6, **REAL_VOCAB)
    pretrained = load_pretrained(_with_tokenizer(model, tmp_path / "qa"))
    question = "Where do the engineers work?"
    context = "The engineers of the project work in Edinburgh, close to the old harbour, since 2019."
    ours = answer_question(pretrained, question, context, max_answer_length=6)

    encoded = hf_tokenizer(question, context, return_offsets_mapping=True)
    with torch.no_grad():
        output = model(input_ids=torch.tensor([encoded["input_ids"]]))
    start = torch.softmax(output.start_logits[0], -1).numpy()
    end = torch.softmax(output.end_logits[0], -1).numpy()
    context_tokens = [i for i, s in enumerate(encoded.sequence_ids()) if s == 1]
    # Brute force over every valid span; probabilities renormalised over context tokens.
    start_context = start[context_tokens] / start[context_tokens].sum()
    end_context = end[context_tokens] / end[context_tokens].sum()
    best = max(
        ((start_context[a] * end_context[b], context_tokens[a], context_tokens[b])
         for a in range(len(context_tokens)) for b in range(a, min(a + 6, len(context_tokens)))),
    )
    offsets = encoded["offset_mapping"]
    assert (ours["start"], ours["end"]) == (offsets[best[1]][0], offsets[best[2]][1])
    assert ours["answer"] == context[ours["start"]:ours["end"]]
    assert abs(ours["score"] - best[0]) < 1e-4


def test_pipelines_check_the_head(generation_pair):
    with pytest.raises(ValueError, match="needs a BartForQuestionAnswering model"):
        answer_question(generation_pair[1], "q", "c")
