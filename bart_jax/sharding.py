"""Partitioning BART over a device mesh with JAX's SPMD partitioner (`jax.jit` + `NamedSharding`).

One mesh with axes ("data", "fsdp", "tensor"); logical axis names on every parameter (from its
path, `PARAM_AXES`) and on the key activations and the KV cache (`constrain`, called by the
modules); one rules table (`RULES`) from logical names to mesh axes. The mesh shape picks the
strategy, the table stays the same (`PRESETS` names the usual shapes):

    data parallel    data=N            batch split; parameters replicated
    FSDP (ZeRO-3)    fsdp=N            batch split; parameters, gradients and optimizer state
                                       split along `embed`, gathered per layer by the partitioner
    tensor parallel  tensor=N          Megatron: q/k/v and fc1 column-parallel, out_proj and fc2
                                       row-parallel, heads split; vocab-parallel embedding/LM head
    combinations     data=2, tensor=4  ... any product of the three that uses every device

A dimension that its mesh axes do not divide is an error (`indivisible="error"`), or, when asked
(`indivisible="replicate"`), stays whole on every device; a result is never silently wrong.
Activation constraints are hints to the partitioner and skip such dimensions.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import re
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. A dimension takes the first rule naming it whose mesh axes no
# other dimension of the same array has taken; names without a rule are never split.
Rules = Sequence[tuple[str, Any]]
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

# Mesh shapes (-1: every remaining device) of the usual strategies; see `preset_mesh`.
PRESETS = {
    "data": dict(data=-1),
    "fsdp": dict(fsdp=-1),
    "tensor": dict(tensor=-1),
    "data+tensor": dict(data=-1, tensor=2),
    "fsdp+tensor": dict(fsdp=-1, tensor=2),
    "data+fsdp+tensor": dict(data=2, fsdp=-1, tensor=2),
}

# Logical axes of activations, as the modules annotate them.
HIDDEN = ("activation_batch", "activation_length", "activation_embed")
# Per-head activations and attention values: [batch, heads, length, head_dim].
PER_HEAD = ("activation_batch", "activation_heads", "activation_length", "activation_kv")
# Attention keys are kept transposed, [batch, heads, head_dim, length] (bart_jax/attention.py).
KEYS = ("activation_batch", "activation_heads", "activation_kv", "activation_length")
MLP_HIDDEN = ("activation_batch", "activation_length", "activation_mlp")
LOGITS = ("activation_batch", "activation_length", "activation_vocab")
# The self-attention cache's ancestry table [batch, beams, max_length] (bart_jax/cache.py); its
# keys and values are KEYS and PER_HEAD with length = max_length * beams.
CACHE_ANCESTORS = ("activation_batch", None, "activation_length")

# Parameter path (its end, "/"-joined) -> logical axes; the first matching pattern wins. The
# same table serves optimizer state and train states, whose leaves end with a parameter's path.
# Stacked layers (scan_layers) add a leading "layers" axis.
PARAM_AXES = (
    (r"classification_head/(dense|out_proj)/weight", (None, "embed")),
    (r"classification_head/(dense|out_proj)/bias", (None,)),
    (r"qa_outputs/weight", (None, "embed")),
    (r"qa_outputs/bias", (None,)),
    # Linear weights are [out, in] (bart_jax/linear.py).
    (r"(q_proj|k_proj|v_proj)/weight", ("joined_kv", "embed")),  # column-parallel
    (r"(q_proj|k_proj|v_proj)/bias", ("joined_kv",)),
    (r"out_proj/weight", ("embed", "joined_kv")),  # row-parallel
    (r"fc1/weight", ("mlp", "embed")),  # column-parallel
    (r"fc1/bias", ("mlp",)),
    (r"fc2/weight", ("embed", "mlp")),  # row-parallel
    (r"(shared|embed_tokens)/embedding", ("vocab", "embed")),  # vocab-parallel
    (r"lm_head/weight", ("vocab", "embed")),
    (r"final_logits_bias", (None, "vocab")),
    (r"embed_positions/embedding", ("positions", "embed")),
    (r"(out_proj|fc2)/bias", ("embed",)),
    (r"\w*(layer_norm|layernorm)\w*/(scale|bias)", ("embed",)),
)
_PARAM_PATTERNS = tuple((re.compile(rf"(^|/){pattern}$"), axes) for pattern, axes in PARAM_AXES)
_STACKED = re.compile(r"(^|/)layers/")

INDIVISIBLE_CHOICES = ("error", "replicate")


# --- mesh -----------------------------------------------------------------------------------
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


# --- logical axes -> PartitionSpec ----------------------------------------------------------------
def _as_tuple(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(
    logical_axes: Sequence[Optional[str]],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = RULES,
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
            axes = tuple(axis for axis in _as_tuple(rule_axes) if axis in mesh.shape)
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
    `PARAM_AXES` matches its path and rank."""
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


