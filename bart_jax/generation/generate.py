"""`generate` for BART: encode once, then decode token by token inside one jitted loop.

The encoder output and the cross-attention keys/values are computed once per input row and
shared by its beams (or samples); the decoder runs on a preallocated self-attention cache.

`generate` is the user-facing call (transformers' `model.generate` layout: rows start with the
decoder start token and are right-padded to the longest row). `generate_static` is the jitted
core with static output shapes — [rows, max_length] plus per-row lengths — for callers that pad
inputs to fixed buckets and trim the output themselves.

The module's kernel policy (bart_jax/model/kernels/) decides the cache's layout. `generate`
settles kernels="auto" from where the parameters live; `generate_static` given "auto" traces
the generation for both layouts and lowering keeps the one of the platform it compiles for, so
that exporting or compiling ahead of time for an accelerator from a CPU host is right.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bart_jax.generation.config import GenerationConfig
from bart_jax.generation.search import SearchOutput, search
from bart_jax.model.cache import init_cache, reorder_cache
from bart_jax.model.kernels import settled
from bart_jax.model.validation import check_mask, check_token_ids

# A BART decoder prompt is the decoder start token alone.
DECODER_PROMPT_LENGTH = 1


class GenerationOutput(NamedTuple):
    """sequences: [batch * num_return_sequences, length] int32;
    sequences_scores: [batch * num_return_sequences] float32 beam scores (None without beam search)."""

    sequences: jax.Array
    sequences_scores: Optional[jax.Array]


def resolve_generation_config(module: Any, generation_config: Optional[GenerationConfig] = None,
                              **overrides) -> GenerationConfig:
    """The resolved options `generate` uses: `generation_config` (default: the model config's
    generation options, as transformers) with `overrides`, lengths made absolute."""
    if generation_config is None:
        generation_config = GenerationConfig.from_model_config(module.config)
    config = generation_config.replace(**overrides)
    config = config.resolve(DECODER_PROMPT_LENGTH, module.config.max_position_embeddings)
    if config.decoder_start_token_id is None:
        raise ValueError("decoder_start_token_id (or bos_token_id) must be set to generate with BART")
    # The decoder feeds positions 0 .. max_length - 2.
    if config.max_length - 1 > module.config.max_position_embeddings:
        raise ValueError(
            f"max_length ({config.max_length}) exceeds what the model can decode: "
            f"max_position_embeddings is {module.config.max_position_embeddings}"
        )
    vocab_size = module.config.vocab_size
    used_ids = (config.eos_token_ids + config.forced_eos_token_ids
                + tuple(i for i in (config.pad_token_id, config.forced_bos_token_id) if i is not None))
    if any(i >= vocab_size for i in used_ids) or config.decoder_start_token_id >= vocab_size:
        raise ValueError(f"special token ids {used_ids} must be smaller than vocab_size ({vocab_size})")
    if config.bad_words_ids is not None:
        # As transformers: a ban on a token the model cannot produce is a mistake, not a no-op.
        outside = sorted({t for word in config.bad_words_ids for t in word if t >= vocab_size})
        if outside:
            raise ValueError(f"bad_words_ids holds token ids outside the vocabulary [0, {vocab_size}): {outside[:10]}")
    if config.min_length > config.max_length:
        warnings.warn(
            f"Unfeasible length constraints: min_length ({config.min_length}) is larger than max_length "
            f"({config.max_length}); generation stops at max_length. Decrease min_length or increase max_length.",
            UserWarning, stacklevel=3,
        )
    return config


def check_prng_key(prng_key: Any) -> None:
    """Raises ValueError unless `prng_key` is None or a JAX PRNG key: a typed key (`jax.random.key`)
    or raw key data, uint32 [2] (`jax.random.PRNGKey`) or [4] (the "rbg" implementations)."""
    if prng_key is None:
        return
    dtype, shape = getattr(prng_key, "dtype", None), np.shape(prng_key)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        valid = shape == ()
    else:
        valid = dtype is not None and np.dtype(dtype) == np.uint32 and shape in ((2,), (4,))
    if not valid:
        description = f"{type(prng_key).__name__} {prng_key!r}" if dtype is None else f"dtype {dtype} shape {shape}"
        raise ValueError(f"prng_key must be a JAX PRNG key (jax.random.PRNGKey(seed) or jax.random.key(seed)), got "
                         f"{description}")


def generate(
    module: Any,
    params: Any,
    input_ids: Any,
    attention_mask: Any = None,
    generation_config: Optional[GenerationConfig] = None,
    prng_key: Optional[jax.Array] = None,
    return_scores: bool = False,
    **overrides,
):
    """Generates token ids for `input_ids` with a `BartForConditionalGeneration` module.

    input_ids, attention_mask: [batch, src_len] (the mask defaults to all ones, as transformers).
    generation_config: options (default: those of `module.config`); `overrides` replace any of
    them by name, e.g. `num_beams=4, max_new_tokens=50`. prng_key: needed when do_sample=True.
    Returns sequences [batch * num_return_sequences, length] int32 — each row the decoder start
    token, the generated tokens, then pad — or, with `return_scores=True`, a GenerationOutput
    that also holds the beam search sequence scores (None for greedy search and sampling).
    """
    config = resolve_generation_config(module, generation_config, **overrides)
    # Inside jit an id past the vocabulary or a position past the table would be clamped, not refused.
    input_ids = check_token_ids(input_ids, module.config, "input_ids")
    if attention_mask is None:
        attention_mask = np.ones(input_ids.shape, np.int32)
    if np.shape(attention_mask) != input_ids.shape:
        raise ValueError(f"attention_mask shape {np.shape(attention_mask)} differs from input_ids shape "
                         f"{input_ids.shape}")
    attention_mask = check_mask(attention_mask, input_ids.shape, "attention_mask", "input_ids")
    if config.do_sample and prng_key is None:
        raise ValueError("do_sample=True needs a prng_key (e.g. jax.random.PRNGKey(0))")
    check_prng_key(prng_key)
    output = generate_static(settled(module, params), params, jnp.asarray(input_ids, jnp.int32),
                             jnp.asarray(attention_mask, jnp.int32), config, prng_key)
    length = int(np.max(np.asarray(output.lengths)))
    sequences = output.sequences[:, :length]
    if return_scores:
        return GenerationOutput(sequences, output.scores)
    return sequences


@functools.partial(jax.jit, static_argnames=("module", "config"))
def generate_static(
    module: Any,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    config: GenerationConfig,
    prng_key: Optional[jax.Array] = None,
) -> SearchOutput:
    """The jitted generation loop with static shapes.

    input_ids, attention_mask: [batch, src_len] int32; config: resolved (`resolve_generation_config`).
    Returns SearchOutput: sequences [batch * num_return_sequences, config.max_length] (pad after
    each row's end), lengths [batch * num_return_sequences], scores (beam search only).
    Compiles once per (module, input shapes, config).
    """
    if module.kernels != "auto":
        return _generate(module, params, input_ids, attention_mask, prng_key, config)
    # Unsettled "auto" (an export, or an ahead-of-time compile from another host): the whole loop
    # traced under each policy, since the cache layouts differ; lowering keeps the platform's.
    policies = {kernels: functools.partial(_generate, module.clone(kernels=kernels), config=config)
                for kernels in ("cpu", "tpu", "portable")}
    return lax.platform_dependent(params, input_ids, attention_mask, prng_key, cpu=policies["cpu"],
                                  tpu=policies["tpu"], default=policies["portable"])


def _generate(module: Any, params: Any, input_ids: jax.Array, attention_mask: jax.Array, prng_key: Optional[jax.Array],
              config: GenerationConfig) -> SearchOutput:
    """`generate_static`'s body for a module of one kernel policy ("cpu", "tpu" or "portable")."""
    variables = {"params": params}
    batch = input_ids.shape[0]
    encoded = module.apply(variables, input_ids, attention_mask, method="encode")
    cross_key_values = module.apply(variables, encoded.last_hidden_state, method="project_cross_key_values")

    def tokens_to_logits(token_ids, cache, step):
        # token_ids [rows, 1] -> logits [rows, vocab]; rows group each input's beams/samples.
        logits, cache = module.apply(variables, token_ids, cache, step, cross_key_values, attention_mask,
                                     method="decode_step")
        return logits[:, -1, :].astype(jnp.float32), cache

    beam_search = config.num_beams > 1
    rows_per_input = config.num_beams if beam_search else config.num_return_sequences
    cache = init_cache(module.config, batch, config.max_length, rows_per_input, module.dtype, module.kernels)
    prompt_rows = batch if beam_search else batch * rows_per_input
    prompt_ids = jnp.full((prompt_rows, DECODER_PROMPT_LENGTH), config.decoder_start_token_id, jnp.int32)
    return search(tokens_to_logits, cache, prompt_ids, config, prng_key, reorder_cache=reorder_cache,
                  kernels=module.kernels)
