"""The files of a Hugging Face BART tokenizer directory and the `tokenizers` pipeline they hold.

`tokenizer.json` is the whole pipeline. GPT-2 style `vocab.json` + `merges.txt` hold only the BPE
model: `build_backend` puts around it what Hugging Face's BART/RoBERTa `tokenizer.json` has
(ByteLevel pre-tokenizer and decoder, RobertaProcessing `<s> A </s>` / `<s> A </s></s> B </s>`,
`<mask>` stripping the space before it). `tokenizer_config.json` (or `special_tokens_map.json`)
gives `add_prefix_space` and `model_max_length`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

BOS_TOKEN = "<s>"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
MASK_TOKEN = "<mask>"
SPECIAL_TOKENS = (BOS_TOKEN, PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, MASK_TOKEN)

# BART's learned position embeddings cover 1024 positions: the default of the file constructors.
DEFAULT_MODEL_MAX_LENGTH = 1024
# transformers' model_max_length of a directory that sets none (its VERY_LARGE_INTEGER, which it
# also writes to tokenizer_config.json); any value above UNLIMITED_MODEL_MAX_LENGTH (its
# LARGE_INTEGER) means no limit: `truncation=True` or `padding="max_length"` without `max_length`
# then neither truncate nor pad.
UNSET_MODEL_MAX_LENGTH = int(1e30)
UNLIMITED_MODEL_MAX_LENGTH = int(1e20)


def build_backend(vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> Tokenizer:
    """The `tokenizers` pipeline that Hugging Face's `tokenizer.json` for BART/RoBERTa holds."""
    backend = Tokenizer(
        BPE.from_file(str(vocab_path), str(merges_path), continuing_subword_prefix="", end_of_word_suffix="")
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # The hub tokenizers declare `<mask>` with lstrip so that "is <mask>" has no stray "Ġ" token.
    backend.add_special_tokens(
        [AddedToken(token, lstrip=token == MASK_TOKEN, special=True, normalized=True) for token in SPECIAL_TOKENS]
    )
    backend.post_processor = processors.RobertaProcessing(
        (EOS_TOKEN, backend.token_to_id(EOS_TOKEN)), (BOS_TOKEN, backend.token_to_id(BOS_TOKEN))
    )
    return backend


def set_add_prefix_space(backend: Tokenizer, add_prefix_space: bool) -> None:
    """Makes the first word tokenize like every other word (with a leading "Ġ"), as transformers does."""
    post_processor = backend.post_processor
    if not isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel) or not isinstance(
        post_processor, processors.RobertaProcessing
    ):
        raise ValueError("add_prefix_space needs a ByteLevel pre-tokenizer and a RobertaProcessing post-processor")
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.post_processor = processors.RobertaProcessing(
        post_processor.sep,
        post_processor.cls,
        trim_offsets=post_processor.trim_offsets,
        add_prefix_space=add_prefix_space,
    )


def load_tokenizer_file(path: str | os.PathLike, add_prefix_space: bool | None = None) -> Tokenizer:
    """The pipeline of a `tokenizer.json`; `add_prefix_space=None` keeps the file's setting."""
    _require_file(path)
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as error:  # the backend raises a bare Exception on a malformed file
        raise ValueError(f"{path} is not a tokenizers file: {error}") from None
    if add_prefix_space is not None:
        set_add_prefix_space(backend, add_prefix_space)
    return backend


def load_vocab_merges(
    vocab_path: str | os.PathLike, merges_path: str | os.PathLike, add_prefix_space: bool = False
) -> Tokenizer:
    """The pipeline built from GPT-2 style `vocab.json` and `merges.txt`."""
    _require_file(vocab_path)
    _require_file(merges_path)
    backend = build_backend(vocab_path, merges_path)
    set_add_prefix_space(backend, add_prefix_space)
    return backend


def load_directory(
    directory: str | os.PathLike, add_prefix_space: bool | None = None, model_max_length: int | None = None
) -> tuple[Tokenizer, int]:
    """(pipeline, model_max_length) of a Hugging Face tokenizer directory: `tokenizer.json`, else
    `vocab.json` + `merges.txt`.

    `add_prefix_space` and `model_max_length` default to the values in `tokenizer_config.json`
    (or `special_tokens_map.json`), then to the tokenizer file's setting and, as transformers,
    UNSET_MODEL_MAX_LENGTH (no limit).
    """
    config = _read_tokenizer_config(directory)
    if add_prefix_space is None:
        add_prefix_space = config.get("add_prefix_space")
    if model_max_length is None:
        model_max_length = config.get("model_max_length")
        if model_max_length is None:
            model_max_length = UNSET_MODEL_MAX_LENGTH
        elif isinstance(model_max_length, float) and model_max_length.is_integer():  # 1e+30 written as a float
            model_max_length = int(model_max_length)
    tokenizer_path = os.path.join(directory, TOKENIZER_FILE)
    vocab_path = os.path.join(directory, VOCAB_FILE)
    merges_path = os.path.join(directory, MERGES_FILE)
    if os.path.isfile(tokenizer_path):
        return load_tokenizer_file(tokenizer_path, add_prefix_space), model_max_length
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        return load_vocab_merges(vocab_path, merges_path, bool(add_prefix_space)), model_max_length
    raise ValueError(f"no tokenizer in {directory}: expected {TOKENIZER_FILE}, or {VOCAB_FILE} and {MERGES_FILE}")


def save_directory(
    backend: Tokenizer, directory: str | os.PathLike, add_prefix_space: bool, model_max_length: int
) -> list[str]:
    """Writes tokenizer.json, vocab.json, merges.txt and a tokenizer_config.json transformers loads;
    returns their paths."""
    os.makedirs(directory, exist_ok=True)
    # A padding or truncation left on the backend by the last call would be saved with it.
    backend.no_padding()
    backend.no_truncation()
    tokenizer_path = os.path.join(directory, TOKENIZER_FILE)
    backend.save(tokenizer_path)
    model_files = backend.model.save(str(directory))
    config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(add_prefix_space, model_max_length), f, indent=2, sort_keys=True)
        f.write("\n")
    return [tokenizer_path, *model_files, config_path]


def tokenizer_config(add_prefix_space: bool, model_max_length: int) -> dict[str, Any]:
    """The `tokenizer_config.json` of a BART tokenizer, as transformers writes it."""
    return {
        "tokenizer_class": "BartTokenizer",
        "add_prefix_space": add_prefix_space,
        "trim_offsets": True,
        "errors": "replace",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "bos_token": BOS_TOKEN,
        "cls_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "sep_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
        "mask_token": MASK_TOKEN,
    }


def _require_file(path: str | os.PathLike) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer file not found: {path}")


def _read_tokenizer_config(directory: str | os.PathLike) -> dict[str, Any]:
    """`special_tokens_map.json` overlaid by `tokenizer_config.json`, each when present."""
    if not os.path.isdir(directory):
        raise ValueError(f"tokenizer directory not found: {directory}")
    config: dict[str, Any] = {}
    for name in (SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                try:
                    config.update(json.load(f))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} is not valid JSON: {error}") from None
    return config
