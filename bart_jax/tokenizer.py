"""`BartTokenizer`: BART's byte-level BPE tokenizer, output for output as `transformers.BartTokenizerFast`.

All the tokenization is done by the `tokenizers` library; this module maps the transformers call
options (padding, truncation, max_length) onto the backend and decodes. Building the backend's
pipeline the way Hugging Face does, and reading and writing the files of a Hugging Face tokenizer
directory, are in `bart_jax.tokenizer_files`, whose names are importable from here too.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer

from bart_jax import tokenizer_files
from bart_jax.tokenizer_files import (
    BOS_TOKEN,
    DEFAULT_MODEL_MAX_LENGTH,
    EOS_TOKEN,
    MASK_TOKEN,
    MERGES_FILE,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    UNK_TOKEN,
    UNLIMITED_MODEL_MAX_LENGTH,
    UNSET_MODEL_MAX_LENGTH,
    VOCAB_FILE,
    build_backend,
    set_add_prefix_space,
)

__all__ = [
    "BOS_TOKEN",
    "BartTokenizer",
    "DEFAULT_MODEL_MAX_LENGTH",
    "EOS_TOKEN",
    "MASK_TOKEN",
    "MERGES_FILE",
    "PADDING_STRATEGIES",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "SPECIAL_TOKENS_MAP_FILE",
    "TOKENIZER_CONFIG_FILE",
    "TOKENIZER_FILE",
    "TRUNCATION_STRATEGIES",
    "UNK_TOKEN",
    "UNLIMITED_MODEL_MAX_LENGTH",
    "UNSET_MODEL_MAX_LENGTH",
    "VOCAB_FILE",
    "build_backend",
    "clean_up_tokenization",
    "set_add_prefix_space",
]

PADDING_STRATEGIES = ("do_not_pad", "longest", "max_length")
TRUNCATION_STRATEGIES = ("do_not_truncate", "longest_first", "only_first", "only_second")

# transformers' `clean_up_tokenization`, written for WordPiece output; off by default for BART.
_CLEAN_UP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """Removes the spaces before punctuation and English contractions (transformers' rules)."""
    for before, after in _CLEAN_UP_REPLACEMENTS:
        text = text.replace(before, after)
    return text


class BartTokenizer:
    """Byte-level BPE tokenizer for BART with the call interface of `transformers.BartTokenizerFast`."""

    def __init__(self, backend: Tokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH):
        missing = [token for token in SPECIAL_TOKENS if backend.token_to_id(token) is None]
        if missing:
            raise ValueError(f"the tokenizer has no id for the special tokens {missing}")
        if not isinstance(model_max_length, int) or model_max_length <= 0:
            raise ValueError(f"model_max_length must be a positive int, got {model_max_length!r}")
        self._backend = backend
        self.model_max_length = model_max_length

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        add_prefix_space: bool | None = None,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    ) -> "BartTokenizer":
        """Loads a `tokenizer.json`; `add_prefix_space=None` keeps the file's setting."""
        return cls(tokenizer_files.load_tokenizer_file(path, add_prefix_space), model_max_length)

    @classmethod
    def from_vocab_merges(
        cls,
        vocab_path: str | os.PathLike,
        merges_path: str | os.PathLike,
        add_prefix_space: bool = False,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    ) -> "BartTokenizer":
        """Builds the tokenizer from GPT-2 style `vocab.json` and `merges.txt`."""
        return cls(tokenizer_files.load_vocab_merges(vocab_path, merges_path, add_prefix_space), model_max_length)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        add_prefix_space: bool | None = None,
        model_max_length: int | None = None,
    ) -> "BartTokenizer":
        """Loads a Hugging Face tokenizer directory: `tokenizer.json`, else `vocab.json` + `merges.txt`.

        `add_prefix_space` and `model_max_length` default to the values in `tokenizer_config.json`
        (or `special_tokens_map.json`), then to the tokenizer file's setting and, as in transformers,
        to no limit (`UNSET_MODEL_MAX_LENGTH`: `truncation=True` alone then truncates nothing).
        """
        return cls(*tokenizer_files.load_directory(directory, add_prefix_space, model_max_length))

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Writes tokenizer.json, vocab.json, merges.txt and a tokenizer_config.json transformers loads."""
        return tokenizer_files.save_directory(self._backend, directory, self.add_prefix_space, self.model_max_length)

    # ----------------------------------------------------------------------------- properties

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def add_prefix_space(self) -> bool:
        return bool(getattr(self._backend.pre_tokenizer, "add_prefix_space", False))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int:
        return self._backend.token_to_id(BOS_TOKEN)

    @property
    def pad_token_id(self) -> int:
        return self._backend.token_to_id(PAD_TOKEN)

    @property
    def eos_token_id(self) -> int:
        return self._backend.token_to_id(EOS_TOKEN)

    @property
    def unk_token_id(self) -> int:
        return self._backend.token_to_id(UNK_TOKEN)

    @property
    def mask_token_id(self) -> int:
        return self._backend.token_to_id(MASK_TOKEN)

    # ----------------------------------------------------------------------------- encoding

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        return_attention_mask: bool = True,
    ) -> dict[str, Any]:
        """Tokenizes one text (or pair) or a batch, as `BartTokenizerFast.__call__`.

        Returns `input_ids` and `attention_mask`: lists of ints for one text, lists of lists for a
        batch, or int64 arrays of shape (batch, seq_len) with `return_tensors="np"`. Padding is on
        the right with `pad_token_id`. As in transformers, `max_length` alone turns truncation on,
        and `truncation`/`padding="max_length"` without `max_length` use `model_max_length` (if set).
        """
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors must be None or 'np', got {return_tensors!r}")
        batch, is_batched = _batch_of_inputs(text, text_pair)
        padding_strategy, truncation_strategy, max_length = self._strategies(
            padding, truncation, max_length, pad_to_multiple_of
        )
        self._configure_backend(padding_strategy, truncation_strategy, max_length, pad_to_multiple_of)
        try:
            encodings = self._backend.encode_batch(batch, add_special_tokens=add_special_tokens)
        except Exception as error:  # the backend raises a bare Exception, e.g. on impossible truncation
            raise ValueError(f"cannot tokenize: {error}") from None

        outputs = {"input_ids": [encoding.ids for encoding in encodings]}
        if return_attention_mask:
            outputs["attention_mask"] = [encoding.attention_mask for encoding in encodings]
        if return_tensors == "np":
            return {name: _stack(name, rows) for name, rows in outputs.items()}
        if not is_batched:
            return {name: rows[0] for name, rows in outputs.items()}
        return outputs

    def encode(
        self,
        text: str,
        text_pair: str | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
    ) -> list[int]:
        """Token ids of one text (or pair): `self(text, text_pair, ...)["input_ids"]`."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes one text, got {type(text).__name__}; call the tokenizer for batches")
        return self(
            text,
            text_pair,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            add_special_tokens=add_special_tokens,
            return_attention_mask=False,
        )["input_ids"]

    def tokenize(self, text: str) -> list[str]:
        """The byte-level BPE tokens of `text`, without special tokens added."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        self._configure_backend("do_not_pad", "do_not_truncate", None, None)
        return self._backend.encode(text, add_special_tokens=False).tokens

    def _strategies(self, padding, truncation, max_length, pad_to_multiple_of) -> tuple[str, str, int | None]:
        """transformers' `_get_padding_truncation_strategies`: option values to backend settings."""
        if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"

        if padding is True:
            padding_strategy = "longest"
        elif padding is False:
            padding_strategy = "do_not_pad"
        elif padding in PADDING_STRATEGIES:
            padding_strategy = padding
        else:
            raise ValueError(f"padding must be True, False or one of {PADDING_STRATEGIES}, got {padding!r}")

        if truncation is True:
            truncation_strategy = "longest_first"
        elif truncation is None or truncation is False:
            truncation_strategy = "do_not_truncate"
        elif truncation in TRUNCATION_STRATEGIES:
            truncation_strategy = truncation
        else:
            raise ValueError(
                f"truncation must be True, False, None or one of {TRUNCATION_STRATEGIES}, got {truncation!r}"
            )

        if max_length is None and (padding_strategy == "max_length" or truncation_strategy != "do_not_truncate"):
            if self.model_max_length > UNLIMITED_MODEL_MAX_LENGTH:  # no limit: transformers pads and cuts nothing
                padding_strategy = "do_not_pad" if padding_strategy == "max_length" else padding_strategy
                truncation_strategy = "do_not_truncate"
            else:
                max_length = self.model_max_length
        if (
            truncation_strategy != "do_not_truncate"
            and padding_strategy != "do_not_pad"
            and pad_to_multiple_of is not None
            and max_length % pad_to_multiple_of != 0
        ):
            raise ValueError(
                f"truncation length {max_length} is not a multiple of pad_to_multiple_of {pad_to_multiple_of}"
            )
        return padding_strategy, truncation_strategy, max_length

    def _configure_backend(self, padding_strategy, truncation_strategy, max_length, pad_to_multiple_of) -> None:
        if truncation_strategy == "do_not_truncate":
            self._backend.no_truncation()
        else:
            self._backend.enable_truncation(max_length, strategy=truncation_strategy, direction="right")
        if padding_strategy == "do_not_pad":
            self._backend.no_padding()
        else:
            self._backend.enable_padding(
                direction="right",
                pad_id=self.pad_token_id,
                pad_token=PAD_TOKEN,
                length=max_length if padding_strategy == "max_length" else None,
                pad_to_multiple_of=pad_to_multiple_of,
            )

    # ----------------------------------------------------------------------------- decoding

    def decode(
        self,
        ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = False,
    ) -> str:
        """Text of one sequence of ids (list, numpy or jax array of shape (seq_len,), or one int).

        `skip_special_tokens` drops `<s>`, `</s>`, `<pad>`, `<unk>` and `<mask>`.
        `clean_up_tokenization_spaces` (off, as in transformers for BART) removes the space
        before punctuation and contractions, which changes text such as "a ." for BPE.
        """
        text = self._backend.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = False,
    ) -> list[str]:
        """Texts of a batch of id sequences (array of shape (batch, seq_len) or a list of lists)."""
        is_array = hasattr(sequences, "ndim")  # numpy or jax
        if (is_array and sequences.ndim != 2) or (
            not is_array and (not isinstance(sequences, (list, tuple)) or any(np.ndim(ids) != 1 for ids in sequences))
        ):
            raise ValueError("batch_decode takes a batch of id sequences: shape (batch, seq_len) or a list of lists")
        texts = self._backend.decode_batch(
            [self._checked_ids(ids) for ids in sequences], skip_special_tokens=skip_special_tokens
        )
        return [clean_up_tokenization(text) for text in texts] if clean_up_tokenization_spaces else texts

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> str | list[str]:
        """Token strings of ids; one int gives one str."""
        if isinstance(ids, (int, np.integer)):
            return self._backend.id_to_token(self._checked_ids(ids)[0])
        special_ids = {self._backend.token_to_id(token) for token in SPECIAL_TOKENS} if skip_special_tokens else set()
        return [self._backend.id_to_token(i) for i in self._checked_ids(ids) if i not in special_ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Ids of token strings; unknown tokens give `unk_token_id`."""
        if isinstance(tokens, str):
            token_id = self._backend.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def _checked_ids(self, ids: Any) -> list[int]:
        """Ids as a list of Python ints, each checked to be in the vocabulary."""
        array = np.asarray(ids)
        if array.ndim > 1:
            raise ValueError(f"expected one sequence of ids, got an array of shape {array.shape}")
        array = array.reshape(-1)
        if array.size == 0:
            return []
        if array.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {array.dtype}")
        out_of_vocab = array[(array < 0) | (array >= self.vocab_size)]
        if out_of_vocab.size:
            raise ValueError(f"token id {int(out_of_vocab[0])} is not in the vocabulary (ids 0..{self.vocab_size - 1})")
        return array.tolist()


def _batch_of_inputs(text, text_pair) -> tuple[list, bool]:
    """The backend's batch (texts or (text, pair) tuples) and whether the input was a batch."""
    if isinstance(text, str):
        if text_pair is not None and not isinstance(text_pair, str):
            raise ValueError(f"text_pair of one text must be a str, got {type(text_pair).__name__}")
        # transformers tokenizes an empty text_pair as no pair.
        return [(text, text_pair) if text_pair else text], False
    if not isinstance(text, (list, tuple)) or not text or not all(isinstance(t, str) for t in text):
        raise ValueError("text must be a str or a non-empty list of str")
    if text_pair is None:
        return list(text), True
    if (
        not isinstance(text_pair, (list, tuple))
        or len(text_pair) != len(text)
        or not all(isinstance(t, str) for t in text_pair)
    ):
        raise ValueError(f"text_pair of a batch must be a list of {len(text)} str, like text")
    return list(zip(text, text_pair)), True


def _stack(name: str, rows: list[list[int]]) -> np.ndarray:
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        raise ValueError(
            f"cannot stack {name} of lengths {sorted(lengths)} into an array: pass padding=True or 'max_length'"
        )
    return np.asarray(rows, dtype=np.int64)
