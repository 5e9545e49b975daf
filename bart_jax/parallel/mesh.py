"""The device mesh: axes ("data", "fsdp", "tensor") and the presets of the usual strategies.

    data parallel    data=N            batch split; parameters replicated
    FSDP (ZeRO-3)    fsdp=N            batch split; parameters, gradients and optimizer state
                                       split along `embed`, gathered per layer by the partitioner
    tensor parallel  tensor=N          Megatron: q/k/v and fc1 column-parallel, out_proj and fc2
                                       row-parallel, heads split; vocab-parallel embedding/LM head
    combinations     data=2, tensor=4  ... any product of the three that uses every device
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")

# Mesh shapes (-1: every remaining device) of the usual strategies; see `preset_mesh`.
PRESETS = {
    "data": dict(data=-1),
    "fsdp": dict(fsdp=-1),
    "tensor": dict(tensor=-1),
    "data+tensor": dict(data=-1, tensor=2),
    "fsdp+tensor": dict(fsdp=-1, tensor=2),
    "data+fsdp+tensor": dict(data=2, fsdp=-1, tensor=2),
}

def make_mesh(data: Optional[int] = None, fsdp: int = 1, tensor: int = 1, *,
              devices: Optional[Sequence] = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor") over `devices` (default: all, every process).

    One size may be -1: whatever the others leave; `data` defaults to that unless another size
    is -1 (then to 1). The sizes must multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        data = 1 if -1 in (fsdp, tensor) else -1
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    if any(not isinstance(size, int) or size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh axis sizes must be positive integers or -1, got {sizes}")
    unknown = [name for name, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into a mesh with {sizes}")
        sizes[unknown[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, there are {len(devices)}")
    # Auto axes: the partitioner propagates shardings between the annotated points.
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def preset_mesh(preset: str, devices: Optional[Sequence] = None) -> Mesh:
    """The mesh of a named strategy (`PRESETS`: "data", "fsdp", "tensor", "fsdp+tensor", ...)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown sharding preset {preset!r}; choose one of {sorted(PRESETS)}")
    return make_mesh(**PRESETS[preset], devices=devices)
