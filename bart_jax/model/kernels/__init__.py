"""The kernel seam: every backend-specific formulation of BART's computation, each beside its
portable twin, and the policy that chooses between them.

    kernels="portable"  the plain JAX formulation, the reference that every backend runs
                        (`x @ W.T`, two-pass LayerNorm statistics, einsum attention, a
                        [batch, slots, heads, head_dim] cache written with dynamic_update_slice
                        and read whole, `lax.top_k`, `jnp.argmax`);
    kernels="cpu"       the formulations tuned for XLA's CPU backend (docs/cpu-kernels.md);
    kernels="tpu"       the TPU formulations where there are any, the portable ones elsewhere:
                        attention without weights or dropout by the Pallas flash-attention
                        kernel (attention_tpu.py), whose [batch, heads, query, key] scores never
                        reach memory; the decoder cache and cross-attention keys/values keep the
                        portable layout;
    kernels="auto"      the CPU formulation where the computation is compiled for a CPU, the
                        TPU one where it is compiled for a TPU, the portable one everywhere else.

Results agree across policies (tests/model/kernels); speed, and the layouts of the decoder
cache and of projected cross-attention keys/values, differ.

How "auto" follows the platform compiled for, not the host that traces:
- A kernel whose inputs and outputs are the same under both policies (`dispatch`) is traced
  both ways inside `lax.platform_dependent`; lowering keeps the branch of the platform it lowers
  for. `jax.export` for "cuda" therefore gets the portable kernels, an ahead-of-time compile for
  a TPU from a CPU host the TPU ones.
- A layout (the decoder cache, cross-attention keys/values) must be chosen while tracing
  (`layout`): "auto" takes the platform of the mesh set with `jax.set_mesh`, else JAX's default
  backend. `generate_static` with "auto" traces the whole generation under both layouts inside
  `lax.platform_dependent`, and the Python entry points (`generate`, `load_pretrained(...)`
  models, summarization, the sharded entry points) settle "auto" from where their arrays live
  before tracing (`resolve`), so that only one is traced.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

KERNELS = ("auto", "portable", "cpu", "tpu")


def check_kernels(kernels: str) -> str:
    """`kernels` if it names a policy; ValueError otherwise."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    return kernels


def for_platform(platform: str) -> str:
    """The concrete policy "auto" means on `platform` ("cpu", "cuda", "rocm", "tpu", ...)."""
    return platform if platform in ("cpu", "tpu") else "portable"


def dispatch(kernels: str, cpu: Callable, portable: Callable, *args: Any, tpu: Optional[Callable] = None) -> Any:
    """`cpu(*args)`, `tpu(*args)` (`portable` where there is no `tpu`) or `portable(*args)` as
    `kernels` says; with "auto", the one of the platform being lowered for
    (`lax.platform_dependent`). All must return the same types."""
    check_kernels(kernels)
    tpu = portable if tpu is None else tpu
    if kernels == "portable":
        return portable(*args)
    if kernels == "cpu":
        return cpu(*args)
    if kernels == "tpu":
        return tpu(*args)
    if tpu is portable:
        return lax.platform_dependent(*args, cpu=cpu, default=portable)
    return lax.platform_dependent(*args, cpu=cpu, tpu=tpu, default=portable)


def with_second_row(product: Callable, rows: jax.Array, *operands: Any) -> jax.Array:
    """`product(rows, *operands)` of rows [n, in] -> [n, ...]; a single row gets a zero second row,
    dropped from the result.

    XLA's CPU backend has no bfloat16 or int8 matrix-vector product: for one row it converts the
    whole weight (to float32, or int8 to int32) and, the weight being loop-invariant, moves that
    conversion out of the decoding loop, so every generation call converts every decoder weight.
    Two rows take the matmul kernels, which read the weight as stored (docs/cpu-kernels.md)."""
    if rows.shape[0] != 1:
        return product(rows, *operands)
    return product(jnp.pad(rows, [(0, 1), (0, 0)]), *operands)[:1]


def float32_precision() -> Optional[lax.Precision]:
    """The precision of float32 products where fp32 parity is promised: `lax.Precision.HIGHEST`
    (true float32: TPUs would otherwise multiply in one bfloat16 pass, recent GPUs in TF32),
    unless the user chose one with `jax.default_matmul_precision` (or `JAX_DEFAULT_MATMUL_PRECISION`,
    e.g. "tensorfloat32" or "bfloat16": the fast setting), which then applies."""
    return None if jax.config.jax_default_matmul_precision is not None else lax.Precision.HIGHEST


def trace_platform() -> str:
    """The platform a computation traced now will most likely be compiled for: that of the
    mesh set with `jax.set_mesh` (e.g. TPU devices of an ahead-of-time topology), else JAX's
    default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return jax.default_backend() if device is None else device.platform


def layout(kernels: str) -> str:
    """The concrete layout ("portable" or "cpu") of caches and cross-attention keys/values
    under `kernels`, chosen while tracing ("auto": `trace_platform`). The TPU kernels keep the
    portable layout."""
    check_kernels(kernels)
    concrete = for_platform(trace_platform()) if kernels == "auto" else kernels
    return "cpu" if concrete == "cpu" else "portable"


def platform_of(tree: Any = None, mesh: Optional[jax.sharding.Mesh] = None) -> str:
    """The platform of `mesh`'s devices, else of the first device array in `tree`, else JAX's
    default backend (host arrays are placed there)."""
    if mesh is not None:
        return mesh.devices.flat[0].platform
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            return next(iter(leaf.devices())).platform
    return jax.default_backend()


def resolve(kernels: str, tree: Any = None, mesh: Optional[jax.sharding.Mesh] = None) -> str:
    """`kernels` with "auto" settled from where concrete arrays live (`platform_of`). Inside a
    trace (`tree` holding tracers and no mesh) "auto" stays "auto"."""
    check_kernels(kernels)
    if kernels != "auto":
        return kernels
    if mesh is None and any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree)):
        return "auto"
    return for_platform(platform_of(tree, mesh))


def settled(module: Any, tree: Any = None, mesh: Optional[jax.sharding.Mesh] = None) -> Any:
    """`module` (any module with a `kernels` attribute) with "auto" settled by `resolve`: the
    module to trace once where the platform is known, instead of both ways."""
    kernels = resolve(module.kernels, tree, mesh)
    return module if kernels == module.kernels else module.clone(kernels=kernels)
