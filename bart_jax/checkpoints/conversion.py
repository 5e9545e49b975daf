"""Hugging Face BART state dicts <-> bart_jax parameter trees.

The Flax tree mirrors transformers' module names and layouts (linear weights [out, in], see
bart_jax/model/linear.py), so the whole name map is a few rules and no tensor is transposed:

    Flax path                              Hugging Face key
    ...layers_3/...                        ...layers.3....
    <linear>/weight        [out, in]       <linear>.weight        [out, in]
    <layer norm>/scale     [d]             <layer norm>.weight    [d]
    <embedding>/embedding  [rows, d]       <embedding>.weight     [rows, d]
    .../bias                               ....bias
    final_logits_bias      [1, vocab]      final_logits_bias

Which paths exist, and their shapes, are those the head's module creates for the config
(`expected_flax_shapes`: its `init` traced abstractly, bart_jax/model/registry.py), so
converting never needs an initialised model.

Modules built with `scan_layers=True` keep each layer stack as one `layers` subtree whose
arrays have a leading layer axis; `stack_layers` / `unstack_layers` switch between the two
layouts (bart_jax/checkpoints/stacking.py), `hf_to_flax(..., scan_layers=True)` produces the
stacked one and `flax_to_hf` accepts either.

Tied word embeddings (`config.tie_word_embeddings`, the default): the Flax tree holds one
table (`shared`, or `decoder/embed_tokens` for `BartForCausalLM`), and the Hugging Face keys
that alias it (`encoder.embed_tokens.weight`, `decoder.embed_tokens.weight`, `lm_head.weight`)
are accepted on input only if equal to it and never written, as transformers 5 does. Untied,
transformers 5 keeps separate `shared`, `encoder.embed_tokens`, `decoder.embed_tokens` and
`lm_head` tensors, and so does the Flax tree.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np
from flax import traverse_util

from bart_jax.checkpoints.stacking import NUMBERED_LAYER, stack_layers, unstack_layers
from bart_jax.config import BartConfig
from bart_jax.model.kernels.quantized_linear import QuantizedWeight
from bart_jax.model.parameters import cast_leaf, float_dtype
from bart_jax.model.registry import BASE_MODEL, REGISTRY, HeadSpec, head_spec, param_shapes

Params = dict[str, Any]
# transform(path, array) -> leaf: what a conversion makes of each parameter as it is read.
Transform = Callable[[tuple[str, ...], Any], Any]

# Flax leaf name -> Hugging Face parameter name.
LEAF_RULES = {
    "weight": "weight",
    "scale": "weight",
    "embedding": "weight",
    "bias": "bias",
}
# Tensors with the same name in both formats.
BUFFERS = ("final_logits_bias",)

# Parts that some heads have and others lack: a checkpoint tensor under one of them that the
# target head lacks is reported as unused (e.g. lm_head when loading a classifier), whereas any
# other leftover tensor means checkpoint and config disagree.
HEAD_PARTS = tuple(dict.fromkeys(part for spec in REGISTRY.values() for part in spec.parts))
BASE_PARTS = tuple(dict.fromkeys(part for spec in REGISTRY.values() for part in spec.base_parts))
# fairseq leftovers in old checkpoints; transformers ignores them too.
IGNORED_KEY_SUFFIXES = ("encoder.version", "decoder.version")

_MODEL_PREFIX = BASE_MODEL + "."
_LISTED = 8  # keys named in an error message before "... and N more"


class Conversion(NamedTuple):
    """Result of `convert_hf_state_dict`."""

    params: Params
    # Checkpoint tensors of parts the target head lacks (checkpoint names), e.g. `final_logits_bias`
    # when a BartForConditionalGeneration checkpoint feeds a BartForSequenceClassification.
    unused_keys: tuple[str, ...]
    # Flax paths ("a/b/c") of head weights taken from `head_params` because the checkpoint lacks them.
    from_head_params: tuple[str, ...]


# --- shapes -----------------------------------------------------------------------------
def expected_flax_shapes(config: BartConfig, head: str) -> dict:
    """The parameter tree of `head` for `config`, with shape tuples as leaves: what the head
    module's `init` creates (`registry.param_shapes`), layers unstacked."""
    return param_shapes(config, head)


