"""Checkpoint directories on disk: Hugging Face model directories and the converted bart_jax format.

A Hugging Face directory holds `config.json` and weights as `model.safetensors`, sharded
safetensors with `model.safetensors.index.json`, or `pytorch_model.bin` (possibly sharded); they
are read by bart_jax/checkpoints/reader.py, safetensors a tensor at a time.

A converted bart_jax directory holds `config.json`, the source's `generation_config.json` and
tokenizer files, `params.safetensors` keyed by Flax paths joined with "/" (e.g.
`model/encoder/layers_0/self_attn/q_proj/weight`), and the marker `bart_jax.json`
({"format_version", "head", "dtype"}; a quantized tree adds "quantize" and "quantize_layers",
and stores each int8 weight as `<path>/qvalue` (int8) and `<path>/scale` (float32 [out, 1])).

The whole-directory conversions (`convert_hf_directory`, `export_hf_directory`) refuse a
destination that already holds a model unless asked to overwrite it (`check_destination`): writing
a config next to other weights would leave a directory whose config and weights disagree.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Callable, Mapping, Optional

import numpy as np
import safetensors.numpy
from flax import traverse_util
from huggingface_hub import split_state_dict_into_shards_factory

from bart_jax.checkpoints.conversion import (
    Params,
    cast_params,
    check_params,
    check_shapes,
    convert_hf_state_dict,
    flax_to_hf,
    hf_key,
)
from bart_jax.checkpoints.reader import (  # noqa: F401 (the names files.py has always offered)
    HF_WEIGHT_NAMES,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    TORCH_WEIGHTS_INDEX_NAME,
    TORCH_WEIGHTS_NAME,
    check_weights,
    load_hf_state_dict,
    open_hf_state_dict,
    open_safetensors,
)
from bart_jax.config import BartConfig
from bart_jax.model import quantization
from bart_jax.model.registry import check_head, head_from_config

GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)

CONVERTED_MARKER_NAME = "bart_jax.json"
CONVERTED_PARAMS_NAME = "params.safetensors"
CONFIG_NAME = "config.json"
# The files that make a directory hold a model, Hugging Face or converted.
MODEL_FILES = (CONFIG_NAME, *HF_WEIGHT_NAMES, CONVERTED_PARAMS_NAME, CONVERTED_MARKER_NAME)
# Version 2: linear weights [out, in] named `weight` (version 1: Flax `kernel` [in, out]).
CONVERTED_FORMAT_VERSION = 2
DTYPES = ("float32", "bfloat16")


# --- writing ----------------------------------------------------------------------------
def _with_extra(config: BartConfig, **entries: Any) -> BartConfig:
    extra = dict(config.extra)
    extra.update({key: json.dumps(value) for key, value in entries.items()})
    return config.replace(extra=tuple(sorted(extra.items())))


def _float_dtype_name(arrays) -> str | None:
    """The name of the one floating-point dtype of `arrays`, or None if they mix several."""
    dtypes = {np.dtype(array.dtype) for array in arrays}
    # ml_dtypes' bfloat16 is not a numpy floating kind ("f"), hence the name check.
    names = {dtype.name for dtype in dtypes if dtype.kind == "f" or dtype.name == "bfloat16"}
    return names.pop() if len(names) == 1 else None


def _with_dtype(config: BartConfig, dtype: str | None, **entries: Any) -> BartConfig:
    """`config` with extra entries set, and its `dtype` entry (transformers 5) when known."""
    return _with_extra(config, **entries, **({"dtype": dtype} if dtype else {}))


def _copy_side_files(source: str | os.PathLike | None, directory: str) -> None:
    """Copies the generation config and tokenizer files that `source` has."""
    if source is None:
        return
    for name in (GENERATION_CONFIG_NAME, *TOKENIZER_FILES):
        path = os.path.join(source, name)
        target = os.path.join(directory, name)
        if os.path.isfile(path) and not (os.path.exists(target) and os.path.samefile(path, target)):
            shutil.copyfile(path, target)


def save_hf_directory(
    params: Params,
    config: BartConfig,
    head: str,
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str | None = None,
    copy_files_from: str | os.PathLike | None = None,
) -> None:
    """Writes a Hugging Face model directory that `transformers.<head>.from_pretrained` loads
    with no missing or unexpected keys: config.json (architectures=[head]) and safetensors
    weights, sharded with an index when they exceed `max_shard_size` (e.g. "2GB")."""
    state_dict = flax_to_hf(params, config, head)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    if max_shard_size is None:
        files, sharded = {SAFE_WEIGHTS_NAME: list(state_dict)}, False
    else:
        split = split_state_dict_into_shards_factory(
            state_dict,
            get_storage_size=lambda array: array.nbytes,
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
        files, sharded = split.filename_to_tensors, split.is_sharded
    layout = SAFE_WEIGHTS_INDEX_NAME if sharded else SAFE_WEIGHTS_NAME
    stale = [name for name in HF_WEIGHT_NAMES if name != layout and os.path.exists(os.path.join(directory, name))]
    if stale:
        # transformers would pick up the stale file instead of the new weights.
        raise ValueError(f"{directory} already holds weights ({', '.join(stale)}); choose an empty directory")
    _with_dtype(config, _float_dtype_name(state_dict.values()), architectures=[head]).save_pretrained(directory)
    for filename, keys in files.items():
        shard = {key: state_dict[key] for key in keys}
        # transformers refuses safetensors files whose metadata lacks a known format.
        safetensors.numpy.save_file(shard, os.path.join(directory, filename), metadata={"format": "pt"})
    if sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        with open(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    _copy_side_files(copy_files_from, directory)


def save_converted(
    params: Params,
    config: BartConfig,
    head: str,
    directory: str | os.PathLike,
    *,
    copy_files_from: str | os.PathLike | None = None,
) -> None:
    """Writes a converted bart_jax directory (see the module docstring)."""
    check_params(params, config, head)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    flat = {key: np.ascontiguousarray(np.asarray(value))
            for key, value in traverse_util.flatten_dict(quantization.to_arrays(params), sep="/").items()}
    dtype = _float_dtype_name(quantization.unquantized_arrays(flat))  # int8 weights' float32 scales aside
    _with_dtype(config, dtype, architectures=[head]).save_pretrained(directory)
    safetensors.numpy.save_file(flat, os.path.join(directory, CONVERTED_PARAMS_NAME), metadata={"format": "flax"})
    marker = {"format_version": CONVERTED_FORMAT_VERSION, "head": head, "dtype": dtype or "mixed",
              **(quantization.quantization_of(params) or {})}
    with open(os.path.join(directory, CONVERTED_MARKER_NAME), "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2, sort_keys=True)
        f.write("\n")
    _copy_side_files(copy_files_from, directory)


# --- converted directories ----------------------------------------------------------------
def is_converted_directory(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, CONVERTED_MARKER_NAME))


def read_marker(directory: str | os.PathLike) -> dict:
    """The marker of a converted bart_jax directory ({"format_version", "head", "dtype"}, and
    "quantize", "quantize_layers" for int8 weights), checked."""
    path = os.path.join(directory, CONVERTED_MARKER_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{directory} is not a converted bart_jax directory (no {CONVERTED_MARKER_NAME})")
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if marker.get("format_version") != CONVERTED_FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {marker.get('format_version')!r}; this bart_jax reads "
            f"version {CONVERTED_FORMAT_VERSION}"
        )
    check_head(marker.get("head"))
    return marker


def load_converted(
    directory: str | os.PathLike, transform: Optional[Callable[[tuple[str, ...], Any], Any]] = None
) -> tuple[BartConfig, Params, str]:
    """(config, params, head) of a converted bart_jax directory: numpy arrays, int8 weights as
    `QuantizedWeight`s. Shapes are checked from the file's header before any tensor is read; then
    each parameter is read and passed through `transform(path, leaf)` (e.g. quantized and put on
    the device) before the next is read, so that the host never holds more than one at a time."""
    directory = os.fspath(directory)
    marker = read_marker(directory)
    head, config = marker["head"], BartConfig.from_pretrained(directory)
    tensors = open_safetensors(os.path.join(directory, CONVERTED_PARAMS_NAME))
    quantize = marker.get("quantize")
    owners = quantization.quantized_owners(tensors) if quantize is not None else set()
    # Flax path ("/"-joined) -> shape; an int8 weight's two arrays make one leaf, shaped as its qvalue.
    shapes = {}
    for key, shape in tensors.shapes.items():
        owner, _, name = key.rpartition("/")
        if owner in owners and name in quantization.ARRAYS:
            if name == quantization.QVALUE:
                shapes[owner] = shape
        else:
            shapes[key] = shape
    check_shapes(shapes, config, head)
    flat = {}
    for key in shapes:
        if key in owners:
            leaf = quantization.weight_from_arrays(key, tensors[f"{key}/{quantization.QVALUE}"],
                                                   tensors.get(f"{key}/{quantization.SCALE}"), quantize)
        else:
            leaf = tensors[key]
        path = tuple(key.split("/"))
        flat[path] = leaf if transform is None else transform(path, leaf)
    return config, traverse_util.unflatten_dict(flat), head


def open_converted_as_hf(directory: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """The float weights of a converted bart_jax directory under their Hugging Face names, each
    read on access: what `flax_to_hf` makes of `load_converted`, without reading it whole. Shapes
    are checked against the saved head first."""
    directory = os.fspath(directory)
    marker = read_marker(directory)
    tensors = open_safetensors(os.path.join(directory, CONVERTED_PARAMS_NAME))
    check_shapes(tensors.shapes, BartConfig.from_pretrained(directory), marker["head"])
    return tensors.renamed({hf_key(tuple(key.split("/"))): key for key in tensors})


# --- whole-directory conversions ----------------------------------------------------------
def model_files(directory: str | os.PathLike) -> list[str]:
    """The files of MODEL_FILES that `directory` holds."""
    return [name for name in MODEL_FILES if os.path.exists(os.path.join(directory, name))]


def check_destination(
    destination: str | os.PathLike, *, overwrite: bool = False, source: str | os.PathLike | None = None
) -> None:
    """Refuses a conversion's destination that is not a directory, that is the source, or that
    holds a model (a config, weights, a converted directory) unless `overwrite`."""
    destination = os.fspath(destination)
    if os.path.exists(destination) and not os.path.isdir(destination):
        raise ValueError(f"{destination} exists and is not a directory")
    if not os.path.isdir(destination):
        return
    if source is not None and os.path.isdir(source) and os.path.samefile(source, destination):
        raise ValueError(f"{destination} is the source directory; write the conversion to another directory")
    held = model_files(destination)
    if held and not overwrite:
        raise ValueError(f"{destination} already holds a model ({', '.join(held)}); choose another directory, "
                         f"or pass --overwrite to replace that model")


def _remove_weights(directory: str) -> None:
    """Removes the weights of `directory`, Hugging Face (and the shards its indexes list) or
    converted: they would not match the config written in their place."""
    for index_name in (SAFE_WEIGHTS_INDEX_NAME, TORCH_WEIGHTS_INDEX_NAME):
        index_path = os.path.join(directory, index_name)
        if not os.path.isfile(index_path):
            continue
        try:
            with open(index_path, encoding="utf-8") as f:
                shards = set(json.load(f)["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            shards = set()
        for shard in shards:
            path = os.path.join(directory, shard)
            if isinstance(shard, str) and os.path.basename(shard) == shard and os.path.isfile(path):
                os.remove(path)
    for name in (*HF_WEIGHT_NAMES, CONVERTED_PARAMS_NAME, CONVERTED_MARKER_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.remove(path)


@contextlib.contextmanager
def writing_destination(
    destination: str | os.PathLike, *, overwrite: bool = False, source: str | os.PathLike | None = None
):
    """Checks `destination` (`check_destination`) and creates it before any weights are read, so
    that an unwritable one fails at once; removes what it created when the conversion fails."""
    destination = os.fspath(destination)
    check_destination(destination, overwrite=overwrite, source=source)
    created = None  # the topmost directory created here
    if not os.path.exists(destination):
        created = os.path.abspath(destination)
        while not os.path.exists(os.path.dirname(created)):
            created = os.path.dirname(created)
    os.makedirs(destination, exist_ok=True)
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def convert_hf_directory(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    head: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> tuple[str, tuple[str, ...]]:
    """Converts a local Hugging Face model directory into a bart_jax directory.

    `head` defaults to the config's architecture; `dtype` ("float32" or "bfloat16") casts the
    floating-point weights. A destination holding a model is refused unless `overwrite`, which
    replaces it (weights there are removed first). Returns (head, checkpoint tensors that
    head does not use).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source, destination = os.fspath(source), os.fspath(destination)
    with writing_destination(destination, overwrite=overwrite, source=source):
        config = BartConfig.from_pretrained(source)
        head = head or head_from_config(config)
        check_head(head)
        conversion = convert_hf_state_dict(load_hf_state_dict(source), config, head)
        params = cast_params(conversion.params, dtype) if dtype else conversion.params
        _remove_weights(destination)
        save_converted(params, config, head, destination, copy_files_from=source)
    return head, conversion.unused_keys


def export_hf_directory(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
) -> str:
    """Writes a converted bart_jax directory back as a Hugging Face directory; returns the head.

    A destination holding a model is refused unless `overwrite`, which replaces it (weights there
    are removed first)."""
    source, destination = os.fspath(source), os.fspath(destination)
    with writing_destination(destination, overwrite=overwrite, source=source):
        config, params, head = load_converted(source)
        _remove_weights(destination)
        save_hf_directory(params, config, head, destination, max_shard_size=max_shard_size, copy_files_from=source)
    return head
