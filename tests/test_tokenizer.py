"""Parity of `bart_jax.tokenizer.BartTokenizer` with `transformers.BartTokenizerFast` on the real BART files.

In transformers 5.x `BartTokenizerFast(vocab_file=..., merges_file=...)` silently ignores both
arguments, so the oracles are built with `tokenizer_file=`, `vocab=`/`merges=` or `from_pretrained`.
transformers defaults `model_max_length` to 1e30 when no tokenizer_config.json says otherwise,
and so does `BartTokenizer.from_pretrained`; the oracles and `from_pretrained` are given BART's
1024, the default of `BartTokenizer.from_file` and `from_vocab_merges`.
"""

from __future__ import annotations

import csv
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import SHARED_DATA, TOKENIZER_DIR
from tokenizers import AddedToken

from bart_jax.tokenizer import BartTokenizer

transformers = pytest.importorskip("transformers")

# Every test reads the real tokenizer files or text samples.
pytestmark = pytest.mark.shared_data

MODEL_MAX_LENGTH = 1024

HARD_CASES = [
    "",
    " ",
    "Hello world",
    " Hello world",
    "  multiple   spaces   inside  ",
    "trailing spaces   ",
    "\n",
    "line one\nline two\n\nline four\n",
    "tab\tseparated\tvalues\t",
    "\r\n windows line end",
    "Café naïve résumé façade Ångström",
    "“Curly quotes” — dashes… and ‘apostrophes’",
    "日本語のテキストです。",
    "中文文本测试，标点符号！",
    "한국어 문장",
    "Ελληνικά και Русский текст и مرحبا",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧‍👦",
    "zero\u200bwidth and nul\x00char",
    "numbers 123 4.56 $7,890 and 1e-5",
    "don't won't it's I'm we've they're",
    "supercalifragilisticexpialidocious" * 20,
    "My dog is <mask> today.",
    "<mask>",
    "a<mask>b <mask> c",
    "<s>literal special tokens</s><pad>",
]


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_pairs(path):
    with open(path, encoding="utf-8") as f:
        return [(row["sentence1"], row["sentence2"]) for row in csv.DictReader(f)]


# Read once, at import. Without the shared data both are empty (a glob of a missing folder finds
# nothing), so that the tests are skipped or fail as conftest.py says rather than the import failing.
MRPC_FILE = SHARED_DATA / "classification" / "mrpc_hf_fixture" / "dev.csv"
MRPC_PAIRS = _read_pairs(MRPC_FILE) if MRPC_FILE.is_file() else []
SUMMARIZATION_TEXTS = [
    text
    for path in sorted((SHARED_DATA / "summarization").glob("*.jsonl"))
    for record in _read_jsonl(path)
    for text in (record["document"], record["summary"])
]
ALL_TEXTS = SUMMARIZATION_TEXTS + HARD_CASES
# `<mask>` strips the space before it and special-token strings decode as tokens, so these
# texts do not survive an encode/decode round trip (in transformers either).
ROUND_TRIP_TEXTS = [text for text in ALL_TEXTS if not any(s in text for s in ("<s>", "</s>", "<pad>", "<mask>"))]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf_file():
    return transformers.BartTokenizerFast(
        tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"), model_max_length=MODEL_MAX_LENGTH
    )


@pytest.fixture(scope="module")
def hf_dir():
    return transformers.BartTokenizerFast.from_pretrained(TOKENIZER_DIR, model_max_length=MODEL_MAX_LENGTH)


@pytest.fixture(scope="module")
def hf_vocab_merges():
    # The hub BART tokenizers declare `<mask>` with lstrip; vocab.json + merges.txt alone do not say it.
    return transformers.BartTokenizerFast(
        vocab=str(TOKENIZER_DIR / "vocab.json"),
        merges=str(TOKENIZER_DIR / "merges.txt"),
        mask_token=AddedToken("<mask>", lstrip=True),
        model_max_length=MODEL_MAX_LENGTH,
    )


@pytest.fixture(scope="module")
def hf_prefix_space():
    return transformers.BartTokenizerFast.from_pretrained(
        TOKENIZER_DIR, add_prefix_space=True, model_max_length=MODEL_MAX_LENGTH
    )


