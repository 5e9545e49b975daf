"""The chips `bart-jax aot` compiles for: their published figures (for the roofline estimate
and the memory check) and the topologies libtpu's compiler knows them by.

Figures are per chip, as published by the vendor (docs/aot.md gives each source): peak dense
bf16 matrix throughput, HBM capacity and HBM bandwidth. A v4 or v5p chip is one JAX device
(its two TensorCores run as one "megacore").
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

GB = 10**9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    platform: str  # the JAX platform: "tpu" or "cuda"
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    source: str  # where the vendor publishes the figures
    # libtpu's name of the chip in a topology ("v5e:2x4") and its core arrangement.
    topology_prefix: Optional[str] = None
    chip_config_name: str = "default"


CHIPS = {
    "v4": Chip("v4", "tpu", 275e12, 32 * GIB, 1200 * GB, "https://cloud.google.com/tpu/docs/v4", "v4", "megacore"),
    "v5e": Chip("v5e", "tpu", 197e12, 16 * GIB, 819 * GB, "https://cloud.google.com/tpu/docs/v5e", "v5e"),
    "v5p": Chip("v5p", "tpu", 459e12, 95 * GIB, 2765 * GB, "https://cloud.google.com/tpu/docs/v5p", "v5",
                "megacore"),
    "v6e": Chip("v6e", "tpu", 918e12, 32 * GB, 1640 * GB, "https://cloud.google.com/tpu/docs/v6e", "v6e"),
    # H100 SXM: 1,979 TFLOP/s bf16 "with sparsity", half of it dense.
    "h100": Chip("h100", "cuda", 989e12, 80 * GB, 3350 * GB,
                 "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM)"),
}

# Names a topology may start with -> the chip ("v5" and "v5p" are the same chip).
_TOPOLOGY_CHIPS = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5": "v5p", "v5p": "v5p", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """What `jax.experimental.topologies.get_topology_desc` needs, and the chip."""

    chip: Chip
    topology_name: str  # libtpu's name, e.g. "v5e:2x4" or "v5:2x2x1"
    chips: int
    chips_per_host_bounds: tuple[int, int, int]

    def describe(self, num_slices: int = 1):
        """The compile-only TPU devices of this topology (needs libtpu)."""
        from jax.experimental import topologies

        return topologies.get_topology_desc(
            platform="tpu", topology_name=self.topology_name, chip_config_name=self.chip.chip_config_name,
            chips_per_host_bounds=self.chips_per_host_bounds, num_slices=num_slices)


def parse_topology(text: str) -> Topology:
    """A topology from libtpu's name ("v5e:2x4", "v5p:2x2x1", "v4:2x2x1") or a Cloud TPU
    accelerator type ("v5e-8", "v6e-8", "v5p-8", "v4-8"; v4 and v5p count TensorCores, two
    per chip, so v5p-8 is four chips)."""
    text = text.strip().lower()
    named = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v5|v6e):(\d+(?:x\d+){1,2})", text)
    typed = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", text)
    if named:
        chip = CHIPS[_TOPOLOGY_CHIPS[named.group(1)]]
        dims = tuple(int(size) for size in named.group(2).split("x"))
    elif typed:
        chip = CHIPS[_TOPOLOGY_CHIPS[typed.group(1)]]
        count = int(typed.group(2)) // (2 if chip.chip_config_name == "megacore" else 1)
        dims = _shape_of(chip, count)
    else:
        raise ValueError(f"unknown TPU topology {text!r}; name it as libtpu does (v5e:2x4, v6e:2x4, v5p:2x2x1, "
                         "v4:2x2x1) or as an accelerator type (v5e-8, v6e-8, v5p-8, v4-8)")
    chips = math.prod(dims)
    # A host holds at most 2x2x1 chips of the slice, as Cloud TPU lays out multi-host slices.
    bounds = tuple(min(size, 2) if axis < 2 else 1 for axis, size in enumerate(dims + (1,) * (3 - len(dims))))
    name = f"{chip.topology_prefix}:{'x'.join(str(size) for size in dims)}"
    return Topology(chip, name, chips, bounds)


def _shape_of(chip: Chip, count: int) -> tuple[int, ...]:
    """The usual slice shape of `count` chips: 1x1, 2x2, 2x4, 4x4, ... for v5e/v6e; 2x2x1,
    2x2x2, 2x2x4, 2x4x4, 4x4x4, ... for v4/v5p."""
    megacore = chip.chip_config_name == "megacore"
    if count < (4 if megacore else 1) or count & (count - 1):
        raise ValueError(f"{chip.name} slices have a power-of-two number of chips"
                         f"{', at least 4' if megacore else ''}; got {count}")
    dims = [2, 2, 1] if megacore else [1, 1]
    while math.prod(dims) < count:
        smallest = min(dims)
        index = max(i for i, size in enumerate(dims) if size == smallest)
        dims[index] *= 2
    return tuple(dims)


def chip_for(platform: str, topology: Optional[str] = None) -> Chip:
    """The chip a run targets: the topology's for TPU, the H100 for CUDA."""
    if platform == "tpu":
        return parse_topology(topology or "v5e:2x4").chip
    return CHIPS["h100"]