# --- names ------------------------------------------------------------------------------
def hf_key(flax_path: tuple[str, ...]) -> str:
    """The Hugging Face state-dict key of a Flax parameter path, e.g.
    ("model", "encoder", "layers_0", "fc1", "weight") -> "model.encoder.layers.0.fc1.weight"."""
    *modules, leaf = flax_path
    names = [NUMBERED_LAYER.sub(r"layers.\1", module) for module in modules]
    return ".".join(names + [leaf if leaf in BUFFERS else LEAF_RULES[leaf]])


def _prefixed(spec: HeadSpec, key: str) -> str:
    """A key of `spec`'s own state dict in the `model.`-prefixed layout."""
    return key if spec.prefix else _MODEL_PREFIX + key


def _tied_embedding_keys(config: BartConfig, spec: HeadSpec) -> tuple[str, tuple[str, ...]]:
    """(key of the word-embedding table the target keeps, keys that may hold it too when tied),
    in the `model.`-prefixed layout."""
    embedding_key = _prefixed(spec, spec.embedding_key)
    if not config.tie_word_embeddings:
        return embedding_key, ()
    aliases = [_prefixed(spec, key) for key in spec.tied_keys(config)]
    # A tied checkpoint of another head keeps the table under that head's name: a seq2seq
    # checkpoint's `shared` is the causal LM's decoder embedding table.
    others = {_prefixed(other, other.embedding_key) for other in REGISTRY.values()}
    return embedding_key, tuple(aliases + sorted(others - {embedding_key, *aliases}))


