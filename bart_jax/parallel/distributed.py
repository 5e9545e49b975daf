"""Several processes (hosts), one program: `jax.distributed` start-up and per-process data.

Every process runs the same script. After `initialize`, `jax.devices()` lists the devices of
all processes and `sharding.make_mesh()` spans them; jitted functions then run as one program
over the whole mesh. Each process loads only the rows of a global batch that its own devices
hold (`process_rows`), and `global_batch` assembles the global arrays from those pieces.
Parameters are placed with `sharding.put_sharded` / `shard_params`: every process reads the
checkpoint on its host and uploads only its own devices' shards.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import multihost as orbax_multihost

from bart_jax.parallel.placement import batch_sharding, batch_shards, check_batch
from bart_jax.parallel.rules import RULES, Rules


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    local_device_ids: Optional[Sequence[int]] = None,
) -> None:
    """Connects this process to the others (`jax.distributed.initialize`); call it first, before
    any other JAX call.

    On Cloud TPU pods, SLURM and Open MPI JAX finds every argument itself: call it without
    arguments. Elsewhere give the coordinator's "host:port" (process 0 listens there), the
    number of processes and this process's id (0 .. num_processes - 1).
    """
    given = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
                 local_device_ids=local_device_ids)
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in 0 .. {num_processes - 1}, got {process_id}")
    jax.distributed.initialize(**{name: value for name, value in given.items() if value is not None})


def launched_by_cluster() -> bool:
    """Whether a launcher that `jax.distributed.initialize()` reads by itself started this process
    as one of several: SLURM, Open MPI, or a multi-host Cloud TPU slice."""
    environment = os.environ
    return (_count(environment.get("SLURM_NTASKS")) > 1 or _count(environment.get("OMPI_COMM_WORLD_SIZE")) > 1
            or "," in environment.get("TPU_WORKER_HOSTNAMES", "")
            or bool(environment.get("MEGASCALE_COORDINATOR_ADDRESS")))


def _count(value: Optional[str]) -> int:
    try:
        return int(value) if value else 1
    except ValueError:
        return 1


def initialize_if_needed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                         process_id: Optional[int] = None) -> bool:
    """`initialize` when any argument is given or a cluster launcher started this process
    (`launched_by_cluster`); True when it ran. A lone process on one host is left alone."""
    given = (coordinator_address, num_processes, process_id)
    if all(value is None for value in given) and not launched_by_cluster():
        return False
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ValueError("--coordinator_address needs --num_processes and --process_id")
    initialize(coordinator_address, num_processes, process_id)
    return True


def process_rows(global_batch_size: int, mesh: Mesh, rules: Rules = RULES) -> slice:
    """The rows [start, stop) of a global batch that this process's devices hold, i.e. what this
    process must load. Processes that share the same batch shards (e.g. over "tensor") get the
    same rows."""
    shards = batch_shards(mesh, rules)
    if global_batch_size % shards:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {shards} batch shards")
    indices = batch_sharding(mesh, rules).addressable_devices_indices_map((global_batch_size,)).values()
    bounds = sorted({index[0].indices(global_batch_size)[:2] for index in indices})
    for (_, stop), (start, _) in zip(bounds, bounds[1:]):
        if stop != start:
            raise ValueError(f"this process's batch rows are not contiguous ({bounds}); order the mesh devices "
                             f"so that each process's devices are adjacent along the batch axes")
    return slice(bounds[0][0], bounds[-1][1])


def global_batch(local_batch: Any, mesh: Mesh, rules: Rules = RULES, batch_axis: int = 0) -> Any:
    """Global arrays from each process's rows (`process_rows`), split over the batch mesh axes
    (`jax.make_array_from_process_local_data`).

    local_batch: a pytree of host arrays whose axis `batch_axis` holds this process's rows,
    the same structure on every process. Returns arrays with the global batch on that axis.
    """
    sharding = batch_sharding(mesh, rules, batch_axis)
    arrays = jax.tree_util.tree_map(
        lambda rows: jax.make_array_from_process_local_data(sharding, np.asarray(rows)), local_batch
    )
    check_batch(arrays, mesh, rules, batch_axis)
    return arrays


def to_host(tree: Any) -> Any:
    """Every (global) array of `tree` gathered into a full numpy array on every process.

    An array on a mesh is replicated over that same mesh's devices, whose collectives the
    computation that made it has already set up. (`process_allgather` gathers over one device of
    each process instead: a new group of devices, which the CPU backend's collectives give up
    on when a process arrives 30 s after another.)"""

    def gather(array: Any) -> Any:
        if not isinstance(array, jax.Array) or array.is_fully_addressable:
            return np.asarray(array)
        if isinstance(array.sharding, NamedSharding):
            replicated = _replicate(array.sharding.mesh)(array)
            return np.asarray(replicated.addressable_data(0))
        return multihost_utils.process_allgather(array, tiled=True)

    return jax.tree.map(gather, tree)


@functools.lru_cache(maxsize=None)
def _replicate(mesh: Mesh):
    return jax.jit(lambda array: array, out_shardings=NamedSharding(mesh, PartitionSpec()))


# Processes may reach a barrier far apart: one still starting up or compiling, another reading a
# checkpoint.
BARRIER_TIMEOUT_S = 3600


def sync(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process has reached the point called `name` (no-op for one process).

    A barrier of the distributed runtime's coordination service, as orbax's: it waits up to
    `timeout_s`, where `multihost_utils.sync_global_devices`, a collective, fails on the CPU
    backend when one process arrives 30 s after another."""
    orbax_multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)
