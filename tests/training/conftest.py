"""Fixtures of the training tests."""

from __future__ import annotations

import pytest
from hf_reference import hf_model, save_hf_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, bart_tokenizer):
    """A perturbed random transformers BartForConditionalGeneration (BART's vocabulary, one layer
    each side) with the real tokenizer, as train.py's --model_name_or_path."""
    directory = tmp_path_factory.mktemp("tiny-bart")
    model = hf_model("BartForConditionalGeneration", seed=0, vocab_size=50265, encoder_layers=1, decoder_layers=1)
    save_hf_model(model, directory)
    bart_tokenizer.save_pretrained(directory)
    return str(directory)