@pytest.fixture(scope="module")
def from_file():
    return BartTokenizer.from_file(TOKENIZER_DIR / "tokenizer.json")


@pytest.fixture(scope="module")
def from_vocab_merges():
    return BartTokenizer.from_vocab_merges(TOKENIZER_DIR / "vocab.json", TOKENIZER_DIR / "merges.txt")


@pytest.fixture(scope="module")
def from_pretrained():
    return BartTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=MODEL_MAX_LENGTH)


LOADERS_AND_ORACLES = [
    ("from_file", "hf_file"),
    ("from_vocab_merges", "hf_vocab_merges"),
    ("from_pretrained", "hf_dir"),
]


def _first_mismatch(ours, theirs, texts):
    for text, a, b in zip(texts, ours, theirs):
        if a != b:
            return f"text {text[:80]!r}:\n ours   {a}\n theirs {b}"
    return None


def _assert_same_encoding(ours, theirs, what):
    assert set(ours) == {"input_ids", "attention_mask"}, f"{what}: keys {sorted(ours)}"
    for key in ("input_ids", "attention_mask"):
        assert ours[key] == theirs[key], f"{what}: {key} differ\n ours   {ours[key]}\n theirs {theirs[key]}"


# ----------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("text, expected", [("Hello world", [0, 31414, 232, 2]), (" Hello world", [0, 20920, 232, 2])])
def test_known_ids(from_file, from_vocab_merges, from_pretrained, hf_file, text, expected):
    assert hf_file.encode(text) == expected, "the oracle disagrees with the data README"
    loaded = {"from_file": from_file, "from_vocab_merges": from_vocab_merges, "from_pretrained": from_pretrained}
    for name, tokenizer in loaded.items():
        assert tokenizer.encode(text) == expected, f"{name}: {text!r}"


@pytest.mark.parametrize("ours_name, oracle_name", LOADERS_AND_ORACLES)
def test_ids_and_masks_match_transformers(request, ours_name, oracle_name):
    ours = request.getfixturevalue(ours_name)(ALL_TEXTS)
    theirs = request.getfixturevalue(oracle_name)(ALL_TEXTS)
    for key in ("input_ids", "attention_mask"):
        mismatch = _first_mismatch(ours[key], theirs[key], ALL_TEXTS)
        assert mismatch is None, f"{ours_name} vs {oracle_name}, {key}: {mismatch}"


def test_single_text_matches_transformers(from_file, hf_file):
    for text in HARD_CASES:
        _assert_same_encoding(from_file(text), dict(hf_file(text)), f"single {text!r}")
        assert from_file.encode(text) == hf_file.encode(text), f"encode {text!r}"
        assert from_file.encode(text, add_special_tokens=False) == hf_file.encode(text, add_special_tokens=False)


def test_add_prefix_space_matches_transformers(hf_prefix_space):
    loaded = {
        "from_file": BartTokenizer.from_file(TOKENIZER_DIR / "tokenizer.json", add_prefix_space=True),
        "from_vocab_merges": BartTokenizer.from_vocab_merges(
            TOKENIZER_DIR / "vocab.json", TOKENIZER_DIR / "merges.txt", add_prefix_space=True
        ),
        "from_pretrained": BartTokenizer.from_pretrained(TOKENIZER_DIR, add_prefix_space=True),
    }
    theirs = hf_prefix_space(ALL_TEXTS)["input_ids"]
    assert theirs[ALL_TEXTS.index("Hello world")] == hf_prefix_space.encode(" Hello world"), "oracle ignores the option"
    for name, tokenizer in loaded.items():
        assert tokenizer.add_prefix_space, name
        mismatch = _first_mismatch(tokenizer(ALL_TEXTS)["input_ids"], theirs, ALL_TEXTS)
        assert mismatch is None, f"{name} with add_prefix_space=True: {mismatch}"
    pairs = loaded["from_file"]([a for a, _ in MRPC_PAIRS], [b for _, b in MRPC_PAIRS])
    hf_pairs = hf_prefix_space([a for a, _ in MRPC_PAIRS], [b for _, b in MRPC_PAIRS])
    _assert_same_encoding(pairs, dict(hf_pairs), "pairs with add_prefix_space=True")


