"""The head registry against the modules and transformers' model classes: every head builds, its
checkpoint prefix, parts and tied keys are those of transformers' state dicts, and every
parameter it derives has exactly one entry in the logical-axes table."""

from __future__ import annotations

import functools

import jax
import pytest
from flax import traverse_util
from hf_reference import HEADS, hf_model

from bart_jax.apps import pipelines
from bart_jax.checkpoints import conversion
from bart_jax.config import BartConfig
from bart_jax.model import heads, registry, validation
from bart_jax.parallel import rules
from bart_jax.training import objectives

TIED = [True, False]


@functools.lru_cache(maxsize=None)
def reference(head: str, tied: bool):
    """(transformers model, the same config as a bart_jax BartConfig), one layer per stack."""
    model = hf_model(head, encoder_layers=1, decoder_layers=1, tie_word_embeddings=tied)
    return model, BartConfig.from_dict(model.config.to_dict())


def init_shapes(config: BartConfig, head: str, **options) -> dict:
    """`head`'s parameter tree for `config` as built with `options`, shape tuples as leaves."""
    module = registry.head_spec(head).module(config, **options)
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **registry.init_inputs(config)))["params"]
    return jax.tree.map(lambda leaf: tuple(leaf.shape), params)


def test_the_registry_holds_the_modules_heads():
    assert registry.HEAD_NAMES == HEADS
    assert {name: spec.module for name, spec in registry.REGISTRY.items()} == heads.HEADS
    assert all(spec.name == name for name, spec in registry.REGISTRY.items())


# --- against transformers -------------------------------------------------------------------------
@pytest.mark.parametrize("tied", TIED)
@pytest.mark.parametrize("head", HEADS)
def test_prefix_and_parts_are_those_of_transformers(head, tied):
    model, _ = reference(head, tied)
    spec = registry.head_spec(head)
    assert spec.prefix == ("" if model.base_model is model else model.base_model_prefix + ".")
    keys = set(model.state_dict())
    assert {spec.prefix + key for key in model.base_model.state_dict()} <= keys
    base_parts = {key[len(spec.prefix):].split(".")[0] for key in keys if key.startswith(spec.prefix)}
    own_parts = {key.split(".")[0] for key in keys if not key.startswith(spec.prefix)}
    assert base_parts == set(spec.base_parts)
    # transformers lists lm_head even when tied (as an alias of the word embeddings).
    assert own_parts == set(spec.parts)


@pytest.mark.parametrize("tied", TIED)
@pytest.mark.parametrize("head", HEADS)
def test_tied_keys_are_those_of_transformers(head, tied):
    model, config = reference(head, tied)
    spec = registry.head_spec(head)
    aliases = model.get_expanded_tied_weights_keys(all_submodels=True)
    assert set(spec.tied_keys(config)) == set(aliases)
    assert set(aliases.values()) <= {spec.embedding_key}
    assert spec.embedding_key in model.state_dict() and spec.embedding_key not in aliases
    derived_keys = {conversion.hf_key(path) for path in traverse_util.flatten_dict(spec.param_shapes(config))}
    assert spec.embedding_key in derived_keys


# --- the modules --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", TIED)
@pytest.mark.parametrize("head", HEADS)
def test_every_head_builds_the_derived_tree(head, tied):
    _, config = reference(head, tied)
    spec = registry.head_spec(head)
    shapes = spec.param_shapes(config)
    # Built as users build it (default kernels): the derivation's portable kernels change no parameter.
    assert init_shapes(config, head) == shapes
    own = {} if not spec.prefix else dict(shapes)
    base = own.pop(registry.BASE_MODEL) if spec.prefix else shapes
    assert set(base) == set(spec.base_parts)
    assert set(own) <= set(spec.parts)
    assert ("lm_head" in own) == ("lm_head" in spec.parts and not tied)


