"""Two processes, one program: BART split over data, FSDP and tensor axes of 8 CPU devices
(4 per process) on one machine, checked against the same work in a single process.

    python scripts/two_process_demo.py

starts two worker processes (`--process-id 0` and `1`), which talk through
`bart_jax.parallel.distributed.initialize` on a localhost port. Each worker builds the 2 x 2 x 2 mesh
over all 8 devices, places the same tiny model's parameters (uploading only its own shards),
loads only its rows of each global batch, and runs a sharded forward pass, two AdamW train
steps and greedy generation. Worker 0 writes the gathered results; the launcher then computes
everything again unsharded in its own process and compares. On a real cluster each host runs
the worker part with its own process id (or none, on TPU pods and SLURM).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

DEVICES_PER_PROCESS = 4
NUM_PROCESSES = 2
ATOL = 1e-5


def tiny_model():
    """(module, host params, batch): a small BART with noisy weights, the same in every process."""
    import jax
    import jax.numpy as jnp

    from bart_jax.config import BartConfig
    from bart_jax.model.heads import BartForConditionalGeneration

    config = BartConfig(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=8,
                        decoder_attention_heads=8, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=64, dropout=0.0)
    module = BartForConditionalGeneration(config)
    ids = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), ids, ids, decoder_input_ids=ids)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    input_ids = rng.integers(4, config.vocab_size, (8, 12)).astype(np.int32)
    attention_mask = (np.arange(12)[None] < rng.integers(4, 13, (8, 1))).astype(np.int32)
    labels = rng.integers(4, config.vocab_size, (8, 6)).astype(np.int32)
    batch = {"input_ids": np.where(attention_mask == 1, input_ids, 1).astype(np.int32),
             "attention_mask": attention_mask, "labels": labels}
    return module, params, batch


def make_train_step(module):
    """A plain AdamW step: (params, opt_state) -> new (params, opt_state), {"loss"}."""
    import jax
    import optax

    optimizer = optax.adamw(1e-3, weight_decay=0.01)

    def train_step(state, batch, dropout_rng):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: module.apply({"params": p}, **batch).loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    return optimizer, train_step


def run_everything(module, params, batch, forward, train_step, state, generate):
    """The results compared between the two runs, as host arrays."""
    import jax

    results = {"logits": forward(params, batch).logits}
    for step in range(2):
        state, metrics = train_step(state, batch, jax.random.PRNGKey(step))
        results[f"loss_{step}"] = metrics["loss"]
    results["trained_fc1"] = state[0]["model"]["decoder"]["layers_1"]["fc1"]["weight"]
    results["generated"] = generate(params, batch["input_ids"], batch["attention_mask"]).sequences
    return results


def worker(process_id: int, port: int, output: str) -> None:
    from bart_jax.parallel import distributed

    distributed.initialize(f"localhost:{port}", NUM_PROCESSES, process_id)
    import jax

    from bart_jax import parallel
    from bart_jax.generation.generate import resolve_generation_config

    module, host_params, host_batch = tiny_model()
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    param_shardings = parallel.tree_shardings(host_params, mesh)
    params = parallel.put_sharded(host_params, param_shardings)
    rows = distributed.process_rows(8, mesh)
    batch = distributed.global_batch({name: value[rows] for name, value in host_batch.items()}, mesh)
    print(f"process {jax.process_index()}: {jax.local_device_count()} of {jax.device_count()} devices, "
          f"batch rows {rows.start}..{rows.stop - 1}", flush=True)

    optimizer, train_step = make_train_step(module)
    state_shapes = jax.eval_shape(lambda p: (p, optimizer.init(p)), host_params)
    sharded_step = parallel.jit_train_step(train_step, mesh, state_shapes)
    state = parallel.jit_init(lambda p: (p, optimizer.init(p)), mesh, params)
    config = resolve_generation_config(module, None, max_new_tokens=5, no_repeat_ngram_size=0)
    results = run_everything(
        module, params, batch, parallel.jit_forward(module, mesh, param_shardings), sharded_step, state,
        parallel.jit_generate(module, mesh, param_shardings, config),
    )
    results = distributed.to_host(results)
    if process_id == 0:
        np.savez(output, **results)
    distributed.sync("results written")


def single_process_reference() -> dict:
    import jax

    from bart_jax.generation.generate import generate_static, resolve_generation_config

    module, params, batch = tiny_model()
    optimizer, train_step = make_train_step(module)
    config = resolve_generation_config(module, None, max_new_tokens=5, no_repeat_ngram_size=0)
    results = run_everything(
        module, params, batch, jax.jit(lambda p, b: module.apply({"params": p}, **b)), jax.jit(train_step),
        (params, optimizer.init(params)),
        lambda p, ids, mask: generate_static(module, p, ids, mask, config),
    )
    return jax.tree_util.tree_map(np.asarray, results)


def launch(timeout: float) -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    inherited = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
                 if not flag.startswith("--xla_force_host_platform_device_count")]
    flags = " ".join([f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"] + inherited)
    environment = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    with tempfile.TemporaryDirectory() as directory:
        output = os.path.join(directory, "results.npz")
        workers = [
            subprocess.Popen([sys.executable, __file__, "--process-id", str(index), "--port", str(port),
                              "--output", output], env=environment)
            for index in range(NUM_PROCESSES)
        ]
        codes = [process.wait(timeout=timeout) for process in workers]
        if any(codes):
            print(f"worker exit codes {codes}", file=sys.stderr)
            return 1
        with np.load(output) as loaded:
            distributed_results = dict(loaded)
    reference = single_process_reference()
    failures = []
    for name, expected in reference.items():
        actual = distributed_results[name]
        difference = np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)), initial=0.0)
        tolerance = 0 if expected.dtype.kind == "i" else ATOL
        print(f"{name:12s} shape {str(actual.shape):14s} max abs difference {difference:.2e}")
        if actual.shape != expected.shape or difference > tolerance:
            failures.append(name)
    if failures:
        print(f"two-process results differ from the single process in {failures}", file=sys.stderr)
        return 1
    print("two-process results match the single process")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--process-id", type=int, help="run as this worker (the launcher sets it)")
    parser.add_argument("--port", type=int, help="the coordinator's localhost port (worker)")
    parser.add_argument("--output", help="where worker 0 writes its results (worker)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the workers")
    arguments = parser.parse_args(argv)
    if arguments.process_id is None:
        return launch(arguments.timeout)
    worker(arguments.process_id, arguments.port, arguments.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
