"""Declaring a module's parameters, with the shape of a given parameter checked directly; and the
dtypes parameters are kept in (`cast_leaf`, `weights_in_compute_dtype`).

`nn.Module.param` checks a given parameter's shape by evaluating its initialiser abstractly
(`jax.eval_shape`), once per parameter every time a model is traced: for bart-base generation,
about 0.2 s of the 0.7-1.1 s that tracing takes before compilation. The layers here know the shape
they expect, so they compare it instead.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bart_jax.model.kernels.quantized_linear import QuantizedWeight


def checked_param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], dtype: Any) -> Any:
    """`module.param(name, init, shape, dtype)`: the given parameter, or a new one when
    initialising. Raises ValueError naming the parameter when the given one has another shape."""
    if not module.has_variable("params", name):
        return module.param(name, init, shape, dtype)
    value = module.get_variable("params", name)
    if tuple(value.shape) != tuple(shape):
        path = "/".join(module.path + (name,))
        raise ValueError(f"parameter {path} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    return value


# Parameters the computation casts to its dtype before using them: linear weights [out, in]
# (stacked [layers, out, in]) and embedding tables. LayerNorm scales, biases and
# `final_logits_bias` enter float32 arithmetic as they are.
COMPUTE_DTYPE_NAMES = ("weight", "embedding")


def float_dtype(dtype: Any) -> jnp.dtype:
    """`dtype` as a floating-point `jnp.dtype`; ValueError for any other."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"cast_params needs a floating-point dtype, got {dtype}")
    return dtype


def cast_leaf(leaf: Any, dtype: Any) -> Any:
    """`leaf` cast to `dtype` if it is a floating-point array of another dtype; other arrays and
    int8 weights (whose scales stay float32) unchanged."""
    dtype = float_dtype(dtype)
    if isinstance(leaf, QuantizedWeight) or not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.dtype == dtype:
        return leaf
    return leaf.astype(dtype)


def param_dtype_for(name: str, dtype: Any) -> jnp.dtype:
    """The dtype to keep parameter `name` (the last part of its path) in for computing in `dtype`:
    `dtype` for the weights the computation casts to it (`COMPUTE_DTYPE_NAMES`), float32 for the rest."""
    return jnp.dtype(dtype) if name in COMPUTE_DTYPE_NAMES else jnp.dtype(jnp.float32)


def weights_in_compute_dtype(params: Any, dtype: Any) -> Any:
    """`params` with each parameter cast to `param_dtype_for` computing in `dtype`: the weights the
    computation casts stored in `dtype`, the rest float32. The same results as float32 `params`,
    without casting every weight in every call (for bart-base in bfloat16, about a quarter of a
    second a generation call on 2 CPU cores) and with half their memory. int8 weights stay as they are."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: cast_leaf(leaf, param_dtype_for(getattr(path[-1], "key", None), dtype)), params,
        is_leaf=lambda leaf: isinstance(leaf, QuantizedWeight))
