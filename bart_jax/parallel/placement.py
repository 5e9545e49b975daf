"""Placing parameters, batches and caches on a mesh, shard by shard."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bart_jax.model.partitioning import CACHE_ANCESTORS, KEYS, PER_HEAD, TIME_MAJOR, as_tuple
from bart_jax.parallel.rules import RULES, Rules, logical_to_spec, path_name, tree_shardings


def put_sharded(tree: Any, shardings: Any) -> Any:
    """Places every leaf of `tree` on its sharding.

    Host (numpy) leaves go shard by shard (`jax.make_array_from_callback`): each device receives
    only its slice, so a model never has to fit on one device. Device arrays are resharded.
    In a multi-process run every process passes the whole host array and places its own shards.
    """

    def put(leaf, sharding):
        if isinstance(leaf, jax.Array):
            return jax.device_put(leaf, sharding)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def shard_params(params: Any, mesh: Mesh, rules: Rules = RULES, *, indivisible: str = "error") -> Any:
    """`params` (host or device arrays) placed on `mesh` as `tree_shardings` says."""
    return put_sharded(params, tree_shardings(params, mesh, rules, indivisible=indivisible))


def shard_pretrained(pretrained, mesh: Mesh, rules: Rules = RULES, *, indivisible: str = "error"):
    """A `PretrainedBart` (from `load_pretrained`) whose params live on `mesh`, placed straight
    from the host copy the loader holds."""
    return dataclasses.replace(pretrained, params=shard_params(pretrained.params, mesh, rules, indivisible=indivisible))


def batch_axes(mesh: Mesh, rules: Rules = RULES) -> tuple[str, ...]:
    """The mesh axes that split the batch ("activation_batch" in the rules)."""
    return as_tuple(logical_to_spec(("activation_batch",), (0,), mesh, rules)[0])


def batch_shards(mesh: Mesh, rules: Rules = RULES) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh.shape[axis] for axis in batch_axes(mesh, rules))


def batch_sharding(mesh: Mesh, rules: Rules = RULES, batch_axis: int = 0) -> NamedSharding:
    """Axis `batch_axis` split over the batch mesh axes, other axes whole."""
    axes = batch_axes(mesh, rules)
    return NamedSharding(mesh, PartitionSpec(*(None,) * batch_axis, axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch(batch: Any, mesh: Mesh, rules: Rules = RULES, batch_axis: int = 0) -> None:
    """Raises ValueError unless every array of `batch` has a batch axis (`batch_axis`) that the
    batch shards divide."""
    shards = batch_shards(mesh, rules)
    flat, _ = jax.tree_util.tree_flatten_with_path(batch)
    for key_path, leaf in flat:
        name, shape = path_name(key_path) or "array", np.shape(leaf)
        if len(shape) <= batch_axis:
            raise ValueError(f"batch entry {name} has shape {shape}, with no batch axis {batch_axis}")
        if shape[batch_axis] % shards:
            raise ValueError(
                f"batch entry {name} has {shape[batch_axis]} rows (axis {batch_axis} of shape {shape}), not "
                f"divisible by the {shards} batch shards of mesh axes {batch_axes(mesh, rules)}; pad the batch "
                f"to a multiple of {shards} (attention_mask 0, labels -100, example weight 0) or use another mesh"
            )


def shard_batch(batch: Any, mesh: Mesh, rules: Rules = RULES, batch_axis: int = 0) -> Any:
    """Places `batch` (a pytree of arrays with a batch axis, e.g. a dict of input_ids,
    attention_mask, labels [batch, ...]) with its rows split over the batch mesh axes.
    Single-process; see `bart_jax.parallel.distributed.global_batch` for several processes."""
    check_batch(batch, mesh, rules, batch_axis)
    sharding = batch_sharding(mesh, rules, batch_axis)
    return put_sharded(batch, jax.tree_util.tree_map(lambda _: sharding, batch))


def cache_shardings(cache: Any, mesh: Mesh, rules: Rules = RULES, layout: str = "cpu") -> Any:
    """Shardings of a decoder cache (bart_jax/model/cache.py) or of projected cross-attention
    keys/values in `layout` ("portable" or "cpu", as `bart_jax.model.kernels.layout` gives for
    the model): inputs split like the batch, heads over "tensor"."""
    def leaf_sharding(path, leaf):
        if len(leaf.shape) == 3:
            axes = CACHE_ANCESTORS
        elif layout == "portable":
            axes = TIME_MAJOR
        else:
            # CPU cache chunks sit in tuples under "key"/"value"; cross-attention's arrays directly.
            names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
            axes = KEYS if names and names[-1] == "key" else PER_HEAD
        return NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh, rules, indivisible="replicate"))

    return jax.tree_util.tree_map_with_path(leaf_sharding, cache)


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes of the largest per-device piece of `tree` under `shardings` (shapes suffice)."""
    totals: dict[Any, int] = {}
    for leaf, sharding in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        shard = sharding.shard_shape(leaf.shape)
        for device in sharding.device_set:
            totals[device] = totals.get(device, 0) + math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return max(totals.values(), default=0)
