"""`load_pretrained`: a BART model from a Hugging Face directory, a converted bart_jax
directory or a hub id, as one object holding config, module, params, generation options and
tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax import parallel
from bart_jax.checkpoints import conversion, files
from bart_jax.checkpoints.hub import resolve_model_directory
from bart_jax.config import BartConfig
from bart_jax.generation.config import GenerationConfig
from bart_jax.generation.generate import generate
from bart_jax.model import quantization
from bart_jax.model.kernels import check_kernels, settled
from bart_jax.model.parameters import cast_leaf, param_dtype_for
from bart_jax.model.registry import head_from_config, head_spec, heads_where
from bart_jax.model.validation import check_inputs
from bart_jax.tokenizer import BartTokenizer

DEFAULT_HEAD = "BartForConditionalGeneration"
# Keyword arguments of the heads that are Python flags, not arrays (static under jit).
STATIC_ARGUMENTS = ("output_attentions", "output_hidden_states", "deterministic")


@functools.partial(jax.jit, static_argnames=("module", "flags"))
def _apply(module, params, arrays: dict[str, jax.Array], flags: tuple[tuple[str, bool], ...], rngs):
    return module.apply({"params": params}, **arrays, **dict(flags), rngs=rngs)


@dataclasses.dataclass
class PretrainedBart:
    """A loaded model: `module.apply({"params": params}, ...)` wrapped with input validation and jit."""

    config: BartConfig
    head: str
    module: Any
    params: Any
    generation_config: Optional[GenerationConfig] = None
    tokenizer: Optional[BartTokenizer] = None
    source: Optional[str] = None

    def __call__(self, dropout_rng: Optional[jax.Array] = None, **inputs):
        """Runs the head with transformers' argument names (input_ids, attention_mask,
        decoder_input_ids, labels, output_hidden_states, ...) and returns its output dataclass.

        Inputs are validated first (ids in the vocabulary, lengths, mask shapes, EOS for
        classification). Passing `dropout_rng` runs in training mode (dropout, layerdrop).
        """
        accepted = set(inspect.signature(type(self.module).__call__).parameters) - {"self"}
        unknown = sorted(set(inputs) - accepted)
        if unknown:
            raise ValueError(f"{self.head} takes no argument(s) {unknown}; it accepts {sorted(accepted)}")
        inputs = {name: value for name, value in inputs.items() if value is not None}
        flags = {name: bool(inputs.pop(name)) for name in STATIC_ARGUMENTS if name in inputs}
        flags.setdefault("deterministic", dropout_rng is None)
        checked = check_inputs(self.config, self.head, inputs)
        arrays = {name: jnp.asarray(value) for name, value in checked.items()}
        rngs = None if dropout_rng is None else {"dropout": dropout_rng}
        return _apply(self.module, self.params, arrays, tuple(sorted(flags.items())), rngs)

    def generate(self, input_ids, attention_mask=None, prng_key=None, return_scores=False, **options):
        """Generates with this model's generation options overridden by `options`; see
        `bart_jax.generation.generate`. Returns ids [batch * num_return_sequences, length]."""
        if not head_spec(self.head).generates:
            raise ValueError(f"generate needs a {' or '.join(heads_where('generates'))} model, this one is {self.head}")
        input_ids = check_inputs(self.config, self.head, {"input_ids": input_ids})["input_ids"]
        if attention_mask is not None:
            attention_mask = check_inputs(
                self.config, self.head, {"input_ids": input_ids, "attention_mask": attention_mask}
            )["attention_mask"]
        return generate(self.module, self.params, input_ids, attention_mask, self.generation_config,
                        prng_key=prng_key, return_scores=return_scores, **options)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes a converted bart_jax directory (params, config, generation config, tokenizer)."""
        params = jax.tree_util.tree_map(np.asarray, self.params)
        files.save_converted(params, self.config, self.head, directory, copy_files_from=self.source)

    def save_hf(self, directory: str | os.PathLike, max_shard_size: int | str | None = None) -> None:
        """Writes a Hugging Face directory that `transformers.<head>.from_pretrained` loads."""
        if quantization.quantization_of(self.params) is not None:
            raise ValueError("int8 weights save only in the converted format (save_pretrained); "
                             "load the float checkpoint to export a Hugging Face directory")
        params = jax.tree_util.tree_map(np.asarray, self.params)
        files.save_hf_directory(params, self.config, self.head, directory, max_shard_size=max_shard_size,
                                           copy_files_from=self.source)


def _resolve_head(config: BartConfig, head: Optional[str]) -> str:
    if head is not None:
        return head_spec(head).name
    return head_from_config(config) if config.architectures else DEFAULT_HEAD