def test_pairs_match_transformers(from_file, hf_file):
    firsts, seconds = [a for a, _ in MRPC_PAIRS], [b for _, b in MRPC_PAIRS]
    _assert_same_encoding(from_file(firsts, seconds), dict(hf_file(firsts, seconds)), "MRPC pair batch")
    for first, second in MRPC_PAIRS + [("Hello world", "<mask> there"), ("", "x"), ("x", "")]:
        _assert_same_encoding(from_file(first, second), dict(hf_file(first, second)), f"pair {first!r}, {second!r}")
        assert from_file.encode(first, second) == hf_file.encode(first, second)
    # transformers reads an empty second text of one pair as no pair, but keeps it inside a batch.
    _assert_same_encoding(from_file(["x"], [""]), dict(hf_file(["x"], [""])), "batch pair with empty second text")


@pytest.mark.parametrize("truncation", [True, "longest_first", "only_first", "only_second"])
@pytest.mark.parametrize("max_length", [5, 12, 24, 40])
def test_truncation_matches_transformers(from_file, hf_file, truncation, max_length):
    firsts, seconds = [a for a, _ in MRPC_PAIRS], [b for _, b in MRPC_PAIRS]
    cases = [
        ("summaries", (SUMMARIZATION_TEXTS[1::2][:8],), {}),
        ("pairs", (firsts, seconds), {}),
        ("padded pairs", (firsts, seconds), {"padding": True}),
        ("one pair", MRPC_PAIRS[0], {}),
    ]
    for what, args, extra in cases:
        kwargs = dict(truncation=truncation, max_length=max_length, **extra)
        try:
            theirs = dict(hf_file(*args, **kwargs))
        except Exception as error:  # e.g. only_second without a second text: ours must refuse too
            with pytest.raises(ValueError):
                from_file(*args, **kwargs)
            assert "Truncation error" in str(error), f"{what}: unexpected oracle error {error}"
            continue
        _assert_same_encoding(from_file(*args, **kwargs), theirs, f"{what}, truncation={truncation}, {max_length}")


def test_default_truncation_lengths_match_transformers(from_file, hf_file):
    longest = max(SUMMARIZATION_TEXTS, key=len)
    assert len(hf_file(longest)["input_ids"]) > MODEL_MAX_LENGTH, "needs a text longer than model_max_length"
    for kwargs in [{"truncation": True}, {"max_length": 7}, {"padding": "max_length", "truncation": True}]:
        _assert_same_encoding(from_file(longest, **kwargs), dict(hf_file(longest, **kwargs)), f"{kwargs}")
    assert len(from_file(longest, truncation=True)["input_ids"]) == MODEL_MAX_LENGTH


@pytest.mark.filterwarnings("ignore:`max_length` is ignored when `padding`=`True`:UserWarning")
@pytest.mark.parametrize("padding", [False, True, "longest", "max_length", "do_not_pad"])
@pytest.mark.parametrize("max_length", [None, 16, 64])
@pytest.mark.parametrize("truncation", [None, True])
def test_padding_matches_transformers(from_file, hf_file, padding, max_length, truncation):
    texts = SUMMARIZATION_TEXTS[1::2][:6] + ["", "a"]
    kwargs = dict(padding=padding, max_length=max_length, truncation=truncation)
    _assert_same_encoding(from_file(texts, **kwargs), dict(hf_file(texts, **kwargs)), f"{kwargs}")


def test_pad_to_multiple_of_matches_transformers(from_file, hf_file):
    texts = SUMMARIZATION_TEXTS[1::2][:4]
    options = [
        dict(padding=True, pad_to_multiple_of=8),
        dict(padding="max_length", max_length=40, pad_to_multiple_of=16),
    ]
    for kwargs in options:
        ours = from_file(texts, **kwargs)
        _assert_same_encoding(ours, dict(hf_file(texts, **kwargs)), f"{kwargs}")
        assert len(ours["input_ids"][0]) % kwargs["pad_to_multiple_of"] == 0
    with pytest.raises(ValueError, match="multiple"):
        from_file(texts, padding=True, truncation=True, max_length=30, pad_to_multiple_of=8)


