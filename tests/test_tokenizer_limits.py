"""`model_max_length` of a tokenizer directory, as `transformers.BartTokenizerFast.from_pretrained`
reads it: a directory whose files set none has no limit, so that `truncation=True` and
`padding="max_length"` without `max_length` neither cut nor pad (where a fixed 1024 would cut)."""

from __future__ import annotations

import json
import shutil

import pytest
from hf_reference import SHARED_DATA, TOKENIZER_DIR

from bart_jax.tokenizer import UNSET_MODEL_MAX_LENGTH, BartTokenizer

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def long_text():
    """A text of more than 1024 tokens."""
    with open(SHARED_DATA / "summarization" / "xsum_bbc_extracts_dev.jsonl", encoding="utf-8") as f:
        documents = [json.loads(line)["document"] for line in f if line.strip()]
    return " ".join(documents)


def tokenizer_directory(tmp_path, names, config=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(TOKENIZER_DIR / name, tmp_path / name)
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path


CALLS = [dict(truncation=True), dict(truncation="longest_first"), dict(padding="max_length"),
         dict(padding="max_length", truncation=True), dict(max_length=7), dict(truncation=True, max_length=20)]


@pytest.mark.parametrize("names", [("tokenizer.json",), ("vocab.json", "merges.txt")], ids=["tokenizer.json", "vocab"])
def test_a_directory_without_a_limit_truncates_like_transformers(tmp_path, names, long_text):
    directory = tokenizer_directory(tmp_path, names)
    ours, theirs = BartTokenizer.from_pretrained(directory), transformers.BartTokenizerFast.from_pretrained(directory)
    assert ours.model_max_length == theirs.model_max_length == UNSET_MODEL_MAX_LENGTH
    assert len(theirs(long_text)["input_ids"]) > 1024, "needs a text longer than BART's 1024 positions"
    for kwargs in CALLS:
        for text in (long_text, [long_text, "A short one."]):
            assert ours(text, **kwargs) == dict(theirs(text, **kwargs)), kwargs
    assert len(ours(long_text, truncation=True)["input_ids"]) == len(ours(long_text)["input_ids"])


@pytest.mark.parametrize("model_max_length", [UNSET_MODEL_MAX_LENGTH, 1e30, 512])
def test_the_configured_limit_is_read_like_transformers(tmp_path, long_text, model_max_length):
    directory = tokenizer_directory(tmp_path, ("tokenizer.json",), {"model_max_length": model_max_length})
    ours, theirs = BartTokenizer.from_pretrained(directory), transformers.BartTokenizerFast.from_pretrained(directory)
    assert ours.model_max_length == theirs.model_max_length
    for kwargs in CALLS:
        assert ours(long_text, **kwargs) == dict(theirs(long_text, **kwargs)), kwargs


def test_a_saved_tokenizer_keeps_having_no_limit(tmp_path, long_text):
    ours = BartTokenizer.from_pretrained(tokenizer_directory(tmp_path / "source", ("tokenizer.json",)))
    ours.save_pretrained(tmp_path / "saved")
    reloaded = BartTokenizer.from_pretrained(tmp_path / "saved")
    theirs = transformers.BartTokenizerFast.from_pretrained(tmp_path / "saved")
    assert reloaded.model_max_length == theirs.model_max_length == UNSET_MODEL_MAX_LENGTH
    assert reloaded(long_text, truncation=True) == dict(theirs(long_text, truncation=True))