# --- placing arrays -----------------------------------------------------------------------------------
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
    return _as_tuple(logical_to_spec(("activation_batch",), (0,), mesh, rules)[0])


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
    Single-process; see `bart_jax.distributed.global_batch` for several processes."""
    check_batch(batch, mesh, rules, batch_axis)
    sharding = batch_sharding(mesh, rules, batch_axis)
    return put_sharded(batch, jax.tree_util.tree_map(lambda _: sharding, batch))


def cache_shardings(cache: Any, mesh: Mesh, rules: Rules = RULES) -> Any:
    """Shardings of a decoder cache (bart_jax/cache.py) or of projected cross-attention
    keys/values: inputs split like the batch, heads over "tensor"."""
    def leaf_sharding(path, leaf):
        if len(leaf.shape) == 3:
            axes = CACHE_ANCESTORS
        else:
            # Cache chunks sit in tuples under "key"/"value"; cross-attention's arrays directly.
            names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
            axes = KEYS if names and names[-1] == "key" else PER_HEAD
        return NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh, rules, indivisible="replicate"))

    return jax.tree_util.tree_map_with_path(leaf_sharding, cache)


# --- activations ----------------------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("bart_jax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = RULES):
    """While tracing inside this context, `constrain` pins activations to `mesh` by `rules`."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def sharding_active() -> bool:
    """Whether activations are being traced under `activation_sharding`."""
    return _ACTIVE.get() is not None


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