def test_return_tensors_np_matches_transformers(from_file, hf_file):
    texts = SUMMARIZATION_TEXTS[1::2][:5]
    cases = [
        ((texts,), {"padding": True}),
        (("Hello world",), {}),
        ((texts,), {"padding": "max_length", "max_length": 80, "truncation": True}),
    ]
    for args, kwargs in cases:
        ours = from_file(*args, return_tensors="np", **kwargs)
        theirs = hf_file(*args, return_tensors="np", **kwargs)
        for key in ("input_ids", "attention_mask"):
            assert isinstance(ours[key], np.ndarray), key
            assert ours[key].dtype == theirs[key].dtype == np.int64, (key, ours[key].dtype, theirs[key].dtype)
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{key} for {kwargs}")
    assert from_file("Hello world", return_tensors="np")["input_ids"].shape == (1, 4)


def test_return_attention_mask_false(from_file, hf_file):
    ours = from_file(["Hello world", "a"], padding=True, return_attention_mask=False)
    theirs = hf_file(["Hello world", "a"], padding=True, return_attention_mask=False)
    assert ours == dict(theirs), f"ours {ours}, theirs {dict(theirs)}"


def test_call_options_do_not_leak_into_later_calls(from_file, hf_file):
    from_file(SUMMARIZATION_TEXTS[:3], padding="max_length", truncation=True, max_length=8)
    texts = SUMMARIZATION_TEXTS[:3]
    _assert_same_encoding(from_file(texts), dict(hf_file(texts)), "after a padded call")


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_matches_transformers(from_file, hf_file, skip_special_tokens):
    for text in ALL_TEXTS:
        ids = hf_file.encode(text)
        ours = from_file.decode(ids, skip_special_tokens=skip_special_tokens)
        theirs = hf_file.decode(ids, skip_special_tokens=skip_special_tokens)
        assert ours == theirs, f"decode of {text[:80]!r}:\n ours   {ours[:200]!r}\n theirs {theirs[:200]!r}"


def test_round_trip(from_file):
    for text in ROUND_TRIP_TEXTS:
        assert from_file.decode(from_file.encode(text), skip_special_tokens=True) == text, repr(text[:80])
        assert from_file.decode(from_file.encode(text, add_special_tokens=False)) == text, repr(text[:80])


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_batch_decode_matches_transformers(from_file, hf_file, skip_special_tokens):
    texts = SUMMARIZATION_TEXTS[1::2][:5] + HARD_CASES
    ids = hf_file(texts, padding=True, return_tensors="np")["input_ids"]
    theirs = hf_file.batch_decode(ids, skip_special_tokens=skip_special_tokens)
    for what, batch in [("numpy", ids), ("jax", jnp.asarray(ids)), ("lists", ids.tolist())]:
        assert from_file.batch_decode(batch, skip_special_tokens=skip_special_tokens) == theirs, what
    ragged = [hf_file.encode(text) for text in texts]
    assert from_file.batch_decode(ragged, skip_special_tokens=skip_special_tokens) == hf_file.batch_decode(
        ragged, skip_special_tokens=skip_special_tokens
    )
    if skip_special_tokens:
        decoded = from_file.batch_decode(ids, skip_special_tokens=True)
        round_trip = [(d, t) for d, t in zip(decoded, texts) if t in ROUND_TRIP_TEXTS]
        assert all(d == t for d, t in round_trip), "batch_decode with skip_special_tokens must give back the texts"
    assert from_file.batch_decode([]) == []


def test_decode_accepts_arrays(from_file, hf_file):
    ids = hf_file.encode("Hello world, arrays")
    theirs = hf_file.decode(ids)
    for what, value in [("numpy", np.asarray(ids)), ("int32", np.asarray(ids, np.int32)), ("jax", jnp.asarray(ids))]:
        assert from_file.decode(value) == theirs, what
    assert from_file.decode(ids[1]) == hf_file.decode(ids[1]), "one int"
    padded = hf_file(["Hello world", "a"], padding=True)["input_ids"][1]
    assert 1 in padded and from_file.decode(padded, skip_special_tokens=True) == "a", "pad ids must be dropped"


