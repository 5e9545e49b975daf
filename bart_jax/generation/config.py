"""`GenerationConfig`: the options of `generate`, named and defaulted as in transformers.

The config is frozen and hashable so that it can be a static argument of `jax.jit`: one
compilation per (shapes, options). Lists given by the user or read from JSON
(`bad_words_ids`, `suppress_tokens`, several EOS ids) are stored as tuples.

`max_length=None` means "not set", as in transformers: generate 20 new tokens, capped at
the model's `max_position_embeddings`. `resolve` turns the relative options
(`max_new_tokens`, `min_new_tokens`) and the special-token fallbacks into the absolute
values the search loop uses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Mapping, Union

GENERATION_CONFIG_NAME = "generation_config.json"
MODEL_CONFIG_NAME = "config.json"

# transformers' default `max_length` when neither the user nor the checkpoint sets one.
DEFAULT_MAX_NEW_TOKENS = 20

TokenIds = Union[int, tuple[int, ...]]

# transformers generation options that bart_jax does not implement, with the values that
# leave generation unchanged. A config that sets one of them to anything else is refused
# rather than silently generating something transformers would not.
UNSUPPORTED_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "typical_p": (None, 1.0),
    "min_p": (None,),
    "top_h": (None,),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "encoder_repetition_penalty": (None, 1.0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False),
    "exponential_decay_length_penalty": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "guidance_scale": (None, 1.0),
    "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0),
    "constraints": (None,),
    "force_words_ids": (None,),
    "penalty_alpha": (None,),
    "dola_layers": (None,),
    "stop_strings": (None,),
    "max_time": (None,),
    "watermarking_config": (None,),
    "token_healing": (None, False),
    "prompt_lookup_num_tokens": (None,),
}


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Options of `generate`; field names and defaults are transformers' `GenerationConfig`."""

    # Length (counted in decoder tokens, the decoder start token included).
    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    early_stopping: bool | str = False
    # Strategy.
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    # Logits processing.
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    suppress_tokens: tuple[int, ...] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: TokenIds | None = None
    # Special tokens.
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: TokenIds | None = None
    decoder_start_token_id: int | None = None

    def __post_init__(self):
        for name in ("eos_token_id", "forced_eos_token_id"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                value = tuple(_token_id(name, v) for v in value)
                object.__setattr__(self, name, value[0] if len(value) == 1 else value)
        if self.bad_words_ids is not None:
            object.__setattr__(self, "bad_words_ids", _bad_words(self.bad_words_ids))
        if self.suppress_tokens is not None:
            object.__setattr__(
                self, "suppress_tokens", tuple(_token_id("suppress_tokens", t) for t in self.suppress_tokens)
            )
        self._validate()

    def _validate(self):
        def require(condition, message):
            if not condition:
                raise ValueError(message)

        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        require(self.max_length is None or (is_int(self.max_length) and self.max_length > 0),
                f"max_length must be a positive integer or None, got {self.max_length!r}")
        require(self.max_new_tokens is None or (is_int(self.max_new_tokens) and self.max_new_tokens > 0),
                f"max_new_tokens must be a positive integer or None, got {self.max_new_tokens!r}")
        require(is_int(self.min_length) and self.min_length >= 0,
                f"min_length must be a non-negative integer, got {self.min_length!r}")
        require(self.min_new_tokens is None or (is_int(self.min_new_tokens) and self.min_new_tokens >= 0),
                f"min_new_tokens must be a non-negative integer or None, got {self.min_new_tokens!r}")
        require(self.early_stopping in (True, False, "never"),
                f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        require(isinstance(self.do_sample, bool), f"do_sample must be a bool, got {self.do_sample!r}")
        require(is_int(self.num_beams) and self.num_beams >= 1,
                f"num_beams must be a positive integer, got {self.num_beams!r}")
        require(is_int(self.num_return_sequences) and self.num_return_sequences >= 1,
                f"num_return_sequences must be a positive integer, got {self.num_return_sequences!r}")
        if self.num_beams == 1:
            require(self.do_sample or self.num_return_sequences == 1,
                    "greedy search (do_sample=False, num_beams=1) returns one sequence per input; "
                    f"num_return_sequences={self.num_return_sequences} needs do_sample=True or num_beams > 1")
        else:
            require(self.num_return_sequences <= self.num_beams,
                    f"num_return_sequences ({self.num_return_sequences}) has to be smaller or equal to "
                    f"num_beams ({self.num_beams})")
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            value = getattr(self, name)
            # A string or NaN here would fail deep inside the search, or silently compare false.
            require(isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value),
                    f"{name} must be a number, got {value!r}")
        if self.do_sample:
            require(self.temperature > 0, f"temperature must be strictly positive, got {self.temperature!r}")
        require(is_int(self.top_k) and self.top_k >= 0, f"top_k must be a non-negative integer, got {self.top_k!r}")
        require(0.0 <= self.top_p <= 1.0, f"top_p must be in [0, 1], got {self.top_p!r}")
        require(self.repetition_penalty > 0,
                f"repetition_penalty must be strictly positive, got {self.repetition_penalty!r}")
        require(is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0,
                f"no_repeat_ngram_size must be a non-negative integer, got {self.no_repeat_ngram_size!r}")
        for name in ("pad_token_id", "bos_token_id", "decoder_start_token_id", "forced_bos_token_id"):
            value = getattr(self, name)
            if value is not None:
                _token_id(name, value)
        for name in ("eos_token_id", "forced_eos_token_id"):
            if getattr(self, name) is not None:
                _token_ids(name, getattr(self, name))
        if self.suppress_tokens:
            for name in ("forced_bos_token_id", "forced_eos_token_id"):
                forced = _token_ids(name, getattr(self, name))
                # Forcing a suppressed token leaves no finite logit: transformers refuses it too.
                require(not forced or not set(forced) <= set(self.suppress_tokens),
                        f"every token of {name} {forced} is also in suppress_tokens")

    # --- derived values -------------------------------------------------------------
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The EOS ids as a tuple (empty when there is none)."""
        return _token_ids("eos_token_id", self.eos_token_id)

    @property
    def forced_eos_token_ids(self) -> tuple[int, ...]:
        return _token_ids("forced_eos_token_id", self.forced_eos_token_id)

    @property
    def is_resolved(self) -> bool:
        return self.max_length is not None and self.max_new_tokens is None and self.min_new_tokens is None

    def replace(self, **overrides) -> "GenerationConfig":
        """A copy with options changed; unknown or unsupported option names raise ValueError."""
        fields = {f.name for f in dataclasses.fields(self)}
        for name, value in overrides.items():
            if name in UNSUPPORTED_NEUTRAL_VALUES:
                if value not in UNSUPPORTED_NEUTRAL_VALUES[name]:
                    raise ValueError(f"generation option {name!r} is not supported by bart_jax")
            elif name not in fields:
                raise ValueError(f"unknown generation option {name!r}; known options: {', '.join(sorted(fields))}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if k in fields})

    def resolve(self, prompt_length: int, max_position_embeddings: int | None = None) -> "GenerationConfig":
        """The absolute options the search loop uses, computed as transformers' `generate` does.

        prompt_length: decoder tokens before generation (1 for BART: the decoder start token).
        max_position_embeddings: caps the default length (when `max_length` is not set).
        Sets `max_length` / `min_length` from `max_new_tokens` / `min_new_tokens`, `pad_token_id`
        falls back to the first EOS id and `decoder_start_token_id` to `bos_token_id`.
        Raises ValueError when nothing is left to generate.
        """
        max_length = self.max_length
        if self.max_new_tokens is not None:
            max_length = self.max_new_tokens + prompt_length
        elif max_length is None:
            max_length = DEFAULT_MAX_NEW_TOKENS + prompt_length
            if max_position_embeddings is not None:
                max_length = min(max_length, max_position_embeddings)
        min_length = self.min_length if self.min_new_tokens is None else self.min_new_tokens + prompt_length
        if prompt_length >= max_length:
            raise ValueError(
                f"the decoder prompt has {prompt_length} token(s) but max_length is {max_length}: nothing to "
                "generate; increase max_length or set max_new_tokens"
            )
        pad_token_id = self.pad_token_id
        if pad_token_id is None and self.eos_token_ids:
            pad_token_id = self.eos_token_ids[0]
        start = self.decoder_start_token_id if self.decoder_start_token_id is not None else self.bos_token_id
        return dataclasses.replace(
            self, max_length=max_length, max_new_tokens=None, min_length=min_length, min_new_tokens=None,
            pad_token_id=pad_token_id, decoder_start_token_id=start,
        )

    # --- (de)serialisation ----------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerationConfig":
        """Reads the options of a transformers generation (or legacy model) config dictionary.

        Keys that are not generation options are ignored; `None` means "default", as in
        transformers. Raises ValueError for an option bart_jax does not implement.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        for name, neutral in UNSUPPORTED_NEUTRAL_VALUES.items():
            if name in data and data[name] not in neutral:
                raise ValueError(f"generation option {name!r}={data[name]!r} is not supported by bart_jax")
        kwargs = {key: value for key, value in data.items() if key in fields and value is not None}
        if data.get("force_bos_token_to_be_generated") and "forced_bos_token_id" not in kwargs:
            # Legacy BART configs spell forced_bos_token_id this way.
            kwargs["forced_bos_token_id"] = data.get("bos_token_id")
        return cls(**kwargs)

    @classmethod
    def from_model_config(cls, model_config: Any) -> "GenerationConfig":
        """The generation options stored in a model config (a `to_dict()`-able config or a mapping)."""
        data = model_config if isinstance(model_config, Mapping) else model_config.to_dict()
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "GenerationConfig":
        """Reads `generation_config.json`, or else the generation options of `config.json`."""
        for name in (GENERATION_CONFIG_NAME, MODEL_CONFIG_NAME):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    try:
                        return cls.from_dict(json.load(f))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path} is not valid JSON: {error}") from None
        raise ValueError(f"neither {GENERATION_CONFIG_NAME} nor {MODEL_CONFIG_NAME} in {directory}")

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-able dictionary (tuples become lists), as transformers writes them."""
        def plain(value):
            return [plain(v) for v in value] if isinstance(value, tuple) else value

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, GENERATION_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


def _token_id(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must hold non-negative integer token ids, got {value!r}")
    return value


def _token_ids(name: str, value: TokenIds | None) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, tuple) else (value,)
    return tuple(_token_id(name, v) for v in values)


def _bad_words(value: Any) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"bad_words_ids must be a non-empty list of lists of token ids, got {value!r}")
    words = []
    for word in value:
        if not isinstance(word, (list, tuple)) or not word:
            raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {value!r}")
        words.append(tuple(_token_id("bad_words_ids", t) for t in word))
    return tuple(words)
