"""Logical axis names of BART's activations, and the hook through which a mesh pins them.

The modules annotate key activations with logical names (`constrain(x, HIDDEN)`); outside a
mesh this is the identity. `bart_jax.parallel` enters `activation_sharding(mesh, rules)` while
tracing, and the names then become sharding constraints through its rules table. This module is
the model's whole knowledge of parallelism: names, not mesh axes.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical name -> mesh axes, in the order rules are tried (bart_jax/parallel/rules.py).
Rules = Sequence[tuple[str, Any]]

# Logical axes of activations, as the modules annotate them.
HIDDEN = ("activation_batch", "activation_length", "activation_embed")
# Time-major per-head tensors, [batch, length, heads, head_dim]: queries, keys and values as
# projected, and the portable kernels' cache (length = max_length * beams slots there).
TIME_MAJOR = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
# The CPU kernels' heads-major values and cache values, [batch, heads, length, head_dim], and
# keys kept transposed, [batch, heads, head_dim, length] (bart_jax/model/kernels/).
PER_HEAD = ("activation_batch", "activation_heads", "activation_length", "activation_kv")
KEYS = ("activation_batch", "activation_heads", "activation_kv", "activation_length")
MLP_HIDDEN = ("activation_batch", "activation_length", "activation_mlp")
LOGITS = ("activation_batch", "activation_length", "activation_vocab")
# The self-attention cache's ancestry table [batch, beams, max_length] (bart_jax/model/cache.py).
CACHE_ANCESTORS = ("activation_batch", None, "activation_length")

INDIVISIBLE_CHOICES = ("error", "replicate")


def as_tuple(mesh_axes) -> tuple[str, ...]:
    """A rule's mesh axes (None, a name or several) as a tuple."""
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(
    logical_axes: Sequence[Optional[str]],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules,
    *,
    indivisible: str = "error",
    name: str = "array",
) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dimensions have `logical_axes`.

    Mesh axes that the mesh lacks are ignored. A dimension not divisible by the product of its
    mesh axes' sizes raises ValueError (indivisible="error") or is not split ("replicate").
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"{name}: {len(logical_axes)} logical axes {tuple(logical_axes)} for shape {tuple(shape)}")
    if indivisible not in INDIVISIBLE_CHOICES:
        raise ValueError(f"indivisible must be one of {INDIVISIBLE_CHOICES}, got {indivisible!r}")
    used: set[str] = set()
    spec = []
    for logical, size in zip(logical_axes, shape):
        chosen: tuple[str, ...] = ()
        for rule_name, rule_axes in rules:
            axes = tuple(axis for axis in as_tuple(rule_axes) if axis in mesh.shape)
            if rule_name == logical and not used.intersection(axes):
                chosen = axes
                break
        parts = math.prod(mesh.shape[axis] for axis in chosen)
        if size % parts:
            if indivisible == "error":
                raise ValueError(
                    f"{name}: dimension {logical!r} of size {size} (shape {tuple(shape)}) cannot be split "
                    f"{parts} ways over mesh axes {chosen}; choose another mesh, or pass "
                    f"indivisible='replicate' to keep such dimensions whole on every device"
                )
            chosen = ()
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("bart_jax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules):
    """While tracing inside this context, `constrain` pins activations to `mesh` by `rules`."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def sharding_active() -> bool:
    """Whether activations are being traced under `activation_sharding`."""
    return _ACTIVE.get() is not None


def active_sharding() -> Optional[tuple[Mesh, tuple[tuple[str, Any], ...]]]:
    """(mesh, rules) of the enclosing `activation_sharding`, or None outside one: for kernels
    that must run per device (`jax.shard_map`) rather than be partitioned by XLA."""
    return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
    """`x` with a sharding constraint from its logical axes; the identity outside
    `activation_sharding` (so unsharded use is unchanged). Dimensions their mesh axes do not
    divide are left to the partitioner."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules, indivisible="replicate")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
