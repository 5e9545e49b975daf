"""The five heads declared once: for each, its module, where its weights sit in a transformers
state dict, which parts it adds to the base model, which keys alias the word embeddings, and
what the rest of the package asks of it (generation, EOS pooling, token labels, training tasks,
pipelines). Conversion, validation, loading, training and the applications read this table
instead of comparing head names.

The parameter tree of a head is not written out anywhere: `param_shapes` traces the module's
own `init` abstractly (`jax.eval_shape`), so the tree checkpoints are checked against is the
one the forward pass uses.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from bart_jax.config import BartConfig
from bart_jax.model.heads import (
    BartForCausalLM,
    BartForConditionalGeneration,
    BartForQuestionAnswering,
    BartForSequenceClassification,
    BartModel,
)

# Where a head keeps the base model, in both formats: transformers' `base_model_prefix`.
BASE_MODEL = "model"
_SEQ2SEQ_BASE = ("shared", "encoder", "decoder")
# The encoder's and decoder's token embeddings, which alias `shared` when tied.
_STACK_EMBEDDINGS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What the package needs to know about one head besides its forward pass.

    Keys are transformers state-dict keys as the head's own `save_pretrained` names them, so
    with `prefix` for the base model's ("model.shared.weight", or "shared.weight" for BartModel).
    """

    module: type[nn.Module]
    # Prefix of the base model's keys: "model." under a head, "" for the bare BartModel.
    prefix: str
    # Subtrees of the base model the head holds (the causal LM has the decoder alone).
    base_parts: tuple[str, ...]
    # Top-level parts of the head's own, beside the base model; same names in both formats.
    # `lm_head` holds a weight of its own only when the word embeddings are untied.
    parts: tuple[str, ...]
    # The key of the word-embedding table the Flax tree keeps ...
    embedding_key: str
    # ... and the keys that alias it when `tie_word_embeddings` (transformers neither saves nor
    # needs them; old checkpoints store them as copies).
    tied: tuple[str, ...]
    # Generation and summarization: an encoder-decoder LM head with a generation config.
    generates: bool = False
    # `labels` are token ids ([batch, length], -100 ignored), checked against the vocabulary.
    token_labels: bool = False
    # Pools at each row's last EOS, so it needs input_ids with one (sequence classification).
    pools_at_eos: bool = False
    # Training tasks (bart_jax/training/objectives.py) trained with this head.
    training_tasks: tuple[str, ...] = ()
    # Pipelines (bart_jax/apps/pipelines.py) that run on this head.
    pipelines: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The transformers architecture name, e.g. "BartForConditionalGeneration"."""
        return self.module.__name__

    @property
    def has_encoder(self) -> bool:
        return "encoder" in self.base_parts

    def tied_keys(self, config: BartConfig) -> tuple[str, ...]:
        """The keys that alias `embedding_key` under `config` (none when untied)."""
        return self.tied if config.tie_word_embeddings else ()

    def param_shapes(self, config: BartConfig) -> dict:
        """The head's parameter tree for `config`, layers unstacked, with shape tuples as leaves."""
        return param_shapes(config, self.name)


def _seq2seq(module: type[nn.Module], parts: tuple[str, ...] = (), tied: tuple[str, ...] = (),
             **facts: Any) -> HeadSpec:
    """A head over the whole encoder-decoder, kept under `model`."""
    prefix = BASE_MODEL + "."
    return HeadSpec(module, prefix, _SEQ2SEQ_BASE, parts, prefix + "shared.weight",
                    tuple(prefix + key for key in _STACK_EMBEDDINGS) + tied, **facts)


REGISTRY: dict[str, HeadSpec] = {spec.name: spec for spec in (
    HeadSpec(BartModel, "", _SEQ2SEQ_BASE, (), "shared.weight", _STACK_EMBEDDINGS),
    _seq2seq(BartForConditionalGeneration, ("final_logits_bias", "lm_head"), ("lm_head.weight",),
             generates=True, token_labels=True, training_tasks=("denoise", "seq2seq"), pipelines=("fill_mask",)),
    _seq2seq(BartForSequenceClassification, ("classification_head",), pools_at_eos=True,
             training_tasks=("classify",), pipelines=("zero_shot_classify",)),
    _seq2seq(BartForQuestionAnswering, ("qa_outputs",), training_tasks=("qa",), pipelines=("answer_question",)),
    # The decoder owns its token embeddings; the LM head is tied to them.
    HeadSpec(BartForCausalLM, BASE_MODEL + ".", ("decoder",), ("lm_head",), "model.decoder.embed_tokens.weight",
             ("lm_head.weight",), token_labels=True),
)}
HEAD_NAMES = tuple(REGISTRY)


def head_spec(head: str) -> HeadSpec:
    """The spec of a head named as transformers names the class; ValueError for another name."""
    try:
        return REGISTRY[head]
    except (KeyError, TypeError):
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEAD_NAMES)}") from None


def check_head(head: str) -> None:
    """Raises ValueError unless `head` names a head."""
    head_spec(head)


def head_from_config(config: BartConfig) -> str:
    """The head named by `config.architectures` (what transformers' `save_pretrained` records)."""
    architectures = config.architectures
    if not architectures:
        raise ValueError(f"config.json names no architecture; choose a head: {', '.join(HEAD_NAMES)}")
    if architectures[0] not in REGISTRY:
        raise ValueError(f"config.json names architecture {architectures[0]!r}; choose a head: {', '.join(HEAD_NAMES)}")
    return architectures[0]


def heads_where(fact: str, value: Any = True) -> tuple[str, ...]:
    """Names of the heads whose spec has `fact` == `value`, or holds `value` where `fact` is a
    tuple; e.g. heads_where("pipelines", "fill_mask")."""
    found = []
    for name, spec in REGISTRY.items():
        held = getattr(spec, fact)
        if (value in held) if isinstance(held, tuple) else held == value:
            found.append(name)
    return tuple(found)


def training_task_heads() -> dict[str, str]:
    """Training task -> the head it trains, e.g. "classify" -> "BartForSequenceClassification"."""
    return {task: name for name, spec in REGISTRY.items() for task in spec.training_tasks}


def init_inputs(config: BartConfig) -> dict[str, np.ndarray]:
    """Inputs on which every head's `init` creates all its parameters: one row `<s> </s>` [1, 2]
    (sequence classification pools at the EOS; every decoder layer creates its cross-attention
    even without encoder states, as transformers' causal LM holds it)."""
    return {"input_ids": np.array([[config.bos_token_id, config.eos_token_id]], np.int32)}


def param_shapes(config: BartConfig, head: str) -> dict:
    """The parameter tree of `head` for `config` (layers unstacked, `layers_0`...), with shape tuples
    as leaves: what the module's `init` creates, traced without computing anything. Cached per
    (config, head); each call returns a new tree."""
    spec = head_spec(head)
    # `extra` (architectures and other config.json leftovers) never changes a shape.
    flat = _flat_param_shapes(config.replace(extra=()), spec.name)
    return traverse_util.unflatten_dict(dict(flat))


@functools.lru_cache(maxsize=64)
def _flat_param_shapes(config: BartConfig, head: str) -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
    # The portable kernels: the parameters are the same under every policy, and tracing one
    # formulation is quicker than tracing a platform-dependent pair.
    module = REGISTRY[head].module(config, kernels="portable")
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **init_inputs(config)))
    return tuple((path, tuple(leaf.shape)) for path, leaf in traverse_util.flatten_dict(variables["params"]).items())
