"""keep_freed_host_memory: a step's temporaries reuse the previous step's pages (no page faults)."""

import json
import subprocess
import sys
from statistics import median

import pytest

from bart_jax.training import host_memory
from bart_jax.training.host_memory import _glibc, keep_freed_host_memory, training_on_cpu

# A fresh interpreter per case: the settings hold for a process, before JAX's backend starts.
PROGRAM = """
import json, resource, sys
from bart_jax.training.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None
import jax, jax.numpy as jnp

@jax.jit
def step(x):
    # The barrier keeps exp(x) a 64 MiB temporary of its own, allocated for each execution.
    y = jax.lax.optimization_barrier(jnp.exp(x))
    return y.sum() + y[::-1][::1024].sum()

x = jnp.arange(16 * 2**20, dtype=jnp.float32)[::-1]
for _ in range(2):  # compilation, then the heap settles
    step(x).block_until_ready()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults,
                  "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
"""


def run_program(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="the settings are glibc's")
def test_a_step_reuses_the_pages_of_the_previous_one():
    kept, default = run_program("keep"), run_program("default")
    assert kept["applied"] is True and kept["async"] is False, kept
    pages = 64 * 2**20 // 4096
    # By default each execution faults its temporary in again; kept, it finds it mapped (the
    # heap may still move once after the first calls, hence medians).
    assert median(default["faults"]) > pages // 2, f"default faults per step {default['faults']}, {pages} pages"
    assert median(kept["faults"]) < pages // 8, f"faults per step with the settings {kept['faults']}, {pages} pages"


def test_too_late_once_jax_started():
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()
    assert keep_freed_host_memory() is False


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("cpu,tpu", True), ("tpu", False), ("cuda", False)])
def test_training_on_cpu_follows_jax_platforms(platforms, expected):
    """The CPU settings are applied only where the CPU is the training platform."""
    assert training_on_cpu(platforms) is expected, f"JAX_PLATFORMS={platforms}"


def test_training_on_cpu_without_accelerator_devices(monkeypatch):
    """An accelerator plugin installed on a machine without its device files trains on the CPU."""
    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: [])
    assert training_on_cpu(""), "no device files, yet not the CPU"
    monkeypatch.setattr(host_memory, "_installed", lambda module: module == "libtpu")
    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    assert not training_on_cpu(""), "libtpu and a TPU device file, yet the CPU"