def test_clean_up_tokenization_spaces(from_file, hf_file):
    ids = [hf_file.encode(a + " " + b) for a, b in MRPC_PAIRS]
    for row in ids:
        # transformers' default leaves BART's decoded text alone.
        assert from_file.decode(row) == hf_file.decode(row)
    forced = transformers.BartTokenizerFast(
        tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"),
        clean_up_tokenization_spaces=True,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True,
    )
    cleaned = [from_file.decode(row, clean_up_tokenization_spaces=True) for row in ids]
    assert cleaned == [forced.decode(row) for row in ids]
    assert cleaned != [from_file.decode(row) for row in ids], "the MRPC texts have ' .' and \" 's\" to clean up"
    assert from_file.batch_decode(ids, clean_up_tokenization_spaces=True) == cleaned


# ----------------------------------------------------------------------------- vocabulary


def test_tokenize_and_token_conversions_match_transformers(from_file, hf_file):
    for text in HARD_CASES:
        tokens = from_file.tokenize(text)
        assert tokens == hf_file.tokenize(text), repr(text)
        assert from_file.convert_tokens_to_ids(tokens) == hf_file.convert_tokens_to_ids(tokens), repr(text)
    for token in ["Ġworld", "<mask>", "not-a-token-in-the-vocab"]:
        assert from_file.convert_tokens_to_ids(token) == hf_file.convert_tokens_to_ids(token), token
    ids = hf_file.encode("My dog is <mask> today.") + [1, 3]
    for skip in (False, True):
        assert from_file.convert_ids_to_tokens(ids, skip_special_tokens=skip) == hf_file.convert_ids_to_tokens(
            ids, skip_special_tokens=skip
        )
    assert from_file.convert_ids_to_tokens(232) == hf_file.convert_ids_to_tokens(232)
    assert from_file.convert_ids_to_tokens(np.asarray(ids)) == hf_file.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("ours_name, oracle_name", LOADERS_AND_ORACLES)
def test_properties_match_transformers(request, ours_name, oracle_name):
    ours, theirs = request.getfixturevalue(ours_name), request.getfixturevalue(oracle_name)
    assert ours.vocab_size == len(theirs) == theirs.vocab_size
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "mask_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.model_max_length == MODEL_MAX_LENGTH
    assert ours.add_prefix_space is False


def test_vocab_merges_build_the_tokenizer_json_pipeline(from_vocab_merges, from_file):
    built = json.loads(from_vocab_merges.backend_tokenizer.to_str())
    # Read back through `tokenizers` so that defaults the file leaves out are filled in.
    reference = json.loads(from_file.backend_tokenizer.to_str())
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "model"):
        assert built[key] == reference[key], f"{key} differs from tokenizer.json"


# ----------------------------------------------------------------------------- files


def _read_vocab_or_merges(path):
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else text.splitlines()


