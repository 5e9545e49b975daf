"""The model to train: a pretrained checkpoint (fine-tuning, possibly with a new head) or a
config preset (training from scratch), and the export of the trained weights.

Weights are kept in float32 (the optimizer's master copy); `dtype` is only the computation dtype.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bart_jax.checkpoints import conversion, files
from bart_jax.checkpoints.hub import resolve_model_directory
from bart_jax.config import BartConfig
from bart_jax.generation.config import GenerationConfig
from bart_jax.model.registry import BASE_MODEL, head_spec, init_inputs
from bart_jax.tokenizer import BartTokenizer

logger = logging.getLogger(__name__)

MODEL_DIR = "model"  # the trained model, converted bart_jax format
HF_MODEL_DIR = "hf_model"  # the trained model as a transformers directory


@dataclasses.dataclass
class TrainingModel:
    config: BartConfig
    head: str
    module: Any  # the head module, computing in the training dtype
    params: Any  # float32 parameters (layers stacked when module.scan_layers)
    tokenizer: BartTokenizer
    generation_config: Optional[GenerationConfig]
    source: str  # directory whose side files (generation config) are exported with the model


def parse_config_overrides(text: Optional[str]) -> dict[str, Any]:
    """"d_model=16,encoder_layers=1,dropout=0.1,activation_function=relu" -> typed values."""
    if not text:
        return {}
    fields = {field.name for field in dataclasses.fields(BartConfig)} | {"num_labels"}
    overrides = {}
    for item in text.split(","):
        name, separator, value = item.partition("=")
        name = name.strip()
        if not separator or name not in fields:
            raise ValueError(f"config_overrides entry {item!r} is not <BartConfig field>=<value>")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = value.strip()
    return overrides


def config_from_name(config_name: str) -> tuple[BartConfig, str]:
    """(config, its directory) from a config directory or a config.json path."""
    if os.path.isdir(config_name):
        return BartConfig.from_pretrained(config_name), config_name
    if os.path.isfile(config_name):
        return BartConfig.from_json_file(config_name), os.path.dirname(config_name) or "."
    raise ValueError(f"config not found: {config_name} (pass a directory with config.json, or the file)")


def initial_params(module: Any, rng: jax.Array, names: Optional[tuple[str, ...]] = None) -> Any:
    """The module's own random init; with `names`, only those top-level subtrees (the rest is
    never computed: jit drops what is not returned)."""

    def init(key):
        params = module.init(key, **init_inputs(module.config))["params"]
        return params if names is None else {name: params[name] for name in names}

    return jax.jit(init)(rng)


def _checkpoint_state_dict(directory: str) -> dict[str, np.ndarray]:
    """A checkpoint's weights in transformers' names, from either directory format."""
    if files.is_converted_directory(directory):
        saved_config, params, saved_head = files.load_converted(directory)
        return conversion.flax_to_hf(params, saved_config, saved_head)
    return files.load_hf_state_dict(directory)


def pretrained_params(directory: str, config: BartConfig, head: str, module: Any, rng: jax.Array) -> Any:
    """float32 params of `head` from a checkpoint; head weights it lacks, or whose shape no longer
    fits (another number of labels), start from the module's own init."""
    state = _checkpoint_state_dict(directory)
    expected = conversion.expected_flax_shapes(config, head)
    # Head parts (e.g. classification_head) missing a weight, or with a weight of another shape,
    # start anew as a whole.
    fresh_parts = set()
    for path, shape in traverse_util.flatten_dict(expected).items():
        key = conversion.hf_key(path)
        if path[0] == BASE_MODEL or (key in state and np.shape(state[key]) == shape):
            continue
        if key in state:
            logger.warning("not loading %s %s: the new head needs %s", key, np.shape(state[key]), shape)
        fresh_parts.add(path[0])
    state = {key: value for key, value in state.items() if key.split(".")[0] not in fresh_parts}
    fresh = initial_params(module, rng, tuple(sorted(fresh_parts))) if fresh_parts else None
    converted = conversion.convert_hf_state_dict(state, config, head, head_params=fresh)
    if converted.from_head_params:
        logger.info("new head weights (randomly initialised): %s", ", ".join(converted.from_head_params))
    if converted.unused_keys:
        logger.info("checkpoint weights this head does not use: %s", ", ".join(converted.unused_keys))
    return conversion.cast_params(converted.params, jnp.float32)


def load_training_model(model_name_or_path: Optional[str], config_name: Optional[str], task_head: str,
                        config_changes: dict[str, Any], dtype: str, tokenizer_name: Optional[str],
                        rng: jax.Array, remat_policy: str = "none", scan_layers: bool = False) -> TrainingModel:
    """The head to train, from a checkpoint (`model_name_or_path`) or from scratch (`config_name`).
    `remat_policy`: the layers' rematerialisation (bart_jax.model.layers.REMAT_POLICIES); `scan_layers`:
    each layer stack as one `nn.scan`, its parameters stacked (`conversion.stack_layers`)."""
    if model_name_or_path:
        directory = resolve_model_directory(model_name_or_path)
        config = BartConfig.from_pretrained(directory)
    else:
        config, directory = config_from_name(config_name)
    try:
        config = config.replace(**config_changes)
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid config change {config_changes}: {error}") from None
    spec = head_spec(task_head)
    module = spec.module(config, dtype=jnp.dtype(dtype), param_dtype=jnp.float32, scan_layers=scan_layers,
                         remat_policy=remat_policy)
    if model_name_or_path:
        params = pretrained_params(directory, config, task_head, module, rng)
        params = conversion.stack_layers(params) if scan_layers else params
    else:
        params = initial_params(module, rng)
    tokenizer_directory = tokenizer_name or directory
    try:
        tokenizer = BartTokenizer.from_pretrained(tokenizer_directory)
    except ValueError as error:
        raise ValueError(f"{error}; pass --tokenizer_name") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{config.vocab_size}")
    generation_config = GenerationConfig.from_pretrained(directory) if spec.generates else None
    return TrainingModel(config, task_head, module, params, tokenizer, generation_config, directory)


def export_model(model: TrainingModel, params: Any, output_dir: str) -> tuple[str, str]:
    """Writes the trained model as a converted bart_jax directory and as a transformers directory.

    Returns (converted directory, transformers directory).
    """
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    params = conversion.unstack_layers(params) if model.module.scan_layers else params
    directories = (os.path.join(output_dir, MODEL_DIR), os.path.join(output_dir, HF_MODEL_DIR))
    files.save_converted(params, model.config, model.head, directories[0], copy_files_from=model.source)
    files.save_hf_directory(params, model.config, model.head, directories[1], copy_files_from=model.source)
    for directory in directories:
        model.tokenizer.save_pretrained(directory)
    return directories
