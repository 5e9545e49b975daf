"""Declaring a module's parameters, with the shape of a given parameter checked directly.

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
import numpy as np


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


def storage_dtype(name: str, dtype: Any) -> Any:
    """The dtype to keep parameter `name` (the last part of its path) in for computing in `dtype`:
    `dtype` for the weights the computation casts to it (`COMPUTE_DTYPE_NAMES`), float32 for the rest."""
    return jnp.dtype(dtype) if name in COMPUTE_DTYPE_NAMES else jnp.dtype(jnp.float32)


def weights_in_compute_dtype(params: Any, dtype: Any) -> Any:
    """`params` (float32) with the weights the computation casts to `dtype` stored in `dtype`
    (`storage_dtype`), the rest unchanged: the same results as `params`, without casting every
    weight in every call (for bart-base in bfloat16, about a quarter of a second a generation call
    on 2 CPU cores) and with half their memory. Weights of another kind (int8) stay as they are."""

    def cast(path, leaf):
        if isinstance(leaf, (jax.Array, np.ndarray)) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(storage_dtype(getattr(path[-1], "key", None), dtype))
        return leaf

    return jax.tree_util.tree_map_with_path(cast, params)
