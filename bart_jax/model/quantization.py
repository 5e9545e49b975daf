"""int8 inference: which weights of a parameter tree are stored as int8, and how.

`quantize_params(params, "int8")` replaces weights by `QuantizedWeight`s (int8 values with a
float32 scale per output row, made by qwix, kernels/quantized_linear.py); every module takes the
quantized tree as it is, since the kernel seam multiplies such weights by their int8 twins.

Modes (`MODES`):

    "int8"          int8 weights, and the inputs of each product quantized to int8 per row
                    (dynamic quantization, as CTranslate2's int8): int8 x int8 products, the
                    fast ones on backends with int8 units (CPUs with AVX512-VNNI, TPUs, GPUs).
    "int8-weights"  weight-only: int8 weights dequantized inside each product, inputs in the
                    compute dtype. Half of bf16's weight memory; it pays where XLA fuses the
                    conversion into the matmul (TPU, GPU), not on XLA's CPU backend.

Layers (`LAYERS`, default `DEFAULT_LAYERS`):

    "linear"       every linear layer: attention projections, fc1/fc2, the heads' dense layers;
    "vocabulary"   the token embedding tables and the LM head. In BART's published checkpoints
                   the LM head is the shared embedding table (tied): one int8 table then serves
                   both, its lookup dequantizing only the rows it reads. An untied `lm_head`
                   counts here too.

Position embeddings, LayerNorms, biases and `final_logits_bias` stay in the parameter dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Optional, Sequence

import jax
from flax import traverse_util

from bart_jax.model.kernels.quantized_linear import QuantizedWeight, from_values, quantize_weight

Params = Any

# mode -> how the inputs of its products are taken (QuantizedWeight.activations)
MODES = {"int8": "int8", "int8-weights": "float"}
LAYERS = ("linear", "vocabulary")
DEFAULT_LAYERS = ("linear", "vocabulary")
# Names of the arrays of a QuantizedWeight in a flat tree (a converted directory's tensors).
QVALUE, SCALE = "qvalue", "scale"
ARRAYS = (QVALUE, SCALE)
_VOCABULARY_MODULES = ("shared", "embed_tokens", "lm_head")


def check_quantize(quantize: Optional[str], layers: Optional[Iterable[str]] = None) -> tuple[Optional[str], tuple]:
    """(quantize, layers) validated: quantize None or one of MODES; layers a non-empty subset of
    LAYERS (None: DEFAULT_LAYERS), in LAYERS' order. ValueError otherwise."""
    if quantize is None:
        if layers is not None:
            raise ValueError("quantize_layers needs quantize (one of " + ", ".join(MODES) + ")")
        return None, ()
    if quantize not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)} or None, got {quantize!r}")
    layers = DEFAULT_LAYERS if layers is None else tuple(layers)
    unknown = sorted(set(layers) - set(LAYERS))
    if unknown or not layers:
        raise ValueError(f"quantize layers must be a non-empty subset of {LAYERS}, got {list(layers)}")
    return quantize, tuple(name for name in LAYERS if name in layers)


def layer_kind(path: Sequence[str], ndim: int) -> Optional[str]:
    """"linear", "vocabulary" or None (not quantizable) for the parameter at `path` (its names
    from the root) with `ndim` dimensions; stacked layers (scan_layers) have one more."""
    name, module = path[-1], (path[-2] if len(path) > 1 else "")
    stacked = any(part == "layers" for part in path)
    if ndim != (3 if stacked else 2):
        return None
    if module in _VOCABULARY_MODULES and name in ("embedding", "weight"):
        return "vocabulary"
    return "linear" if name == "weight" else None


# Compiled, once per shape: run op by op, qwix's steps would each hold a float32 temporary as large
# as the weight, several at once (quantizing bart-base's 147 MiB vocabulary table took 430 MiB more).
@functools.partial(jax.jit, static_argnames="activations")
def _quantize(value: Any, activations: str) -> QuantizedWeight:
    if value.ndim == 3:  # stacked layers: one int8 weight per layer, each with its own scales
        return jax.vmap(lambda weight: quantize_weight(weight, activations))(value)
    return quantize_weight(value, activations)