def _listing(keys) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_LISTED])
    return shown + (f" ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else "")


def _mismatches(missing, unexpected, wrong_shape, noun: str = "", missing_hint: str = "") -> str:
    """'missing ...; unexpected ...; wrong shape ...' for the non-empty lists ('' if all are empty)."""
    problems = []
    if missing:
        problems.append(f"missing{noun} {_listing(missing)}{missing_hint}")
    if unexpected:
        problems.append(f"unexpected{noun} {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shape {_listing(wrong_shape)}")
    return "; ".join(problems)


# --- validation -------------------------------------------------------------------------
def _check_config(config: BartConfig) -> None:
    if not isinstance(config, BartConfig):
        raise ValueError(f"expected a bart_jax BartConfig, got {type(config).__name__}")


def check_shapes(found: Mapping[str, tuple], config: BartConfig, head: str) -> None:
    """Raises ValueError naming every missing, extra or mis-shaped parameter of `found`, the
    shapes of a parameter tree by "/"-joined path (what `check_params` checks, without the values)."""
    _check_config(config)
    expected = traverse_util.flatten_dict(expected_flax_shapes(config, head), sep="/")
    missing = [path for path in expected if path not in found]
    extra = [path for path in found if path not in expected]
    wrong = [
        f"{path} (expected {expected[path]}, found {tuple(shape)})"
        for path, shape in found.items()
        if path in expected and tuple(shape) != expected[path]
    ]
    problems = _mismatches(missing, extra, wrong)
    if problems:
        raise ValueError(f"parameters do not match {head} with this config: {problems}")


def check_params(params: Params, config: BartConfig, head: str) -> None:
    """Raises ValueError naming every missing, extra or mis-shaped parameter of `params`."""
    found = traverse_util.flatten_dict(params, sep="/")
    check_shapes({path: tuple(np.shape(value)) for path, value in found.items()}, config, head)


# --- Hugging Face -> Flax -----------------------------------------------------------------
def _prefixed_names(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """Checkpoint keys in the `model.`-prefixed layout of the heads -> the original keys.

    A bare `BartModel` checkpoint has no prefix (transformers adds it when loading one into a
    head, and strips it the other way); version keys are dropped.
    """
    names = [key for key in state_dict if not key.endswith(IGNORED_KEY_SUFFIXES)]
    bare = not any(key.startswith(_MODEL_PREFIX) for key in names)
    return {(_MODEL_PREFIX + key if bare else key): key for key in names}


def _flat_head_params(head_params: Params | None, expected: Mapping[tuple, tuple], head: str) -> dict:
    flat = traverse_util.flatten_dict(dict(head_params or {}))
    for path, value in flat.items():
        name = "/".join(path)
        if path[0] == BASE_MODEL or path not in expected:
            raise ValueError(f"head_params entry {name} is not a weight of the {head} head")
        if tuple(np.shape(value)) != expected[path]:
            raise ValueError(
                f"head_params entry {name} has shape {tuple(np.shape(value))}, expected {expected[path]}"
            )
    return flat


def _stored_shapes(state_dict: Mapping[str, Any]) -> Mapping[str, tuple]:
    """The shape of each tensor of `state_dict` by key: its `shapes` where it has them (a
    `reader.LazyTensors`, whose values are read from disk on access), else its values' shapes."""
    shapes = getattr(state_dict, "shapes", None)
    return shapes if shapes is not None else {key: tuple(np.shape(value)) for key, value in state_dict.items()}


def _gather_word_embeddings(
    state_dict: Mapping[str, Any], stored: Mapping[str, tuple], original: Mapping[str, str],
    sources: dict[str, str], config: BartConfig, spec: HeadSpec,
) -> set[str]:
    """Points the key of the word-embedding table the target keeps at the tensor that holds it
    (`sources`: prefixed key -> checkpoint key), after checking that the tied copies the
    checkpoint stores agree with it and that its rows match the vocabulary. Returns the
    (prefixed) checkpoint keys consumed. Tensors are read only to compare tied copies."""
    embedding_key, aliases = _tied_embedding_keys(config, spec)
    present = [key for key in (embedding_key, *aliases) if key in original]
    if not present:
        return set()  # reported as missing later
    source = original[present[0]]
    if len(present) > 1:
        table = np.asarray(state_dict[source])
        for alias in present[1:]:
            if tuple(stored[original[alias]]) != table.shape or not np.array_equal(
                    np.asarray(state_dict[original[alias]]), table):
                raise ValueError(
                    f"{original[alias]} should be a tied copy of {source} "
                    f"(tie_word_embeddings is true) but differs from it"
                )
    shape = tuple(stored[source])
    if len(shape) == 2 and shape[0] != config.vocab_size:
        raise ValueError(
            f"config.vocab_size is {config.vocab_size} but the checkpoint's word embeddings "
            f"({source}) have {shape[0]} rows"
        )
    sources[embedding_key] = source
    return set(present)


def _belongs_to_absent_part(key: str, prefixed_shapes: Mapping[str, Any]) -> bool:
    """Whether `key` (prefixed layout) is under a head or base-model part the target lacks."""
    top, _, rest = key.partition(".")
    if top in HEAD_PARTS:
        return top not in prefixed_shapes
    part = rest.partition(".")[0]
    return top == BASE_MODEL and part in BASE_PARTS and part not in prefixed_shapes[BASE_MODEL]


def convert_hf_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: BartConfig,
    head: str,
    *,
    head_params: Params | None = None,
    strict: bool = False,
    transform: Transform | None = None,
) -> Conversion:
    """Converts a Hugging Face BART state dict into the Flax parameter tree of `head`.

    The checkpoint may be of another head: a `BartModel` or any seq2seq head checkpoint feeds
    the base model of any seq2seq head. Weights of the target head that the checkpoint lacks
    (e.g. `classification_head` when starting from bart-large) must come from `head_params`, a
    tree of initial values with the target's top-level layout (e.g.
    `{"classification_head": {...}}`); checkpoint values take precedence over it. A missing
    `final_logits_bias` starts at zero, as in transformers.

    Names and shapes are checked before any tensor is read (from `state_dict.shapes` when it has
    them: a `reader.LazyTensors` reads each value from disk when looked up). Then each parameter
    is looked up once and passed through `transform(path, array)` (path in the returned tree's
    layout) before the next is looked up: a loader that quantizes or places each one there never
    holds the float checkpoint whole.

    Returns the params (numpy arrays in the checkpoint's dtypes, or what `transform` made of
    them), the checkpoint tensors the head does not use, and the paths filled from
    `head_params`. Raises ValueError for missing, unexpected or mis-shaped tensors, a vocab-size
    mismatch, a tied alias that differs from the tensor it aliases, or (with `strict`) unused
    tensors.
    """
    _check_config(config)
    spec = head_spec(head)
    shapes = expected_flax_shapes(config, head)
    # Work in the `model.`-prefixed layout throughout; the bare BartModel's tree is the `model` subtree.
    bare = not spec.prefix
    prefixed_shapes = {BASE_MODEL: shapes} if bare else shapes
    expected = traverse_util.flatten_dict(prefixed_shapes)
    fillers = _flat_head_params(head_params, expected, head)

    original = _prefixed_names(state_dict)
    stored = _stored_shapes(state_dict)
    sources = dict(original)  # prefixed key -> the checkpoint key its tensor is read from
    used = _gather_word_embeddings(state_dict, stored, original, sources, config, spec)
    embedding_key, _ = _tied_embedding_keys(config, spec)

    read, filled, zeros, missing, missing_head, wrong_shape = {}, [], [], [], [], []
    for path, shape in expected.items():
        key = hf_key(path)
        if key in sources:
            used.add(key)
            found = tuple(stored[sources[key]])
            if found != tuple(shape):
                wrong_shape.append(f"{original.get(key, key)} (expected {tuple(shape)}, found {found})")
            read[path] = sources[key]
        elif path in fillers:
            filled.append(path)
        elif path == ("final_logits_bias",):
            zeros.append(path)  # old checkpoints lack it; transformers starts it at zero too
        elif path[0] == BASE_MODEL:
            missing.append(key[len(_MODEL_PREFIX):] if bare else key)
        else:
            missing_head.append(key)

    unused, unexpected = [], []
    for key in original.keys() - used:
        (unused if _belongs_to_absent_part(key, prefixed_shapes) else unexpected).append(original[key])

    untied_hint = "" if config.tie_word_embeddings else " (tie_word_embeddings is false, so each is its own tensor)"
    problems = _mismatches(missing, unexpected, wrong_shape, noun=" tensors", missing_hint=untied_hint)
    if problems:
        raise ValueError(f"checkpoint does not match {head} with this config: {problems}")
    if missing_head:
        raise ValueError(
            f"the checkpoint has no weights for the {head} head ({_listing(missing_head)}); to start "
            f"them from scratch, pass their initial values as head_params"
        )
    if strict and unused:
        raise ValueError(
            f"checkpoint tensors not used by {head}: {_listing(sorted(unused))} (pass strict=False to drop them)"
        )

    flat = {}

    def put(path: tuple[str, ...], value: Any) -> None:
        flat[path] = value if transform is None else transform(path[1:] if bare else path, value)

    table_dtype = np.float32  # that of the word embeddings, for a zero final_logits_bias
    for path, name in read.items():
        value = np.asarray(state_dict[name])
        if hf_key(path) == embedding_key:
            table_dtype = value.dtype
        put(path, value)
        del value  # before the next tensor is read
    for path in filled:
        put(path, fillers[path])
    for path in zeros:
        put(path, np.zeros(expected[path], table_dtype))
    params = traverse_util.unflatten_dict({path: flat[path] for path in expected})
    return Conversion(
        params=params[BASE_MODEL] if bare else params,
        unused_keys=tuple(sorted(unused)),
        from_head_params=tuple("/".join(path) for path in filled),
    )


def hf_to_flax(
    state_dict: Mapping[str, np.ndarray],
    config: BartConfig,
    head: str,
    *,
    head_params: Params | None = None,
    strict: bool = True,
    scan_layers: bool = False,
    transform: Transform | None = None,
) -> Params:
    """The Flax params of `head` from a Hugging Face state dict (see `convert_hf_state_dict`,
    which also says what `transform` does).

    With `strict`, checkpoint tensors the head does not use (e.g. `lm_head.weight` when
    loading a classifier) are an error; otherwise they are dropped (`convert_hf_state_dict`
    lists them). With `scan_layers`, layers come stacked (`stack_layers`).
    """
    conversion = convert_hf_state_dict(state_dict, config, head, head_params=head_params, strict=strict,
                                       transform=transform)
    return stack_layers(conversion.params) if scan_layers else conversion.params


# --- Flax -> Hugging Face -----------------------------------------------------------------
def flax_to_hf(params: Params, config: BartConfig, head: str) -> dict[str, np.ndarray]:
    """The state dict transformers 5 `save_pretrained` writes for `head`: no tied aliases,
    weights [out, in], contiguous numpy arrays in the params' dtypes. Stacked layers are accepted."""
    params = unstack_layers(params)
    check_params(params, config, head)
    flat = traverse_util.flatten_dict(params)
    return {
        hf_key(path): np.ascontiguousarray(value)
        for path, value in sorted(flat.items())
    }


def cast_params(params: Params, dtype) -> Params:
    """`params` with every floating-point array cast to `dtype` (e.g. "bfloat16"); other arrays and
    int8 weights unchanged (`cast_leaf`)."""
    dtype = float_dtype(dtype)
    return jax.tree.map(lambda leaf: cast_leaf(leaf, dtype), params,
                        is_leaf=lambda leaf: isinstance(leaf, QuantizedWeight))
