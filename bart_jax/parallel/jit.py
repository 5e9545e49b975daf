"""Jitted, sharded entry points: functions traced under the mesh's activation constraints,
with parameters, batches, caches and train states placed by the rules table."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from bart_jax.generation.generate import check_prng_key, generate_static
from bart_jax.model.kernels import layout as kernel_layout
from bart_jax.model.kernels import settled
from bart_jax.model.partitioning import activation_sharding
from bart_jax.model.validation import ID_ARGUMENTS, MASK_ARGUMENTS, check_mask, check_token_ids
from bart_jax.parallel.placement import batch_sharding, cache_shardings, check_batch, replicated
from bart_jax.parallel.rules import RULES, Rules, tree_shardings


def _concrete(array: Any) -> bool:
    """Whether `array` holds values this process can read: not a tracer (inside an outer jit) and
    not split over other processes' devices."""
    if isinstance(array, jax.core.Tracer):
        return False
    return not isinstance(array, jax.Array) or array.is_fully_addressable


def _check_ids(config: Any, arrays: dict[str, Any], masks: tuple[str, ...] = ()) -> None:
    """Checks the concrete token ids among `arrays` (`check_token_ids`) and, named in `masks`,
    their masks' shapes and values: inside jit an id past the vocabulary or a position past
    the table is clamped, not refused."""
    for name in ID_ARGUMENTS:
        if arrays.get(name) is not None and _concrete(arrays[name]):
            ids = check_token_ids(arrays[name], config, name)
            mask_name = next((mask for mask, of in MASK_ARGUMENTS.items() if of == name), None)
            if mask_name in masks and arrays.get(mask_name) is not None and _concrete(arrays[mask_name]):
                check_mask(arrays[mask_name], ids.shape, mask_name, name)


def with_activation_sharding(fn: Callable, mesh: Mesh, rules: Rules = RULES) -> Callable:
    """`fn` traced inside `activation_sharding(mesh, rules)` (wrap it before `jax.jit`)."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    return traced


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
    kernels="auto" follows the mesh's platform (`bart_jax.model.kernels.settled`), also for every
    entry point below.
    """
    module = settled(module, mesh=mesh)

    def forward(params, batch):
        return module.apply({"params": params}, **batch, **static_kwargs, method=method)

    jitted = jit_sharded(forward, mesh, rules, in_shardings=(param_shardings, batch_sharding(mesh, rules)))

    def checked(params, batch):
        check_batch(batch, mesh, rules)
        if isinstance(batch, dict):
            _check_ids(module.config, batch, tuple(MASK_ARGUMENTS))
        return jitted(params, batch)

    checked.lower = jitted.lower  # for ahead-of-time compilation and memory analysis
    return checked