def quantize_leaf(path: Sequence[str], value: Any, quantize: str, layers: Optional[Iterable[str]] = None) -> Any:
    """The parameter `value` at `path` as a `QuantizedWeight` of mode `quantize` if it is a weight
    of `layers` (default DEFAULT_LAYERS, see `layer_kind`), else unchanged: `quantize_params`' rule
    for one leaf, for loaders that quantize each weight as they read it."""
    quantize, layers = check_quantize(quantize, layers)
    if isinstance(value, QuantizedWeight):
        raise ValueError("params are already quantized")
    kind = layer_kind(path, getattr(value, "ndim", 0))
    return _quantize(value, MODES[quantize]) if kind in layers else value


def quantize_params(params: Params, quantize: str, layers: Optional[Iterable[str]] = None) -> Params:
    """`params` with the weights of `layers` (default DEFAULT_LAYERS) as `QuantizedWeight`s of mode
    `quantize` ("int8" or "int8-weights"); other arrays unchanged. Weights already quantized are
    refused: quantize the float tree once."""
    quantize, layers = check_quantize(quantize, layers)
    if quantization_of(params) is not None:
        raise ValueError("params are already quantized")
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: quantize_leaf(path, value, quantize, layers)
                                         for path, value in flat.items()})


def _quantized_leaves(params: Params) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    return {tuple(getattr(key, "key", key) for key in path): leaf for path, leaf in leaves
            if isinstance(leaf, QuantizedWeight)}


def quantization_of(params: Params) -> Optional[dict]:
    """{"quantize": mode, "quantize_layers": [...]} of a quantized tree, None for a float one."""
    leaves = _quantized_leaves(params)
    if not leaves:
        return None
    modes = {mode for mode, activations in MODES.items()
             if any(leaf.activations == activations for leaf in leaves.values())}
    if len(modes) != 1:
        raise ValueError(f"params mix quantization modes {sorted(modes)}")
    layers = {layer_kind(path, leaf.ndim) for path, leaf in leaves.items()}
    return {"quantize": modes.pop(), "quantize_layers": [name for name in LAYERS if name in layers]}


def dequantize_params(params: Params) -> Params:
    """`params` with every `QuantizedWeight` replaced by its float32 value (qvalue x scale)."""
    return jax.tree.map(lambda leaf: leaf.__jax_array__() if isinstance(leaf, QuantizedWeight) else leaf, params,
                        is_leaf=lambda x: isinstance(x, QuantizedWeight))


def to_arrays(params: Params) -> Params:
    """`params` with each `QuantizedWeight` as a dict {QVALUE: int8, SCALE: float32}: plain arrays
    to save (the mode goes in the file's metadata, `quantization_of`)."""
    return jax.tree.map(lambda leaf: {QVALUE: leaf.array.qvalue, SCALE: leaf.array.scale}
                        if isinstance(leaf, QuantizedWeight) else leaf, params,
                        is_leaf=lambda x: isinstance(x, QuantizedWeight))


def is_qvalue(key: str, array: Any) -> bool:
    """Whether `key` ("/"-joined path) holds the int8 values of a quantized weight (`to_arrays`)."""
    return key.endswith("/" + QVALUE) and str(array.dtype) == "int8"


def quantized_owners(keys: Iterable[str]) -> set[str]:
    """The quantized weights ("/"-joined paths) of a flat tree of `to_arrays` ("/"-joined keys): the
    owners of QVALUE arrays (a LayerNorm's `scale` has none)."""
    return {key.rsplit("/", 1)[0] for key in keys if key.endswith("/" + QVALUE)}


def unquantized_arrays(flat: dict[str, Any]) -> list:
    """The arrays of a flat tree of `to_arrays` ("/"-joined keys) other than quantized weights'."""
    owners = quantized_owners(flat)
    return [value for key, value in flat.items() if key.rsplit("/", 1)[0] not in owners]


def weight_from_arrays(name: str, qvalue: Any, scale: Any, quantize: str) -> QuantizedWeight:
    """The `QuantizedWeight` of mode `quantize` stored as `qvalue` and `scale` (None when the file
    lacks it) under `name`. ValueError when the pair is incomplete or mis-shaped."""
    quantize, _ = check_quantize(quantize)
    if scale is None:
        raise ValueError(f"quantized weight {name} has {QVALUE} but no {SCALE}")
    if str(qvalue.dtype) != "int8" or tuple(scale.shape) != tuple(qvalue.shape[:-1]) + (1,):
        raise ValueError(f"quantized weight {name}: {QVALUE} must be int8 and {SCALE} shaped "
                         f"{tuple(qvalue.shape[:-1]) + (1,)}, got {qvalue.dtype} and {tuple(scale.shape)}")
    return from_values(qvalue, scale, MODES[quantize])
