"""BART `generate` against transformers' `BartForConditionalGeneration.generate`, token for token.

Both kernel policies (bart_jax/model/kernels/) give transformers' ids.

A random-weight model hardly ever picks EOS and tends to ignore its input, which would leave
the finishing logic untested: the weights are drawn at a larger scale and EOS gets a large
`final_logits_bias`, and `test_model_exercises_finishing` checks that rows and beams then end
at different lengths.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import hf_model, random_batch

from bart_jax.checkpoints.conversion import hf_to_flax
from bart_jax.config import BartConfig
from bart_jax.generation import GenerationConfig, generate, generate_static, resolve_generation_config
from bart_jax.model.cache import init_cache
from bart_jax.model.kernels import top_k
from bart_jax.model.kernels.cache import chunk_bounds
from bart_jax.model.heads import BartForConditionalGeneration

pytestmark = pytest.mark.filterwarnings("ignore:Using the model-agnostic default")

EOS, PAD = 2, 1
VOCAB = 99
EOS_LOGIT_BIAS = 6.0
WEIGHT_SCALE = 0.7  # init_std: large enough that the output depends on the input


@functools.lru_cache(maxsize=None)
def models(vocab_size: int = VOCAB, seed: int = 0):
    """(transformers model, our module, our params)."""
    model = hf_model("BartForConditionalGeneration", seed=seed, init_std=WEIGHT_SCALE, vocab_size=vocab_size)
    with torch.no_grad():
        model.final_logits_bias[0, EOS] += EOS_LOGIT_BIAS
    config = BartConfig.from_dict(model.config.to_dict())
    state = {key: value.detach().numpy() for key, value in model.state_dict().items()}
    params = jax.tree_util.tree_map(jnp.asarray, hf_to_flax(state, config, "BartForConditionalGeneration"))
    return model, BartForConditionalGeneration(config), params


def inputs():
    """A right-padded batch whose rows have different lengths."""
    return random_batch(VOCAB, batch=4, length=11, seed=1)


def run_transformers(**options):
    model, _, _ = models()
    input_ids, attention_mask = inputs()
    with torch.no_grad():
        return model.generate(torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask),
                              return_dict_in_generate=True, output_scores=True, **options)


KERNELS = ("portable", "cpu")


def run_ours(prng_key=None, kernels="auto", **options):
    _, module, params = models()
    input_ids, attention_mask = inputs()
    return generate(module.clone(kernels=kernels), params, input_ids, attention_mask, prng_key=prng_key,
                    return_scores=True, **options)


OPTIONS = {
    "greedy-model-defaults": dict(),
    "greedy-new-tokens": dict(max_new_tokens=12, min_new_tokens=6),
    "greedy-penalties": dict(min_length=6, repetition_penalty=1.4, no_repeat_ngram_size=2),
    "greedy-bad-suppressed-forced": dict(bad_words_ids=[[5], [21, 37]], suppress_tokens=[40, 42],
                                         forced_bos_token_id=0, forced_eos_token_id=None, max_length=12),
    "beam3-early-return3": dict(num_beams=3, num_return_sequences=3, early_stopping=True),
    "beam4-never-lp2-return2": dict(num_beams=4, num_return_sequences=2, length_penalty=2.0, early_stopping="never"),
    "beam5-heuristic-lp05-return5": dict(num_beams=5, num_return_sequences=5, length_penalty=0.5, max_length=16),
    "beam4-lp-negative-min-length": dict(num_beams=4, length_penalty=-1.0, min_length=5),
    "beam3-penalties-forced-bos": dict(num_beams=3, no_repeat_ngram_size=3, repetition_penalty=1.2,
                                       forced_bos_token_id=0, max_new_tokens=12),
    "beam4-bad-suppressed-return4": dict(num_beams=4, num_return_sequences=4, bad_words_ids=[[5], [21, 37]],
                                         suppress_tokens=[40, 42], forced_eos_token_id=None, min_new_tokens=3),
    "beam2-short": dict(num_beams=2, max_length=4),
}


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_generate_matches_transformers(name, kernels):
    options = OPTIONS[name]
    reference = run_transformers(**options)
    ours = run_ours(kernels=kernels, **options)
    expected = reference.sequences.numpy()
    sequences = np.asarray(ours.sequences)
    assert sequences.shape == expected.shape and np.array_equal(sequences, expected), (
        f"{name}: ids differ\nours:\n{sequences}\ntransformers:\n{expected}"
    )
    if options.get("num_beams", 1) > 1:
        np.testing.assert_allclose(np.asarray(ours.sequences_scores), reference.sequences_scores.numpy(),
                                   rtol=1e-4, atol=1e-4, err_msg=f"{name}: sequence scores")
    else:
        assert ours.sequences_scores is None


def test_generate_without_attention_mask():
    """Without a mask transformers' encoder attends to every position, padding included."""
    model, module, params = models()
    input_ids, _ = inputs()
    with torch.no_grad():
        expected = model.generate(torch.as_tensor(input_ids)).numpy()
    ours = np.asarray(generate(module, params, input_ids))
    assert ours.shape == expected.shape and np.array_equal(ours, expected), f"ours:\n{ours}\ntransformers:\n{expected}"