def _placement(quantize: Optional[str], quantize_layers: tuple, dtype: Any, param_dtype: Any,
               mesh: Optional[jax.sharding.Mesh]) -> Callable[[tuple[str, ...], Any], Any]:
    """What the loader does with each parameter as it is read (`transform` of the conversions):
    quantize it (if asked and of `quantize_layers`), cast it to `param_dtype` (None: to
    `param_dtype_for` computing in `dtype`) and, without a mesh,
    put it on the device, before the next is read. So the float tree of an int8 model never exists
    whole, and a float model is never held twice (host and device) at once. With a mesh, the
    host tree is placed whole afterwards (`parallel.shard_params`, one shard per device)."""

    def place(path: tuple[str, ...], array: Any) -> Any:
        if mesh is None:
            # On the device once: host (numpy) params would be copied again by every jitted call.
            array = jax.device_put(array)
        if quantize is not None:  # from the checkpoint's own values; the scales stay float32
            array = quantization.quantize_leaf(path, array, quantize, quantize_layers)
        # Waited for, so that the host copy goes as soon as the caller drops it: a transfer or
        # computation still holding it would leave it to Python's next garbage collection.
        target = param_dtype_for(path[-1], dtype) if param_dtype is None else param_dtype
        return jax.block_until_ready(cast_leaf(array, target))

    return place


def load_pretrained(
    path_or_hub_id: str | os.PathLike,
    head: Optional[str] = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    *,
    head_params: Any = None,
    strict: bool = True,
    revision: Optional[str] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Any = None,
    kernels: str = "auto",
    quantize: Optional[str] = None,
    quantize_layers: Optional[tuple[str, ...]] = None,
) -> PretrainedBart:
    """Loads BART from a Hugging Face directory, a converted bart_jax directory or a hub id.

    head: a transformers class name ("BartForConditionalGeneration", ...); None takes the
    checkpoint's `architectures` (conditional generation when it names none). dtype: the
    computation dtype. param_dtype: the dtype every parameter is kept in (float32 for training
    from these parameters in mixed precision); None, the default, keeps the weights the
    computation casts to `dtype` (linear weights, embedding tables) in `dtype` and the rest
    (biases, LayerNorms) in float32: the same results as float32 parameters, with less memory and
    no cast of every weight in every call (bart_jax/model/parameters.py).
    head_params: initial values for head weights the checkpoint lacks (e.g. a fresh
    classification head on bart-large); without them such a load is an error, never a silent
    random init. strict: tensors of the checkpoint that `head` does not use are an error.
    mesh, rules: place each parameter straight from the host copy onto its shards of `mesh`
    (`bart_jax.parallel.shard_params`; rules default to `parallel.RULES`); without a mesh each
    parameter goes to the device as it is read, and with quantize each weight is quantized as it
    is read: the float checkpoint is never held whole besides the loaded model.
    kernels: "auto" (the formulations of the platform the parameters are placed on: the returned
    module's `kernels` names it), "portable", "cpu" or "tpu" (see bart_jax/model/kernels/); the results agree.
    quantize: "int8" (int8 weights, products of int8 inputs quantized per row) or "int8-weights"
    (weight-only), for inference; quantize_layers: of ("linear", "vocabulary"), default both
    (bart_jax/model/quantization.py). A converted directory saved quantized loads quantized.
    """
    check_kernels(kernels)
    quantize, quantize_layers = quantization.check_quantize(quantize, quantize_layers)
    directory = resolve_model_directory(path_or_hub_id, revision=revision)
    config = BartConfig.from_pretrained(directory)
    converted = files.is_converted_directory(directory)
    if converted:
        marker = files.read_marker(directory)
        saved_head = marker["head"]
        head = _resolve_head(config, head or saved_head)
        if marker.get("quantize") is not None:
            saved = {key: marker[key] for key in ("quantize", "quantize_layers")}
            if quantize is not None and (quantize, list(quantize_layers)) != (saved["quantize"], saved["quantize_layers"]):
                raise ValueError(f"{directory} holds weights quantized as {saved}; load it without quantize, "
                                 "or quantize from the float checkpoint")
            if head != saved_head:
                raise ValueError(f"{directory} holds quantized {saved_head} weights; load it as {saved_head}")
            quantize = None
    else:
        head = _resolve_head(config, head)
    place = _placement(quantize, quantize_layers, dtype, param_dtype, mesh)
    if converted and head == saved_head:
        params = files.load_converted(directory, transform=place)[1]
    else:  # read under Hugging Face names, converted to `head`
        state = files.open_converted_as_hf(directory) if converted else files.open_hf_state_dict(directory)
        params = conversion.hf_to_flax(state, config, head, head_params=head_params, strict=strict, transform=place)
    if mesh is not None:
        params = parallel.shard_params(params, mesh, parallel.RULES if rules is None else rules)
    spec = head_spec(head)
    # "auto" settled by where the parameters were placed: the module then traces once.
    module = settled(spec.module(config, dtype=dtype, param_dtype=param_dtype or jnp.float32, kernels=kernels),
                     params, mesh)
    tokenizer = None
    if any(os.path.isfile(os.path.join(directory, name)) for name in ("tokenizer.json", "vocab.json")):
        tokenizer = BartTokenizer.from_pretrained(directory)
    generation_config = GenerationConfig.from_pretrained(directory) if spec.generates else None
    return PretrainedBart(config, head, module, params, generation_config, tokenizer, directory)
