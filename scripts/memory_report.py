"""Per-device memory of BART training under each sharding preset, from compiled executables.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/memory_report.py
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/memory_report.py --train-step
    python scripts/memory_report.py --knobs --models bart-base

Nothing big is allocated: shapes come from `jax.eval_shape` and programs are only lowered
and compiled. The default table holds, per device, the bytes of parameters plus AdamW state
(`argument_size_in_bytes` of a program that takes the sharded train state). `--train-step`
compiles the whole AdamW train step instead and adds its temporaries (activations,
gradients) for a batch of `--batch` rows of `--length` tokens. `--knobs` compiles the train
step on one device for each scan_layers / remat_policy setting and reports compile time and
temporaries. Run from the repository root (model configs come from configs/).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import optax

from bart_jax import parallel
from bart_jax.config import BartConfig
from bart_jax.model.heads import BartForConditionalGeneration

CONFIG_DIRECTORY = "configs"
MIB = 2**20


def model_and_state(name: str, scan_layers=False, remat_policy="none"):
    """(module, AdamW, train-state shapes (params, optimizer state)) for a preset config."""
    config = BartConfig.from_pretrained(os.path.join(CONFIG_DIRECTORY, name))
    module = BartForConditionalGeneration(config, scan_layers=scan_layers, remat_policy=remat_policy)
    optimizer = optax.adamw(1e-4, weight_decay=0.01)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = jax.eval_shape(lambda i: module.init(jax.random.PRNGKey(0), i, i)["params"], ids)
    return module, optimizer, jax.eval_shape(lambda p: (p, optimizer.init(p)), params)


def make_train_step(module, optimizer):
    def train_step(state, batch, dropout_rng):
        params, opt_state = state

        def loss(params):
            return module.apply({"params": params}, **batch, deterministic=False, rngs={"dropout": dropout_rng}).loss

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": value}

    return train_step


def batch_shapes(rows: int, length: int):
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    return {"input_ids": ids, "attention_mask": ids, "labels": ids}


def state_memory(state, mesh):
    """Per-device bytes of the sharded train state, from a compiled program that takes it."""
    shardings = parallel.tree_shardings(state, mesh, indivisible="replicate")
    compiled = jax.jit(lambda s: s, in_shardings=(shardings,), out_shardings=shardings,
                       donate_argnums=0).lower(state).compile()
    return {"state": compiled.memory_analysis().argument_size_in_bytes}


def train_step_memory(module, optimizer, state, mesh, rows, length):
    step = parallel.jit_train_step(make_train_step(module, optimizer), mesh, state, indivisible="replicate")
    batch = batch_shapes(rows, length)
    analysis = step.lower(state, batch, jax.ShapeDtypeStruct((2,), jnp.uint32)).compile().memory_analysis()
    batch_bytes = sum(4 * rows * length // parallel.batch_shards(mesh) for _ in batch)
    return {"state": analysis.argument_size_in_bytes - batch_bytes - 8, "temporaries": analysis.temp_size_in_bytes}


def preset_table(models, presets, train_step, rows, length):
    columns = "| model | preset | mesh (data, fsdp, tensor) | params + AdamW per device (MiB) |"
    print(columns + (" train-step temporaries (MiB) |" if train_step else ""))
    print("|" + " --- |" * (columns.count("|") - 1 + int(train_step)))
    for name in models:
        module, optimizer, state = model_and_state(name)
        total = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(state))
        print(f"| {name} | one device | 1, 1, 1 | {total / MIB:,.0f} |" + (" |" if train_step else ""))
        for preset in presets:
            mesh = parallel.preset_mesh(preset)
            sizes = ", ".join(str(mesh.shape[axis]) for axis in parallel.MESH_AXES)
            if train_step:
                memory = train_step_memory(module, optimizer, state, mesh, rows, length)
                print(f"| {name} | {preset} | {sizes} | {memory['state'] / MIB:,.0f} | "
                      f"{memory['temporaries'] / MIB:,.0f} |", flush=True)
            else:
                print(f"| {name} | {preset} | {sizes} | {state_memory(state, mesh)['state'] / MIB:,.0f} |", flush=True)


def knobs_table(models, rows, length):
    print("| model | scan_layers | remat_policy | compile (s) | train-step temporaries (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    for name in models:
        for scan_layers in (False, True):
            for policy in ("none", "full", "dots_saveable"):
                module, optimizer, state = model_and_state(name, scan_layers, policy)
                step = parallel.jit_train_step(make_train_step(module, optimizer), mesh, state)
                lowered = step.lower(state, batch_shapes(rows, length), jax.ShapeDtypeStruct((2,), jnp.uint32))
                start = time.perf_counter()
                analysis = lowered.compile().memory_analysis()
                seconds = time.perf_counter() - start
                temporaries = analysis.temp_size_in_bytes / MIB
                print(f"| {name} | {scan_layers} | {policy} | {seconds:.0f} | {temporaries:,.0f} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bart-base", "bart-large"], help="directories under configs/")
    parser.add_argument("--presets", nargs="+", default=list(parallel.PRESETS), help="sharding presets")
    parser.add_argument("--train-step", action="store_true", help="compile the whole train step (slower)")
    parser.add_argument("--knobs", action="store_true", help="scan_layers x remat_policy on one device")
    parser.add_argument("--batch", type=int, default=8, help="rows per global batch (--train-step, --knobs)")
    parser.add_argument("--length", type=int, default=128, help="tokens per row (--train-step, --knobs)")
    arguments = parser.parse_args(argv)
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices\n")
    if arguments.knobs:
        knobs_table(arguments.models, arguments.batch, arguments.length)
    else:
        preset_table(arguments.models, arguments.presets, arguments.train_step, arguments.batch, arguments.length)


if __name__ == "__main__":
    main()
