"""Host memory set-up for training on CPU (train.py): freed blocks stay mapped for the next step.

XLA's CPU runtime allocates each execution's temporaries anew and frees them when it ends (a
bart-base train step at batch 8 x 512: one block of about 4 GiB). glibc's malloc serves a block
that large with `mmap` and gives it back with `munmap`, so every step faults all its pages in
again, each zeroed by the kernel: about a million page faults, 20-25% of that train step on 2
cores. Kept in the process's heap instead, the next step reuses the same pages.

That takes three settings, made before JAX starts its CPU backend:
- executions run on the calling thread (`jax_cpu_enable_async_dispatch` off). The block then
  comes from the main thread's heap, which may grow that large (glibc's other threads' heaps stop
  at 64 MiB and fall back to `mmap`), and it is freed before the call returns, at the top of the
  heap, where the next step's block starts again;
- malloc never uses `mmap` for large blocks (`M_MMAP_MAX` 0);
- malloc never gives the top of its heap back to the system (`M_TRIM_THRESHOLD` -1).

The cost: the process keeps its high-water mark of heap memory resident, and a step no longer
overlaps the Python work that dispatches the next one, which for steps of seconds is noise. A
training step's peak stays about the same (bart-base: +1.5%); generation is left as it is: one
long execution per batch gains nothing, and blocks freed while loading the weights, reused in
place, left its peak 0.5 GiB higher. Other platforms and allocators are left as they are:
`training_on_cpu` tells, before JAX starts, whether this process will train on its CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import logging
import os
import sys
from typing import Optional

import jax

logger = logging.getLogger(__name__)

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def _glibc():
    """The C library if it is glibc (it has `mallopt` and `gnu_get_libc_version`), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return None
    return libc


# Accelerator plugins, and the device files without which each cannot find a device.
ACCELERATORS = (
    (("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12"), "/dev/nvidia[0-9]*"),
    (("jax_rocm60_plugin", "jax_rocm7_plugin", "jax_plugins.xla_rocm60"), "/dev/kfd"),
    (("libtpu",), "/dev/accel*"),
    (("libtpu",), "/dev/vfio/[0-9]*"),
)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def training_on_cpu(platforms: Optional[str] = None) -> bool:
    """Whether JAX will run this process's computations on its CPU, decided without starting JAX
    (starting it would fix the CPU client's settings): by `platforms` (default: JAX's
    `jax_platforms`, as `JAX_PLATFORMS` sets it) when given, else by whether an accelerator plugin
    is installed and finds its device files."""
    if platforms is None:
        platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(any(map(_installed, modules)) and glob.glob(devices) for modules, devices in ACCELERATORS)


def keep_freed_host_memory() -> bool:
    """Applies the settings above for this process; True when they took effect.

    Does nothing (False) where the C library is not glibc, or when JAX's backends already
    started: the dispatch mode is fixed when the CPU client is created. Call it first thing in
    a program, before any JAX computation.
    """
    from jax._src import xla_bridge

    libc = _glibc()
    if libc is None:
        logger.debug("not glibc: host memory settings left as they are")
        return False
    if xla_bridge.backends_are_initialized():
        logger.debug("JAX's backends already started: host memory settings left as they are")
        return False
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, -1)):
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