def jit_decode_step(module, mesh: Mesh, param_shardings: Any, rules: Rules = RULES) -> Callable:
    """A jitted `decode_step(params, decoder_input_ids, cache, cache_index, cross_key_values,
    encoder_attention_mask) -> (logits, cache)` (see `BartForConditionalGeneration.decode_step`)
    with the cache and cross-attention keys/values split by inputs and heads; the cache is donated.
    The cache must have the layout of the module's kernels on the mesh's platform
    (`init_cache(..., kernels=...)`).
    """
    module = settled(module, mesh=mesh)
    layout = kernel_layout(module.kernels)

    def decode_step(params, decoder_input_ids, cache, cache_index, cross_key_values, encoder_attention_mask):
        return module.apply({"params": params}, decoder_input_ids, cache, cache_index, cross_key_values,
                            encoder_attention_mask, method="decode_step")

    rows = batch_sharding(mesh, rules)
    compiled = {}

    def checked(params, decoder_input_ids, cache, cache_index, cross_key_values, encoder_attention_mask):
        check_batch((decoder_input_ids, cache, cross_key_values, encoder_attention_mask), mesh, rules)
        if not isinstance(decoder_input_ids, jax.Array):
            # Host ids come from the caller; device ids from a previous step's search (reading them
            # back to check them would make every step wait for the device).
            _check_ids(module.config, {"decoder_input_ids": decoder_input_ids})
        structure = jax.tree_util.tree_structure((cache, cross_key_values))
        if structure not in compiled:
            cache_sharding = cache_shardings(cache, mesh, rules, layout)
            compiled[structure] = jit_sharded(
                decode_step, mesh, rules,
                in_shardings=(param_shardings, rows, cache_sharding, replicated(mesh),
                              cache_shardings(cross_key_values, mesh, rules, layout), rows),
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
    Equal arguments give the same function, so that its compilations are reused by later calls
    (every evaluation of a training run, every window of a summarization job).
    """
    leaves, structure = jax.tree_util.tree_flatten(param_shardings)
    return _jit_generate(settled(module, mesh=mesh), mesh, structure, tuple(leaves), generation_config,
                         tuple(rules))


@functools.lru_cache(maxsize=32)
def _jit_generate(module, mesh: Mesh, sharding_structure, sharding_leaves: tuple, generation_config,
                  rules: Rules) -> Callable:
    param_shardings = jax.tree_util.tree_unflatten(sharding_structure, sharding_leaves)

    def generate(params, input_ids, attention_mask, prng_key):
        return generate_static(module, params, input_ids, attention_mask, generation_config, prng_key)

    rows = batch_sharding(mesh, rules)
    jitted = jit_sharded(generate, mesh, rules, in_shardings=(param_shardings, rows, rows, replicated(mesh)))

    def checked(params, input_ids, attention_mask, prng_key=None):
        check_batch((input_ids, attention_mask), mesh, rules)
        _check_ids(module.config, {"input_ids": input_ids, "attention_mask": attention_mask}, ("attention_mask",))
        check_prng_key(prng_key)
        # Host inputs placed here: with several processes (jax.distributed), JAX refuses numpy
        # inputs to a function with non-trivial input shardings.
        input_ids, attention_mask = (value if isinstance(value, jax.Array) else jax.device_put(np.asarray(value), rows)
                                     for value in (input_ids, attention_mask))
        if prng_key is not None and not isinstance(prng_key, jax.Array):
            prng_key = jax.device_put(np.asarray(prng_key), replicated(mesh))
        return jitted(params, input_ids, attention_mask, prng_key)

    def lower(params, input_ids, attention_mask, prng_key=None):
        """The lowered computation (`.compile()` it ahead of time, or read its memory analysis)."""
        return jitted.lower(params, input_ids, attention_mask, prng_key)

    checked.lower = lower
    return checked


def jit_train_step(train_step: Callable, mesh: Mesh, state_shapes: Any, rules: Rules = RULES, *,
                   batch_axis: int = 0, indivisible: str = "error", donate_state: bool = True,
                   config: Optional[Any] = None) -> Callable:
    """A jitted `train_step(state, batch, dropout_rng) -> (state, metrics)`.

    state_shapes: the train state (arrays or `jax.eval_shape` structs: params, optimizer state,
    step); its shardings follow `tree_shardings`, so the optimizer state is split like the
    parameters it tracks. batch: a pytree of arrays whose axis `batch_axis` (1 for
    [accumulation_steps, micro_batch, ...] batches) is split over the batch mesh axes.
    The new state keeps the old one's shardings and, with `donate_state`, reuses its buffers.
    Metrics are replicated. The returned function has `.state_shardings` (to place the initial
    state with `put_sharded`) and `.lower` (for `memory_analysis`). With the model's `config`, the
    token ids of host (numpy) batches are checked against its vocabulary and positions.
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
        if config is not None and isinstance(batch, dict):
            # Device batches are left alone: reading them back would make every step wait.
            host_ids = {name: np.reshape(value, (-1, np.shape(value)[-1])) for name, value in batch.items()
                        if name in ID_ARGUMENTS and not isinstance(value, jax.Array)}
            _check_ids(config, host_ids)
        return jitted(state, batch, dropout_rng)

    checked.state_shardings = state_shardings
    checked.lower = jitted.lower
    return checked