@pytest.mark.parametrize("head", HEADS)
def test_scanned_modules_create_the_stacked_tree(head):
    _, config = reference(head, True)
    stacked = jax.eval_shape(conversion.stack_layers, jax.tree.map(
        lambda shape: jax.ShapeDtypeStruct(shape, "float32"), registry.param_shapes(config, head),
        is_leaf=lambda node: isinstance(node, tuple)))
    assert init_shapes(config, head, scan_layers=True) == jax.tree.map(lambda leaf: tuple(leaf.shape), stacked)


def test_param_shapes_are_cached_but_never_shared():
    _, config = reference("BartForConditionalGeneration", True)
    first = registry.param_shapes(config, "BartForConditionalGeneration")
    first["model"].pop("shared")
    again = registry.param_shapes(config.replace(extra=(("architectures", '["BartModel"]'),)),
                                  "BartForConditionalGeneration")
    assert "shared" in again["model"]


# --- what the package reads from it ---------------------------------------------------------------------
def test_facts_match_the_modules_and_their_users():
    for name, spec in registry.REGISTRY.items():
        # Generation runs the encoder once, then the decoder step by step.
        assert spec.generates == (hasattr(spec.module, "decode_step") and hasattr(spec.module, "encode")), name
        assert all(callable(getattr(pipelines, pipeline, None)) for pipeline in spec.pipelines), name
    assert objectives.TASK_HEADS == {
        "denoise": "BartForConditionalGeneration", "seq2seq": "BartForConditionalGeneration",
        "classify": "BartForSequenceClassification", "qa": "BartForQuestionAnswering",
    }
    assert objectives.GENERATIVE_TASKS == ("denoise", "seq2seq")
    assert registry.heads_where("pipelines", "fill_mask") == ("BartForConditionalGeneration",)


def test_unknown_heads_name_the_choices():
    choices = ", ".join(HEADS)
    _, config = reference("BartModel", True)
    for call in (lambda: registry.head_spec("BartForMaskedLM"), lambda: registry.check_head("BartForMaskedLM"),
                 lambda: registry.param_shapes(config, "BartForMaskedLM"),
                 lambda: validation.check_inputs(config, "BartForMaskedLM", {})):
        with pytest.raises(ValueError, match=f"unknown head 'BartForMaskedLM'; choose one of {choices}"):
            call()
    with pytest.raises(ValueError, match=f"names architecture 'T5Model'; choose a head: {choices}"):
        registry.head_from_config(config.replace(extra=(("architectures", '["T5Model"]'),)))
    with pytest.raises(ValueError, match="names no architecture"):
        registry.head_from_config(config.replace(extra=()))


# --- logical axes ---------------------------------------------------------------------------------------
def every_parameter():
    """(head, tied, scanned, path, rank) of every parameter of every head."""
    for head in HEADS:
        for tied in TIED:
            _, config = reference(head, tied)
            for scanned in (False, True):
                shapes = init_shapes(config, head, scan_layers=scanned)
                for path, shape in traverse_util.flatten_dict(shapes, sep="/").items():
                    yield head, tied, scanned, path, len(shape)


def test_every_parameter_matches_exactly_one_axes_rule_of_its_rank():
    problems, used = [], set()
    for head, tied, scanned, path, rank in every_parameter():
        matching = [pattern.pattern for pattern, _ in rules._PARAM_PATTERNS if pattern.search(path)]
        used.update(matching)
        where = f"{head} (tied={tied}, scanned={scanned}) {path}"
        if len(matching) != 1:
            problems.append(f"{where} matches {len(matching)} rules {matching}")
        elif rules.param_logical_axes(path, rank) is None:
            problems.append(f"{where}: its rule {matching[0]} has another rank than {rank}")
    assert not problems, "\n".join(problems)
    unused = [pattern.pattern for pattern, _ in rules._PARAM_PATTERNS if pattern.pattern not in used]
    assert not unused, f"rules no parameter of any head matches: {unused}"
