"""Reading weight files: safetensors (one file or shards with an index) and PyTorch `.bin` pickles.

Safetensors weights are read lazily: `open_hf_state_dict` and `open_safetensors` return a
`LazyTensors` mapping whose keys and shapes come from the files' headers and whose values are read
from disk when looked up, one tensor at a time, and not kept. A loader that converts, quantizes and
places each tensor before looking up the next never holds the float checkpoint whole (an int8
model loads without its float32 weights ever being resident together). `.bin` files are torch
pickles, which load whole; they come back as a dict.

Every tensor read is checked (`check_weights`): a corrupt data section parses as well as a sound
one and would load as NaN weights.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from bart_jax.model import quantization

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
# In the order transformers prefers them.
HF_WEIGHT_NAMES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, TORCH_WEIGHTS_NAME, TORCH_WEIGHTS_INDEX_NAME)


def check_weights(tensors: Mapping[str, np.ndarray], path: str) -> Mapping[str, np.ndarray]:
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


def _unreadable(path: str, error: Exception | str) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors file ({error})")


# safetensors dtype names -> numpy (little-endian, as the format stores them).
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
           "F8_E5M2": ml_dtypes.float8_e5m2, "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
           "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
# XLA's CPU client takes a buffer aligned this way as it is (jax.device_put makes no copy).
_ALIGNMENT = 64


class _Stored(NamedTuple):
    """Where a tensor lies: its file, its name there, dtype name, shape, and byte range in the file."""

    path: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _read(stored: _Stored) -> np.ndarray:
    """The tensor `stored` as a fresh numpy array whose data starts on an _ALIGNMENT boundary.

    Read with plain reads into that array, not through a memory map: the pages of a map count as
    resident while it is open, a second copy of the tensor while it is read."""
    if stored.dtype not in _DTYPES:  # a dtype numpy lacks: safetensors' own reader
        with safe_open(stored.path, framework="numpy") as f:
            return f.get_tensor(stored.name)
    size = stored.end - stored.begin
    raw = np.empty(size + _ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % _ALIGNMENT
    data = raw[offset:offset + size]
    with open(stored.path, "rb") as f:
        f.seek(stored.begin)
        if f.readinto(data) != size:
            raise _unreadable(stored.path, f"{stored.name}'s data ends early; the file changed after it was opened")
    return data.view(_DTYPES[stored.dtype]).reshape(stored.shape)


class LazyTensors(Mapping[str, np.ndarray]):
    """{key: numpy array} over safetensors files, each value read from disk when looked up (shape
    as stored, bf16 as `ml_dtypes.bfloat16`) and checked (`check_weights`); nothing is cached, so
    a caller that drops each tensor before looking up the next holds one at a time. `shapes`
    gives every tensor's shape without reading it; `in`, `len` and iteration read nothing."""

    def __init__(self, locations: Mapping[str, _Stored]):
        self._locations = dict(locations)
        self.shapes = {key: stored.shape for key, stored in self._locations.items()}

    def __getitem__(self, key: str) -> np.ndarray:
        stored = self._locations[key]
        try:
            array = _read(stored)
        except (SafetensorError, OSError) as error:
            raise _unreadable(stored.path, error) from None
        return check_weights({key: array}, stored.path)[key]

    def __contains__(self, key: object) -> bool:
        return key in self._locations  # Mapping's default would read the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._locations)

    def __len__(self) -> int:
        return len(self._locations)

    def renamed(self, names: Mapping[str, str]) -> LazyTensors:
        """The tensors under new keys: `names` maps each new key to a key of this mapping."""
        return LazyTensors({new: self._locations[old] for new, old in names.items()})

    @classmethod
    def union(cls, parts: Iterable[LazyTensors]) -> LazyTensors:
        locations = {}
        for part in parts:
            locations.update(part._locations)
        return cls(locations)


def open_safetensors(path: str) -> LazyTensors:
    """The tensors of a safetensors file, read on access; ValueError naming `path` if its header
    is unreadable or does not cover the file (a truncated download)."""
    try:
        # safetensors checks the header (offsets in order, covering the file) ...
        with safe_open(path, framework="numpy"):
            pass
        # ... which then gives each tensor's place: 8 bytes of header size, the JSON header, the data.
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
    except (SafetensorError, OSError) as error:
        raise _unreadable(path, error) from None
    data = 8 + header_size
    return LazyTensors({
        key: _Stored(path, key, entry["dtype"], tuple(entry["shape"]), data + entry["data_offsets"][0],
                     data + entry["data_offsets"][1])
        for key, entry in header.items() if key != "__metadata__"
    })


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
    return dict(check_weights({key: _torch_to_numpy(value) for key, value in loaded.items()}, path))


def _read_shards(index_path: str, read_shard: Callable[[str], Mapping[str, np.ndarray]]) -> Iterator[Mapping]:
    """The shards a shard index lists, each read by `read_shard`, after checking that it exists
    and holds the tensors the index puts there."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index_path} is not a valid shard index ({error!r})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path} is not a valid shard index (weight_map is not a mapping)")
    directory = os.path.dirname(index_path)
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
            raise ValueError(f"{index_path} lists shard {shard}, which is missing")
        tensors = read_shard(shard_path)
        absent = [key for key, name in weight_map.items() if name == shard and key not in tensors]
        if absent:
            raise ValueError(f"{shard_path} lacks tensors its index puts there: {', '.join(absent[:8])}")
        yield tensors


def _read_torch_shards(index_path: str) -> dict[str, np.ndarray]:
    state_dict: dict[str, np.ndarray] = {}
    for tensors in _read_shards(index_path, _read_torch_bin):
        state_dict.update(tensors)
    return state_dict


def open_hf_state_dict(directory: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """The weights of a Hugging Face model directory as {key: numpy array}, shapes as stored
    (linear weights [out, in]), dtypes as stored (bf16 as `ml_dtypes.bfloat16`): a `LazyTensors`
    for safetensors (files and shard index checked now, each tensor read when looked up), a dict
    for `.bin` files (torch pickles load whole)."""
    directory = os.fspath(directory)
    readers = {
        SAFE_WEIGHTS_NAME: open_safetensors,
        SAFE_WEIGHTS_INDEX_NAME: lambda path: LazyTensors.union(_read_shards(path, open_safetensors)),
        TORCH_WEIGHTS_NAME: _read_torch_bin,
        TORCH_WEIGHTS_INDEX_NAME: _read_torch_shards,
    }
    for name in HF_WEIGHT_NAMES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return readers[name](path)
    raise ValueError(f"no weights in {directory}: expected one of {', '.join(HF_WEIGHT_NAMES)}")


def load_hf_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """`open_hf_state_dict` with every tensor read: a dict holding the whole checkpoint."""
    return dict(open_hf_state_dict(directory))
