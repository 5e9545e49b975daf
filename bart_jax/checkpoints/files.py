"""Checkpoint directories on disk: Hugging Face model directories and the converted bart_jax format.

A Hugging Face directory holds `config.json` and weights as `model.safetensors`, sharded
safetensors with `model.safetensors.index.json`, or `pytorch_model.bin` (possibly sharded).
Safetensors files are read with `safetensors.numpy`; torch is imported only for `.bin` files.

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
from typing import Any, Callable

import numpy as np
import safetensors.numpy
from flax import traverse_util
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import SafetensorError

from bart_jax.checkpoints.conversion import Params, cast_params, check_params, convert_hf_state_dict, flax_to_hf
from bart_jax.config import BartConfig
from bart_jax.model import quantization
from bart_jax.model.registry import check_head, head_from_config

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
# In the order transformers prefers them.
HF_WEIGHT_NAMES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, TORCH_WEIGHTS_NAME, TORCH_WEIGHTS_INDEX_NAME)
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


# --- reading Hugging Face weights ---------------------------------------------------------
def check_weights(tensors: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """Refuses tensors that are not floating point or hold NaN or infinite values, naming them and
    `path`: a corrupt data section parses as well as a sound one and would load as NaN weights."""
    # By name: ml_dtypes' bfloat16 (and float8) are not of numpy's floating kind "f".
    not_float = [f"{key} ({array.dtype})" for key, array in tensors.items()
                 if not np.dtype(array.dtype).name.startswith(("float", "bfloat"))
                 and not quantization.is_qvalue(key, array)]
    if not_float:
        raise ValueError(f"{path}: weights must be floating point, found {', '.join(not_float[:8])}")
    # min and max propagate NaN and reach any infinity, without a temporary as large as the tensor.
    not_finite = [key for key, array in tensors.items()
                  if array.size and not (np.isfinite(array.min()) and np.isfinite(array.max()))]
    if not_finite:
        raise ValueError(f"{path}: tensor(s) {', '.join(not_finite[:8])} hold NaN or infinite values (corrupt file)")
    return tensors


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        tensors = safetensors.numpy.load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    return check_weights(tensors, path)


def _torch_to_numpy(tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16; reinterpret the bits as ml_dtypes' (the type JAX uses).
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports a corrupt file with many exception types
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return check_weights({key: _torch_to_numpy(value) for key, value in loaded.items()}, path)


def _read_sharded(index_path: str, read_shard: Callable[[str], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index_path} is not a valid shard index ({error!r})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path} is not a valid shard index (weight_map is not a mapping)")
    directory = os.path.dirname(index_path)
    state_dict: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
            raise ValueError(f"{index_path} lists shard {shard}, which is missing")
        tensors = read_shard(shard_path)
        absent = [key for key, name in weight_map.items() if name == shard and key not in tensors]
        if absent:
            raise ValueError(f"{shard_path} lacks tensors its index puts there: {', '.join(absent[:8])}")
        state_dict.update(tensors)
    return state_dict


def load_hf_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """The weights of a Hugging Face model directory as {key: numpy array}, shapes as stored
    (linear weights [out, in]), dtypes as stored (bf16 as `ml_dtypes.bfloat16`)."""
    directory = os.fspath(directory)
    readers = {
        SAFE_WEIGHTS_NAME: _read_safetensors,
        SAFE_WEIGHTS_INDEX_NAME: lambda path: _read_sharded(path, _read_safetensors),
        TORCH_WEIGHTS_NAME: _read_torch_bin,
        TORCH_WEIGHTS_INDEX_NAME: lambda path: _read_sharded(path, _read_torch_bin),
    }
    for name in HF_WEIGHT_NAMES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return readers[name](path)
    raise ValueError(f"no weights in {directory}: expected one of {', '.join(HF_WEIGHT_NAMES)}")


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


def _read_marker(directory: str) -> dict:
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


def load_converted(directory: str | os.PathLike) -> tuple[BartConfig, Params, str]:
    """(config, params as numpy arrays, head) of a converted bart_jax directory."""
    directory = os.fspath(directory)
    marker = _read_marker(directory)
    head, config = marker["head"], BartConfig.from_pretrained(directory)
    params = traverse_util.unflatten_dict(_read_safetensors(os.path.join(directory, CONVERTED_PARAMS_NAME)), sep="/")
    if marker.get("quantize") is not None:  # int8 weights with their scales
        params = quantization.from_arrays(params, marker["quantize"])
    check_params(params, config, head)
    return config, params, head


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