def generated_lengths(sequences):
    """Tokens per row up to and including the first EOS after the start token (or the whole row)."""
    lengths = []
    for row in sequences:
        ends = np.flatnonzero(row[1:] == EOS)
        lengths.append(int(ends[0]) + 2 if len(ends) else len(row))
    return lengths


def test_model_exercises_finishing():
    """The rows differ from each other, and rows and beams end at different lengths."""
    greedy = run_transformers().sequences.numpy()
    assert len({tuple(row) for row in greedy}) == len(greedy), f"identical rows:\n{greedy}"
    assert len(set(generated_lengths(greedy))) > 1, f"every greedy row has the same length:\n{greedy}"
    for name, beams in (("beam5-heuristic-lp05-return5", 5), ("beam4-bad-suppressed-return4", 4)):
        options = OPTIONS[name]
        sequences = run_transformers(**options).sequences.numpy().reshape(4, beams, -1)
        mixed = [len(set(generated_lengths(hypotheses))) > 1 for hypotheses in sequences]
        assert sum(mixed) >= 3, f"{name}: the beams of most inputs end together:\n{sequences}"


def test_sampling_with_top_k_1_matches_transformers():
    """top_k=1 makes sampling deterministic: identical ids, one copy per returned sequence."""
    options = dict(do_sample=True, top_k=1, num_return_sequences=3, max_new_tokens=10)
    expected = run_transformers(**options).sequences.numpy()
    ours = np.asarray(run_ours(prng_key=jax.random.PRNGKey(0), **options).sequences)
    assert ours.shape == expected.shape and np.array_equal(ours, expected), f"ours:\n{ours}\ntransformers:\n{expected}"


def test_sampled_first_tokens_follow_the_model():
    """Frequencies of many sampled first tokens vs transformers' probabilities after warping."""
    model, module, params = models()
    input_ids, attention_mask = inputs()
    samples = 3000
    # Without the model's forced_eos_token_id, which would force EOS as the last (here only) token.
    ours = generate(module, params, input_ids[:1], attention_mask[:1], prng_key=jax.random.PRNGKey(1),
                    do_sample=True, temperature=1.5, top_k=8, num_return_sequences=samples, max_new_tokens=1,
                    forced_eos_token_id=None)
    counts = np.bincount(np.asarray(ours)[:, 1], minlength=VOCAB) / samples
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(input_ids[:1]), attention_mask=torch.as_tensor(attention_mask[:1]),
                       decoder_input_ids=torch.tensor([[EOS]])).logits[0, -1]
    warped = logits / 1.5
    warped[warped < torch.topk(warped, 8).values[-1]] = -float("inf")
    probabilities = torch.softmax(warped, -1).numpy()
    assert np.all(counts[probabilities == 0] == 0), "sampled a token outside the top 8"
    assert np.abs(counts - probabilities).max() < 0.04, f"frequencies {counts} vs probabilities {probabilities}"


