"""The two layouts of layer stacks in a parameter tree: numbered (`layers_0 ... layers_{n-1}`, as
Hugging Face names them and unrolled modules create them) and stacked (one `layers` subtree whose
arrays have a leading layer axis [n, ...], what modules built with `scan_layers=True` create).
`stack_layers` and `unstack_layers` switch between them (re-exported by conversion.py)."""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]
NUMBERED_LAYER = re.compile(r"^layers_(\d+)$")


def stack_layers(params: Params) -> Params:
    """The layout of `scan_layers=True` modules: each group `layers_0 ... layers_{n-1}` becomes
    one `layers` subtree whose arrays are stacked along a new leading axis [n, ...]. Already
    stacked params pass through unchanged; numpy stays numpy, device arrays stay on device."""
    if not isinstance(params, Mapping):
        return params
    numbered = sorted((int(match.group(1)), key) for key in params if (match := NUMBERED_LAYER.match(key)))
    stacked = {key: stack_layers(value) for key, value in params.items() if not NUMBERED_LAYER.match(key)}
    if numbered:
        indices = [index for index, _ in numbered]
        if "layers" in params:
            raise ValueError(f"params hold both stacked `layers` and numbered layers {indices}")
        if indices != list(range(len(indices))):
            raise ValueError(f"layers are numbered {indices}; stacking needs 0 .. {len(indices) - 1}")

        def stack(*values):
            on_device = any(isinstance(value, jax.Array) for value in values)
            return jnp.stack(values) if on_device else np.stack([np.asarray(value) for value in values])

        stacked["layers"] = jax.tree_util.tree_map(stack, *(params[key] for _, key in numbered))
    return stacked


def unstack_layers(params: Params) -> Params:
    """The inverse of `stack_layers`: each stacked `layers` subtree [n, ...] becomes `layers_0 ...
    layers_{n-1}`. Unstacked params pass through unchanged."""
    if not isinstance(params, Mapping):
        return params
    unstacked = {key: unstack_layers(value) for key, value in params.items() if key != "layers"}
    if "layers" in params:
        num_layers = jax.tree_util.tree_leaves(params["layers"])[0].shape[0]
        for index in range(num_layers):
            unstacked[f"layers_{index}"] = jax.tree_util.tree_map(lambda value: value[index], params["layers"])
    return unstacked