def with_activation_sharding(fn: Callable, mesh: Mesh, rules: Rules = RULES) -> Callable:
    """`fn` traced inside `activation_sharding(mesh, rules)` (wrap it before `jax.jit`)."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    return traced


# --- jitted, sharded entry points ---------------------------------------------------------------
def jit_sharded(fn: Callable, mesh: Mesh, rules: Rules = RULES, **jit_kwargs) -> Callable:
    """`jax.jit(fn, **jit_kwargs)` with `fn` traced under `activation_sharding(mesh, rules)`.

    Calls (and `.lower`) run under `jax.set_mesh(mesh)`: the mesh is part of JAX's trace-cache
    key, so jitted functions that `fn` calls (e.g. `generate_static`) and that were traced
    before without a mesh are traced again here, with their activation constraints.
    """
    jitted = jax.jit(with_activation_sharding(fn, mesh, rules), **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return jitted(*args, **kwargs)

    def lower(*args, **kwargs):
        with jax.set_mesh(mesh):
            return jitted.lower(*args, **kwargs)

    call.lower = lower
    return call


def jit_init(init_fn: Callable, mesh: Mesh, *args, rules: Rules = RULES, indivisible: str = "error"):
    """Runs `init_fn(*args)` (e.g. params or a train state from a PRNG key) with every output
    created directly in its sharding (`tree_shardings`), never whole on one device."""
    shapes = jax.eval_shape(init_fn, *args)
    shardings = tree_shardings(shapes, mesh, rules, indivisible=indivisible)
    return jit_sharded(init_fn, mesh, rules, out_shardings=shardings)(*args)


def jit_forward(module, mesh: Mesh, param_shardings: Any, rules: Rules = RULES, *, method: Optional[str] = None,
                **static_kwargs) -> Callable:
    """A jitted `forward(params, batch)` calling `module.apply({"params": params}, **batch,
    **static_kwargs, method=method)`.

    batch: a dict of [batch, ...] arrays named as the method's arguments (input_ids,
    attention_mask, decoder_input_ids, labels, ...), split over the batch mesh axes; params
    placed by `param_shardings` (`tree_shardings`). method: e.g. "encode" or
    "project_cross_key_values"; static_kwargs: Python flags (output_hidden_states=True, ...).
    """

    def forward(params, batch):
        return module.apply({"params": params}, **batch, **static_kwargs, method=method)

    jitted = jit_sharded(forward, mesh, rules, in_shardings=(param_shardings, batch_sharding(mesh, rules)))

    def checked(params, batch):
        check_batch(batch, mesh, rules)
        return jitted(params, batch)

    return checked


def jit_decode_step(module, mesh: Mesh, param_shardings: Any, rules: Rules = RULES) -> Callable:
    """A jitted `decode_step(params, decoder_input_ids, cache, cache_index, cross_key_values,
    encoder_attention_mask) -> (logits, cache)` (see `BartForConditionalGeneration.decode_step`)
    with the cache and cross-attention keys/values split by inputs and heads; the cache is donated.
    """

    def decode_step(params, decoder_input_ids, cache, cache_index, cross_key_values, encoder_attention_mask):
        return module.apply({"params": params}, decoder_input_ids, cache, cache_index, cross_key_values,
                            encoder_attention_mask, method="decode_step")

    rows = batch_sharding(mesh, rules)
    compiled = {}

    def checked(params, decoder_input_ids, cache, cache_index, cross_key_values, encoder_attention_mask):
        check_batch((decoder_input_ids, cache, cross_key_values, encoder_attention_mask), mesh, rules)
        structure = jax.tree_util.tree_structure((cache, cross_key_values))
        if structure not in compiled:
            cache_sharding = cache_shardings(cache, mesh, rules)
            compiled[structure] = jit_sharded(
                decode_step, mesh, rules,
                in_shardings=(param_shardings, rows, cache_sharding, replicated(mesh),
                              cache_shardings(cross_key_values, mesh, rules), rows),
                out_shardings=(rows, cache_sharding),
                donate_argnums=(2,),
            )
        return compiled[structure](params, decoder_input_ids, cache, cache_index, cross_key_values,
                                   encoder_attention_mask)

    return checked


def jit_generate(module, mesh: Mesh, param_shardings: Any, generation_config, rules: Rules = RULES) -> Callable:
    """A jitted `generate(params, input_ids, attention_mask, prng_key=None) -> SearchOutput`
    running `bart_jax.generation.generate_static` with rows split over the batch mesh axes and
    heads over "tensor" (the static cache follows the model's constraints).

    generation_config: resolved (`bart_jax.generation.resolve_generation_config`).
    input_ids, attention_mask: [batch, source] int32, batch divisible by the batch shards.
    """
    from bart_jax.generation.generate import generate_static

    def generate(params, input_ids, attention_mask, prng_key):
        return generate_static(module, params, input_ids, attention_mask, generation_config, prng_key)

    rows = batch_sharding(mesh, rules)
    jitted = jit_sharded(generate, mesh, rules, in_shardings=(param_shardings, rows, rows, replicated(mesh)))

    def checked(params, input_ids, attention_mask, prng_key=None):
        check_batch((input_ids, attention_mask), mesh, rules)
        return jitted(params, input_ids, attention_mask, prng_key)

    return checked


def jit_train_step(train_step: Callable, mesh: Mesh, state_shapes: Any, rules: Rules = RULES, *,
                   batch_axis: int = 0, indivisible: str = "error", donate_state: bool = True) -> Callable:
    """A jitted `train_step(state, batch, dropout_rng) -> (state, metrics)`.

    state_shapes: the train state (arrays or `jax.eval_shape` structs: params, optimizer state,
    step); its shardings follow `tree_shardings`, so the optimizer state is split like the
    parameters it tracks. batch: a pytree of arrays whose axis `batch_axis` (1 for
    [accumulation_steps, micro_batch, ...] batches) is split over the batch mesh axes.
    The new state keeps the old one's shardings and, with `donate_state`, reuses its buffers.
    Metrics are replicated. The returned function has `.state_shardings` (to place the initial
    state with `put_sharded`) and `.lower` (for `memory_analysis`).
    """
    state_shardings = tree_shardings(state_shapes, mesh, rules, indivisible=indivisible)
    jitted = jit_sharded(
        train_step, mesh, rules,
        in_shardings=(state_shardings, batch_sharding(mesh, rules, batch_axis), replicated(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,) if donate_state else (),
    )

    def checked(state, batch, dropout_rng):
        check_batch(batch, mesh, rules, batch_axis)
        return jitted(state, batch, dropout_rng)

    checked.state_shardings = state_shardings
    checked.lower = jitted.lower
    return checked


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes of the largest per-device piece of `tree` under `shardings` (shapes suffice)."""
    totals: dict[Any, int] = {}
    for leaf, sharding in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        shard = sharding.shard_shape(leaf.shape)
        for device in sharding.device_set:
            totals[device] = totals.get(device, 0) + math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return max(totals.values(), default=0)