def test_beam_sampling_scores_are_the_model_log_probabilities():
    """Beam sampling picks random hypotheses; each score must be its log-probability under the
    transformers model, divided by generated_length ** length_penalty, best first (no forced EOS,
    whose processed log-probability would be 0)."""
    model, _, _ = models()
    input_ids, attention_mask = inputs()
    ours = run_ours(prng_key=jax.random.PRNGKey(2), do_sample=True, num_beams=3, num_return_sequences=3,
                    max_new_tokens=9, length_penalty=0.5, forced_eos_token_id=None)
    sequences, scores = np.array(ours.sequences), np.asarray(ours.sequences_scores)
    assert np.all(np.diff(scores.reshape(4, 3), axis=1) <= 0), f"not best first: {scores}"
    rows = np.repeat(np.arange(4), 3)
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(input_ids[rows]), attention_mask=torch.as_tensor(attention_mask[rows]),
                       decoder_input_ids=torch.as_tensor(sequences)).logits
    log_probs = torch.log_softmax(logits, -1).numpy()
    for row, (sequence, length) in enumerate(zip(sequences, generated_lengths(sequences))):
        total = sum(log_probs[row, position, sequence[position + 1]] for position in range(length - 1))
        expected = total / (length - 1) ** 0.5
        assert abs(scores[row] - expected) < 1e-3, f"row {row}: score {scores[row]}, recomputed {expected}"


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("tokens_per_call,dtype", [(1, "float32"), (3, "float32"), (1, "bfloat16")])
def test_incremental_decoding_equals_full_forward(tokens_per_call, dtype, kernels):
    """decode_step over the cache (two beams per input sharing the input's cross-attention
    keys/values), one token or several per call, gives the logits of one full forward pass at
    every position. With the CPU kernels 40 positions span three of the cache's chunks
    (bart_jax.model.kernels.cache.chunk_bounds); at three tokens a call, some calls write across a
    chunk's end, and in bfloat16 the cache holds the values' bits (`storage_dtype` there)."""
    _, module, params = models()
    module = module.clone(dtype=jnp.dtype(dtype), kernels=kernels)
    input_ids, attention_mask = inputs()
    beams, length = 2, 40
    assert len(chunk_bounds(length)) == 3
    decoder_ids = np.random.default_rng(0).integers(3, VOCAB, (input_ids.shape[0] * beams, length))
    decoder_ids[:, 0] = EOS
    rows = np.repeat(np.arange(input_ids.shape[0]), beams)
    full = jax.jit(lambda *args: module.apply({"params": params}, *args).logits)(
        input_ids[rows], attention_mask[rows], decoder_ids)  # [rows, length, vocab]

    variables = {"params": params}
    encoded = module.apply(variables, input_ids, attention_mask, method="encode")
    cross = module.apply(variables, encoded.last_hidden_state, method="project_cross_key_values")
    cache = init_cache(module.config, input_ids.shape[0], length, beams=beams, dtype=module.dtype, kernels=kernels)
    if kernels == "cpu":
        assert cache["layers"][0]["key"][0].dtype == (jnp.uint16 if dtype == "bfloat16" else jnp.float32)
    step = jax.jit(lambda ids, cache, index: module.apply(variables, ids, cache, index, cross, attention_mask,
                                                          method="decode_step"))
    # Logits are O(10) with these weights; a cache bug would be off by O(1). These weights
    # amplify bfloat16 rounding (logits move by several units), so there the mean error is
    # bounded by a few times the full pass's own mean distance from float32 (a wrong slot or
    # misread bits would be off by about the logits' scale).
    errors, noise = [], None
    if dtype == "bfloat16":
        fp32 = module.clone(dtype=jnp.float32)
        full_fp32 = jax.jit(lambda *args: fp32.apply({"params": params}, *args).logits)(
            input_ids[rows], attention_mask[rows], decoder_ids)
        noise = float(jnp.mean(jnp.abs(full.astype(jnp.float32) - full_fp32)))
    for start in range(0, length - tokens_per_call + 1, tokens_per_call):
        logits, cache = step(decoder_ids[:, start:start + tokens_per_call], cache, jnp.int32(start))
        expected = np.asarray(full[:, start:start + tokens_per_call], np.float32)
        if noise is None:
            np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-3,
                                       err_msg=f"positions {start}..{start + tokens_per_call - 1}")
        errors.append(float(np.mean(np.abs(np.asarray(logits) - expected))))
    if noise is not None:
        assert max(errors) < 3 * noise, f"mean |decode - full| per step {errors}; bfloat16 vs float32: {noise}"


def test_generate_compiles_once_per_shapes_and_options():
    options = OPTIONS["beam2-short"]
    run_ours(**options)
    compiled = generate_static._cache_size()
    run_ours(**options)
    _, module, params = models()
    input_ids, attention_mask = inputs()
    generate(module, params, input_ids, attention_mask, GenerationConfig.from_model_config(module.config), **options)
    assert generate_static._cache_size() == compiled, "equal options and shapes compiled again"


