"""`BartConfig`: the model hyper-parameters, field for field as `transformers.BartConfig`.

The config is immutable and hashable so that it can be a static argument of `jax.jit`
and an attribute of Flax modules. Keys of a Hugging Face `config.json` that do not
change the math (`architectures`, `transformers_version`, task-specific params, ...)
are kept in `extra` and written back by `to_dict`, so a config round-trips unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

CONFIG_NAME = "config.json"

ACTIVATIONS = (
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "relu",
    "silu",
    "swish",
    "tanh",
    "sigmoid",
)
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclasses.dataclass(frozen=True)
class BartConfig:
    """Hyper-parameters of a BART model; defaults are those of `transformers.BartConfig` (bart-large)."""

    vocab_size: int = 50265
    max_position_embeddings: int = 1024
    encoder_layers: int = 12
    encoder_ffn_dim: int = 4096
    encoder_attention_heads: int = 16
    decoder_layers: int = 12
    decoder_ffn_dim: int = 4096
    decoder_attention_heads: int = 16
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    activation_function: str = "gelu"
    d_model: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    classifier_dropout: float = 0.0
    scale_embedding: bool = False
    use_cache: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    is_encoder_decoder: bool = True
    decoder_start_token_id: int = 2
    forced_eos_token_id: int | None = 2
    is_decoder: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    # Label names, as ((id, name), ...) so that the config stays hashable.
    id2label: tuple[tuple[int, str], ...] = ((0, "LABEL_0"), (1, "LABEL_1"), (2, "LABEL_2"))
    problem_type: str | None = None
    # Keys of config.json that bart_jax does not interpret, kept for the round trip.
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by encoder_attention_heads "
                f"({self.encoder_attention_heads})"
            )
        if self.d_model % self.decoder_attention_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by decoder_attention_heads "
                f"({self.decoder_attention_heads})"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"choose one of {', '.join(ACTIVATIONS)}"
            )
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type {self.problem_type!r} must be one of {PROBLEM_TYPES} or None")
        ids = [i for i, _ in self.id2label]
        if ids != list(range(len(ids))):
            raise ValueError(f"id2label must map 0..num_labels-1, got ids {ids}")

    # --- derived values -------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label}

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def extra_dict(self) -> dict[str, Any]:
        return {key: json.loads(value) for key, value in self.extra}

    @property
    def architectures(self) -> list[str]:
        return list(self.extra_dict.get("architectures") or [])

    def replace(self, **changes) -> "BartConfig":
        """A copy with fields changed; `num_labels=n` resets the label names as transformers does."""
        num_labels = changes.pop("num_labels", None)
        if num_labels is not None and "id2label" not in changes:
            changes["id2label"] = tuple((i, f"LABEL_{i}") for i in range(num_labels))
        if "id2label" in changes and isinstance(changes["id2label"], Mapping):
            changes["id2label"] = _id2label_from_mapping(changes["id2label"])
        return dataclasses.replace(self, **changes)

    # --- (de)serialisation ----------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BartConfig":
        """Builds a config from a Hugging Face `config.json` dictionary.

        Raises ValueError for a config of another model type.
        """
        data = dict(data)
        model_type = data.get("model_type", "bart")
        if model_type != "bart":
            raise ValueError(f"not a BART config: model_type is {model_type!r}, expected 'bart'")
        field_names = {f.name for f in dataclasses.fields(cls)} - {"id2label", "extra"}
        kwargs = {name: data.pop(name) for name in list(data) if name in field_names}
        for alias, name in (("hidden_size", "d_model"), ("num_hidden_layers", "encoder_layers"),
                            ("num_attention_heads", "encoder_attention_heads")):
            if alias in data and name not in kwargs:
                kwargs[name] = data.pop(alias)
        for name in ("eos_token_id", "forced_eos_token_id"):
            if isinstance(kwargs.get(name), list):
                # bart_jax models have a single EOS id; transformers allows a list.
                if len(kwargs[name]) != 1:
                    raise ValueError(f"{name} must be a single id, got {kwargs[name]}")
                kwargs[name] = kwargs[name][0]
        id2label = data.pop("id2label", None)
        num_labels = data.pop("num_labels", None)
        data.pop("label2id", None)
        if id2label is not None:
            kwargs["id2label"] = _id2label_from_mapping(id2label)
        elif num_labels is not None:
            kwargs["id2label"] = tuple((i, f"LABEL_{i}") for i in range(int(num_labels)))
        for key in ("pad_token_id", "bos_token_id", "decoder_start_token_id"):
            if key in kwargs and kwargs[key] is None:
                raise ValueError(f"{key} must be set in a BART config")
        kwargs["extra"] = tuple(sorted((key, json.dumps(value)) for key, value in data.items()))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dictionary (unknown keys from the source included)."""
        out: dict[str, Any] = {"model_type": "bart"}
        out.update(self.extra_dict)
        for field in dataclasses.fields(self):
            if field.name in ("id2label", "extra"):
                continue
            out[field.name] = getattr(self, field.name)
        out["id2label"] = {str(i): name for i, name in self.id2label}
        out["label2id"] = self.label2id
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "BartConfig":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON: {error}") from None
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "BartConfig":
        """Reads `config.json` from a model directory."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"no {CONFIG_NAME} in {directory}")
        return cls.from_json_file(path)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


def _id2label_from_mapping(mapping: Mapping[Any, str]) -> tuple[tuple[int, str], ...]:
    return tuple(sorted((int(i), str(name)) for i, name in mapping.items()))