@pytest.mark.parametrize("add_prefix_space", [False, True])
def test_save_pretrained_loads_in_transformers(tmp_path, add_prefix_space):
    tokenizer = BartTokenizer.from_vocab_merges(
        TOKENIZER_DIR / "vocab.json", TOKENIZER_DIR / "merges.txt", add_prefix_space=add_prefix_space
    )
    tokenizer(SUMMARIZATION_TEXTS[:2], padding="max_length", truncation=True, max_length=8)  # must not be saved
    written = tokenizer.save_pretrained(tmp_path)
    names = {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"}
    assert {p.name for p in tmp_path.iterdir()} == names and len(written) == 4, written
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["padding"] is None and saved["truncation"] is None, "call options leaked into tokenizer.json"
    for name in ("vocab.json", "merges.txt"):
        assert _read_vocab_or_merges(tmp_path / name) == _read_vocab_or_merges(TOKENIZER_DIR / name), name

    hf = transformers.BartTokenizerFast.from_pretrained(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    reloaded = BartTokenizer.from_pretrained(tmp_path)
    assert hf.model_max_length == auto.model_max_length == reloaded.model_max_length == MODEL_MAX_LENGTH
    assert reloaded.add_prefix_space is add_prefix_space
    expected = tokenizer(ALL_TEXTS)["input_ids"]
    for name, other in [("BartTokenizerFast", hf), ("AutoTokenizer", auto)]:
        mismatch = _first_mismatch(expected, other(ALL_TEXTS)["input_ids"], ALL_TEXTS)
        assert mismatch is None, f"{name} loading the saved directory: {mismatch}"
    assert _first_mismatch(expected, reloaded(ALL_TEXTS)["input_ids"], ALL_TEXTS) is None


def test_from_pretrained_falls_back_to_vocab_merges_and_reads_config(tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_DIR / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"add_prefix_space": True, "model_max_length": 512}), encoding="utf-8"
    )
    ours = BartTokenizer.from_pretrained(tmp_path)
    theirs = transformers.BartTokenizerFast.from_pretrained(tmp_path)
    assert ours.add_prefix_space and ours.model_max_length == theirs.model_max_length == 512
    # transformers 5.x gives `<mask>` no lstrip when only vocab.json + merges.txt are present.
    texts = ROUND_TRIP_TEXTS
    assert _first_mismatch(ours(texts)["input_ids"], theirs(texts)["input_ids"], texts) is None
    longest = max(SUMMARIZATION_TEXTS, key=len)
    assert ours(longest, truncation=True)["input_ids"] == theirs(longest, truncation=True)["input_ids"]

    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"add_prefix_space": True}), encoding="utf-8")
    assert BartTokenizer.from_pretrained(tmp_path).add_prefix_space
    assert BartTokenizer.from_pretrained(tmp_path, add_prefix_space=False).encode("Hello") == [0, 31414, 2]


# ----------------------------------------------------------------------------- bad input


def test_missing_files_raise(tmp_path):
    with pytest.raises(ValueError, match=r"no tokenizer in .*tokenizer\.json.*vocab\.json.*merges\.txt"):
        BartTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        BartTokenizer.from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="absent.json"):
        BartTokenizer.from_file(tmp_path / "absent.json")
    with pytest.raises(ValueError, match="merges.txt"):
        BartTokenizer.from_vocab_merges(TOKENIZER_DIR / "vocab.json", tmp_path / "merges.txt")
    shutil.copy(TOKENIZER_DIR / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(ValueError, match="no tokenizer in"):
        BartTokenizer.from_pretrained(tmp_path)
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json"):
        BartTokenizer.from_file(tmp_path / "broken.json")


def test_out_of_vocabulary_ids_raise(from_file):
    for bad in (from_file.vocab_size, 99999, -1):
        with pytest.raises(ValueError, match=str(bad)):
            from_file.decode([0, 232, bad])
        with pytest.raises(ValueError, match=str(bad)):
            from_file.batch_decode(np.asarray([[0, 232, bad]]))
        with pytest.raises(ValueError, match=str(bad)):
            from_file.convert_ids_to_tokens([bad])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(padding="left"), "padding"),
        (dict(truncation="both"), "truncation"),
        (dict(return_tensors="pt"), "return_tensors"),
        (dict(max_length=0), "max_length"),
        (dict(return_tensors="np"), "padding"),
    ],
)
def test_bad_call_options_raise(from_file, kwargs, match):
    with pytest.raises(ValueError, match=match):
        from_file(["Hello world", "a"], **kwargs)


def test_bad_texts_raise(from_file):
    for text, pair in [(3, None), ([], None), (["a", 3], None), (["a"], "b"), (["a", "b"], ["c"]), ("a", ["b"])]:
        with pytest.raises(ValueError):
            from_file(text, pair)
    with pytest.raises(ValueError, match="batch"):
        from_file.batch_decode([0, 1, 2])
    with pytest.raises(ValueError, match="only_second|Second"):
        from_file("Hello world", truncation="only_second", max_length=3)