def test_generate_rejects_bad_requests():
    _, module, params = models()
    input_ids, attention_mask = inputs()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(module, params, input_ids, attention_mask, max_length=module.config.max_position_embeddings + 2)
    with pytest.raises(ValueError, match="prng_key"):
        generate(module, params, input_ids, attention_mask, do_sample=True)
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(module, params, input_ids, attention_mask[:, :5])
    with pytest.raises(ValueError, match="unknown generation option"):
        generate(module, params, input_ids, attention_mask, beams=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate(module, params, input_ids, attention_mask, num_beams=2, num_return_sequences=3)


LARGE_VOCAB = 4096


@pytest.mark.parametrize("kernels", KERNELS)
def test_beam_search_over_a_large_vocabulary_matches_transformers(kernels):
    """With bart-large-cnn's options over 4 x 4096 candidates per input, beam search takes its
    top-k block by block with the CPU kernels (bart_jax.model.kernels.top_k); the ids and scores
    stay transformers'."""
    beams = 4
    assert -(-beams * LARGE_VOCAB // top_k.BLOCK) >= top_k.MIN_BLOCKS_PER_K * 2 * beams, "blocked path not taken"
    model, module, params = models(LARGE_VOCAB, seed=3)
    input_ids, attention_mask = random_batch(LARGE_VOCAB, batch=3, length=11, seed=4)
    options = dict(num_beams=beams, num_return_sequences=2, length_penalty=2.0, no_repeat_ngram_size=3,
                   early_stopping=True, forced_bos_token_id=0, forced_eos_token_id=2, min_length=4, max_length=14)
    with torch.no_grad():
        reference = model.generate(torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask),
                                   return_dict_in_generate=True, output_scores=True, **options)
    ours = generate(module.clone(kernels=kernels), params, input_ids, attention_mask, return_scores=True, **options)
    expected, sequences = reference.sequences.numpy(), np.asarray(ours.sequences)
    assert sequences.shape == expected.shape and np.array_equal(sequences, expected), (
        f"ids differ\nours:\n{sequences}\ntransformers:\n{expected}")
    np.testing.assert_allclose(np.asarray(ours.sequences_scores), reference.sequences_scores.numpy(),
                               rtol=1e-4, atol=1e-4, err_msg="sequence scores")


def test_generate_static_with_auto_kernels_traces_both_layouts_and_runs_this_platforms():
    """Called directly with kernels="auto", generate_static traces the generation for both cache
    layouts; lowered for the CPU it keeps the CPU one, exported for a TPU the portable one (and
    the TPU kernels' flash attention), and the ids are those of either policy."""
    _, module, params = models()
    input_ids, attention_mask = inputs()
    config = resolve_generation_config(module, None, **OPTIONS["beam3-early-return3"])
    ids = {kernels: np.asarray(generate_static(module.clone(kernels=kernels), params, jnp.asarray(input_ids, jnp.int32),
                                               jnp.asarray(attention_mask, jnp.int32), config).sequences)
           for kernels in ("auto", "cpu", "portable")}
    assert np.array_equal(ids["auto"], ids["cpu"]) and np.array_equal(ids["auto"], ids["portable"]), ids

    def run(params, input_ids, attention_mask):
        return generate_static(module, params, input_ids, attention_mask, config).sequences

    shapes = (jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
              jax.ShapeDtypeStruct(input_ids.shape, jnp.int32), jax.ShapeDtypeStruct(input_ids.shape, jnp.int32))
    cpu_text = jax.jit(run).lower(*shapes).as_text()
    tpu_text = jax.export.export(jax.jit(run), platforms=["tpu"])(*shapes).mlir_module()

    def cache_type(kernels):  # the MLIR type of the first layer's first key buffer
        key = init_cache(module.config, len(input_ids), config.max_length, config.num_beams,
                         kernels=kernels)["layers"][0]["key"]
        shape = (key[0] if isinstance(key, tuple) else key).shape
        return "tensor<" + "x".join(map(str, shape)) + "xf32>"

    assert cache_type("cpu") in cpu_text and cache_type("portable") not in cpu_text, "CPU lowering: not the CPU cache"
    assert cache_type("portable") in tpu_text and cache_type("cpu") not in tpu_text, "TPU export: not the portable cache"
    assert "tpu_custom_call" in tpu_text, "TPU export: the encoder does not run the Pallas flash attention"
    assert "tpu_custom_call" not in cpu_text
