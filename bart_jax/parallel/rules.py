"""The rules table from logical axis names to mesh axes, and every parameter's logical axes.

One rules table (`RULES`) serves parameters, optimizer state and activations; the mesh shape
(bart_jax/parallel/mesh.py) picks the strategy. A dimension that its mesh axes do not divide is
an error (`indivisible="error"`), or, when asked (`indivisible="replicate"`), stays whole on
every device; a result is never silently wrong. Activation constraints are hints to the
partitioner and skip such dimensions.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bart_jax.model import partitioning
from bart_jax.model.partitioning import Rules

# Logical name -> mesh axes. A dimension takes the first rule naming it whose mesh axes no
# other dimension of the same array has taken; names without a rule are never split.
RULES: Rules = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("joined_kv", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
)

# Parameter path (its end, "/"-joined) -> logical axes; the first matching pattern wins, though
# each parameter of every head matches exactly one (tests/model/test_registry.py checks). The
# same table serves optimizer state and train states, whose leaves end with a parameter's path.
# Stacked layers (scan_layers) add a leading "layers" axis.
PARAM_AXES = (
    (r"classification_head/(dense|out_proj)/weight", (None, "embed")),
    (r"classification_head/(dense|out_proj)/bias", (None,)),
    (r"qa_outputs/weight", (None, "embed")),
    (r"qa_outputs/bias", (None,)),
    # Linear weights are [out, in] (bart_jax/model/linear.py).
    (r"(q_proj|k_proj|v_proj)/weight", ("joined_kv", "embed")),  # column-parallel
    (r"(q_proj|k_proj|v_proj)/bias", ("joined_kv",)),
    (r"\w*attn/out_proj/weight", ("embed", "joined_kv")),  # row-parallel
    (r"fc1/weight", ("mlp", "embed")),  # column-parallel
    (r"fc1/bias", ("mlp",)),
    (r"fc2/weight", ("embed", "mlp")),  # row-parallel
    (r"(shared|embed_tokens)/embedding", ("vocab", "embed")),  # vocab-parallel
    (r"lm_head/weight", ("vocab", "embed")),
    (r"final_logits_bias", (None, "vocab")),
    (r"embed_positions/embedding", ("positions", "embed")),
    (r"(\w*attn/out_proj|fc2)/bias", ("embed",)),
    (r"\w*(layer_norm|layernorm)\w*/(scale|bias)", ("embed",)),
)
_PARAM_PATTERNS = tuple((re.compile(rf"(^|/){pattern}$"), axes) for pattern, axes in PARAM_AXES)
_STACKED = re.compile(r"(^|/)layers/")
_QUANTIZED = re.compile(r"/array/(qvalue|scale)$")



def logical_to_spec(
    logical_axes: Sequence[Optional[str]],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = RULES,
    *,
    indivisible: str = "error",
    name: str = "array",
) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dimensions have `logical_axes` (see
    `bart_jax.model.partitioning.logical_to_spec`), with the default rules table."""
    return partitioning.logical_to_spec(logical_axes, shape, mesh, rules, indivisible=indivisible, name=name)


def path_name(key_path) -> str:
    """A pytree key path as "a/b/c" (dict keys, attribute names and sequence indices)."""
    names = []
    for key in key_path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                names.append(str(getattr(key, attribute)))
                break
        else:
            names.append(str(key))
    return "/".join(names)


def param_logical_axes(path: str, ndim: int) -> Optional[tuple[Optional[str], ...]]:
    """Logical axes of the parameter (or optimizer-state leaf) at `path`, or None if no entry of
    `PARAM_AXES` matches its path and rank.

    An int8 weight (bart_jax/model/quantization.py) is split as its float weight: its int8 values
    ".../weight/array/qvalue" [out, in] alike, its scales ".../array/scale" [out, 1] along the
    output axis only."""
    quantized = _QUANTIZED.search(path)
    if quantized:
        axes = param_logical_axes(path[:quantized.start()], ndim)
        return axes if axes is None or quantized.group(1) == "qvalue" else axes[:-1] + (None,)
    for pattern, axes in _PARAM_PATTERNS:
        if pattern.search(path):
            if ndim == len(axes):
                return axes
            if ndim == len(axes) + 1 and _STACKED.search(path):
                return ("layers",) + axes
            return None
    return None


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = RULES, *, indivisible: str = "error") -> Any:
    """A NamedSharding for every leaf of `tree`: params, optimizer state or a whole train state.

    Leaves (arrays or `jax.ShapeDtypeStruct`s) are matched by path against `PARAM_AXES`; leaves
    that match nothing (step counters, scalars, factored statistics) are replicated. Raises one
    ValueError naming every array that the mesh does not divide (with indivisible="error").
    """
    problems = []

    def sharding(key_path, leaf):
        name = path_name(key_path)
        axes = param_logical_axes(name, len(leaf.shape))
        try:
            spec = PartitionSpec() if axes is None else logical_to_spec(
                axes, leaf.shape, mesh, rules, indivisible=indivisible, name=name)
        except ValueError as error:
            problems.append(str(error))
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(sharding, tree)
    if problems:
        raise ValueError(f"{len(problems)} arrays do not fit the mesh {dict(mesh.shape)}:\n" + "\n".join(problems))
    return shardings


def unmatched_leaves(tree: Any) -> list[str]:
    """Paths of array leaves (rank >= 1) that `PARAM_AXES` does not cover."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [
        path_name(key_path) for key_path, leaf in flat
        if len(leaf.shape) and param_logical_axes(path_name(key_path), len(leaf.shape)) is None
    ]
