"""The model-agnostic generation engine against transformers, without BART.

A toy language model whose next-token logits are a seeded table indexed by (position, sum of
the tokens so far mod STATES) exists twice: as a transformers `GenerationMixin` model and as a
`tokens_to_logits` function whose cache is the running token sum (so a wrong beam reorder of
the cache changes the logits). transformers' own `generate` is the reference for the search
loops; its processor classes are the reference for each logits processor.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as hf_processors
from transformers.modeling_outputs import CausalLMOutputWithPast

from bart_jax.generation import GenerationConfig, search
from bart_jax.generation import logits_processors as lp

pytestmark = pytest.mark.filterwarnings("ignore:Using the model-agnostic default")

VOCAB, STATES, POSITIONS = 12, 7, 40
BOS, PAD, EOS = 0, 1, 2
SPECIAL = dict(bos_token_id=BOS, pad_token_id=PAD, eos_token_id=EOS)


# --- the toy model, twice ----------------------------------------------------------------
class TableConfig(transformers.PretrainedConfig):
    model_type = "bart_jax_table_lm"

    def __init__(self, vocab_size=VOCAB, states=STATES, max_position_embeddings=POSITIONS, **kwargs):
        self.vocab_size, self.states, self.max_position_embeddings = vocab_size, states, max_position_embeddings
        super().__init__(**kwargs)


class TableLM(transformers.PreTrainedModel, transformers.GenerationMixin):
    config_class = TableConfig

    def __init__(self, config, table):
        super().__init__(config)
        self.register_buffer("table", torch.as_tensor(table))  # [positions, states, vocab]
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        position = input_ids.shape[1] - 1
        state = input_ids.sum(-1) % self.config.states
        return CausalLMOutputWithPast(logits=self.table[position, state][:, None, :])


def toy_table():
    """[positions, states, vocab] logits; the EOS boost makes rows and beams end at different steps."""
    table = np.random.default_rng(1).normal(0.0, 2.0, (POSITIONS, STATES, VOCAB)).astype(np.float32)
    table[:, :, EOS] += 1.0
    return table


@functools.lru_cache(maxsize=None)
def hf_toy():
    return TableLM(TableConfig(**SPECIAL), toy_table()).eval()


def toy_tokens_to_logits(table):
    table = jnp.asarray(table)

    def tokens_to_logits(token_ids, token_sum, step):
        token_sum = token_sum + token_ids[:, 0]  # the cache: [rows] sum of the tokens fed so far
        return table[step, token_sum % STATES], token_sum

    return tokens_to_logits


@functools.partial(jax.jit, static_argnames="config")
def toy_search(cache, prompt, prng_key, config):
    return search(toy_tokens_to_logits(toy_table()), cache, prompt, config, prng_key)


def run_ours(prompt, prng_key=None, **options):
    """Our search on the toy model: (config, SearchOutput) with sequences trimmed as generate does."""
    prompt = np.asarray(prompt)
    config = GenerationConfig(**{**SPECIAL, **options}).resolve(prompt.shape[1], POSITIONS)
    rows_per_input = config.num_beams if config.num_beams > 1 else config.num_return_sequences
    prompt_rows = prompt if config.num_beams > 1 else np.repeat(prompt, rows_per_input, axis=0)
    # The cache holds every prompt token but the last.
    cache = jnp.asarray(np.repeat(prompt[:, :-1].sum(-1), rows_per_input), jnp.int32)
    output = toy_search(cache, jnp.asarray(prompt_rows, jnp.int32), prng_key, config)
    length = int(np.max(output.lengths))
    return config, output._replace(sequences=np.asarray(output.sequences[:, :length]))


def run_transformers(prompt, **options):
    prompt = torch.as_tensor(np.asarray(prompt))
    with torch.no_grad():
        return hf_toy().generate(
            prompt, attention_mask=torch.ones_like(prompt), use_cache=False, return_dict_in_generate=True,
            output_scores=True, **options,
        )


PROMPTS = {
    "one-token": [[0], [3], [5]],
    "three-tokens": [[0, 5, 7], [0, 3, 4], [0, 9, 9]],
}

SEARCHES = {
    "greedy": dict(max_length=14),
    "greedy-default-length": dict(),
    "greedy-no-eos": dict(max_new_tokens=6, eos_token_id=None),
    "greedy-processors": dict(max_length=16, repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=4,
                              bad_words_ids=[[3], [5, 6], [4, 4, 9]], forced_bos_token_id=4,
                              forced_eos_token_id=EOS, suppress_tokens=[7]),
    "greedy-unigram-ban": dict(max_length=12, no_repeat_ngram_size=1, repetition_penalty=0.7),
    "beam3-return2": dict(num_beams=3, num_return_sequences=2, max_length=14),
    "beam4-early": dict(num_beams=4, num_return_sequences=4, max_length=16, early_stopping=True),
    "beam4-never-lp2": dict(num_beams=4, num_return_sequences=3, max_length=16, early_stopping="never",
                            length_penalty=2.0),
    "beam4-heuristic-lp-neg": dict(num_beams=4, num_return_sequences=4, max_length=16, length_penalty=-1.0),
    "beam2-lp0-never": dict(num_beams=2, max_length=16, length_penalty=0.0, early_stopping="never"),
    "beam5-processors": dict(num_beams=5, num_return_sequences=2, max_length=15, repetition_penalty=1.3,
                             no_repeat_ngram_size=3, min_length=6, bad_words_ids=[[3], [5, 6]],
                             forced_bos_token_id=4, forced_eos_token_id=EOS, suppress_tokens=[7]),
}


@pytest.mark.parametrize("prompt_name", list(PROMPTS))
@pytest.mark.parametrize("search_name", list(SEARCHES))
def test_search_matches_transformers(search_name, prompt_name):
    options = SEARCHES[search_name]
    prompt = PROMPTS[prompt_name]
    reference = run_transformers(prompt, **options)
    _, ours = run_ours(prompt, **options)
    expected = reference.sequences.numpy()
    assert ours.sequences.shape == expected.shape and np.array_equal(ours.sequences, expected), (
        f"{search_name}/{prompt_name}: ids differ\nours:\n{ours.sequences}\ntransformers:\n{expected}"
    )
    if options.get("num_beams", 1) > 1:
        np.testing.assert_allclose(np.asarray(ours.scores), reference.sequences_scores.numpy(), atol=1e-5,
                                   err_msg=f"{search_name}/{prompt_name}: sequence scores")


def test_toy_searches_exercise_finishing():
    """The toy searches above must really end hypotheses early, at different lengths."""
    for name in ("greedy", "beam3-return2", "beam4-early", "beam4-heuristic-lp-neg", "beam5-processors"):
        lengths = []
        for prompt in PROMPTS.values():
            config, ours = run_ours(prompt, **SEARCHES[name])
            lengths += np.asarray(ours.lengths).tolist()
        assert len(set(lengths)) > 1, f"{name}: every row has length {lengths[0]}"
        assert min(lengths) < config.max_length, f"{name}: no row ended early"


def test_beam_scores_are_length_normalised_log_probabilities():
    """Each returned hypothesis' score is its summed log-probability / generated_length ** length_penalty."""
    prompt = np.asarray(PROMPTS["three-tokens"])
    table = toy_table()
    for length_penalty in (1.0, 0.5):
        config, ours = run_ours(prompt, num_beams=3, num_return_sequences=3, max_length=14,
                                length_penalty=length_penalty)
        prompt_length = prompt.shape[1]
        for row, (sequence, length, score) in enumerate(zip(ours.sequences, np.asarray(ours.lengths),
                                                            np.asarray(ours.scores))):
            log_prob = 0.0
            for position in range(prompt_length - 1, length - 1):
                logits = table[position, sequence[:position + 1].sum() % STATES].astype(np.float64)
                log_prob += logits[sequence[position + 1]] - np.log(np.exp(logits).sum())
            expected = log_prob / (length - prompt_length) ** length_penalty
            assert abs(score - expected) < 1e-4, f"row {row}: score {score}, recomputed {expected}"
        scores = np.asarray(ours.scores).reshape(len(prompt), 3)
        assert np.all(np.diff(scores, axis=1) <= 0), f"hypotheses not best first: {scores}"


def test_search_exits_when_every_row_is_done():
    """With EOS certain at the third generated token the loop runs 3 steps, not max_length - 1."""
    table = toy_table()
    table[2] = -10.0
    table[2, :, EOS] = 10.0
    calls = []
    base = toy_tokens_to_logits(table)

    def counting(token_ids, cache, step):
        jax.debug.callback(lambda s: calls.append(int(s)), step)
        return base(token_ids, cache, step)

    config = GenerationConfig(**SPECIAL, max_length=30).resolve(1, POSITIONS)
    output = jax.jit(lambda c, p: search(counting, c, p, config))(jnp.zeros(2, jnp.int32), jnp.zeros((2, 1), jnp.int32))
    jax.block_until_ready(output)
    assert calls == [0, 1, 2], f"decoded positions {calls}"
    assert np.asarray(output.lengths).tolist() == [4, 4]


def test_sampling_follows_the_warped_distribution():
    """First sampled tokens of many rows vs the exact softmax of transformers' warped scores."""
    prompt = [[0, 5, 7]]
    options = dict(do_sample=True, temperature=0.7, top_k=6, top_p=0.9, max_new_tokens=1,
                   num_return_sequences=4000)
    _, ours = run_ours(prompt, prng_key=jax.random.PRNGKey(0), **options)
    counts = np.bincount(ours.sequences[:, -1], minlength=VOCAB) / ours.sequences.shape[0]

    logits = torch.as_tensor(toy_table()[2, sum(prompt[0]) % STATES])[None]
    warped = hf_processors.LogitsProcessorList([
        hf_processors.TemperatureLogitsWarper(0.7), hf_processors.TopKLogitsWarper(6),
        hf_processors.TopPLogitsWarper(0.9),
    ])(torch.as_tensor(prompt), logits)
    probabilities = torch.softmax(warped, -1)[0].numpy()
    assert np.all(counts[probabilities == 0] == 0), f"sampled filtered tokens: {counts}, {probabilities}"
    assert np.abs(counts - probabilities).max() < 0.03, f"frequencies {counts} vs probabilities {probabilities}"


def test_sampling_with_top_k_1_is_greedy():
    prompt = PROMPTS["three-tokens"]
    reference = run_transformers(prompt, max_length=14).sequences.numpy()
    _, ours = run_ours(prompt, prng_key=jax.random.PRNGKey(3), do_sample=True, top_k=1, max_length=14)
    assert np.array_equal(ours.sequences, reference), f"ours:\n{ours.sequences}\ntransformers:\n{reference}"


def test_beam_sampling_returns_ranked_finished_hypotheses():
    prompt = np.asarray(PROMPTS["three-tokens"])
    config, ours = run_ours(prompt, prng_key=jax.random.PRNGKey(1), do_sample=True, num_beams=4,
                            num_return_sequences=4, max_length=14, temperature=1.5)
    scores = np.asarray(ours.scores).reshape(len(prompt), 4)
    assert np.all(np.isfinite(scores)) and np.all(np.diff(scores, axis=1) <= 0), f"scores {scores}"
    for sequence, length in zip(ours.sequences, np.asarray(ours.lengths)):
        assert np.all(sequence[length:] == PAD), f"not padded after length {length}: {sequence}"
        assert sequence[length - 1] == EOS or length == config.max_length, f"unfinished hypothesis {sequence}"
    first_inputs = ours.sequences.reshape(len(prompt), 4, -1)[:, :, : prompt.shape[1]]
    assert np.all(first_inputs == prompt[:, None, :]), "hypotheses out of input order"


# --- logits processors, one by one ---------------------------------------------------------
ROWS, CUR_LEN, BUFFER = 6, 9, 14


def processor_inputs(seed=0, vocab=50, token_range=4):
    """Few distinct tokens so that repeats and n-gram matches are common; junk after CUR_LEN."""
    rng = np.random.default_rng(seed)
    sequences = rng.integers(0, token_range, (ROWS, BUFFER)).astype(np.int32)
    sequences[:, CUR_LEN:] = rng.integers(0, vocab, (ROWS, BUFFER - CUR_LEN))
    scores = rng.normal(0.0, 3.0, (ROWS, vocab)).astype(np.float32)
    return sequences, scores


def assert_processor_matches(ours, reference, seed=0, cur_len=CUR_LEN, atol=0.0, **input_options):
    sequences, scores = processor_inputs(seed, **input_options)
    expected = reference(torch.as_tensor(sequences[:, :cur_len], dtype=torch.long),
                         torch.as_tensor(scores)).numpy()
    # Eagerly: the searches above run every processor under jit.
    actual = np.asarray(ours(jnp.asarray(sequences), jnp.int32(cur_len), jnp.asarray(scores)))
    assert np.array_equal(np.isinf(actual), np.isinf(expected)), (
        f"-inf at different places:\nours {np.argwhere(np.isinf(actual)).tolist()}\n"
        f"transformers {np.argwhere(np.isinf(expected)).tolist()}"
    )
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("penalty", [0.5, 1.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_repetition_penalty(penalty, seed):
    assert_processor_matches(lp.repetition_penalty(penalty), hf_processors.RepetitionPenaltyLogitsProcessor(penalty),
                             seed)


@pytest.mark.parametrize("ngram_size", [1, 2, 3, 4, 10])
@pytest.mark.parametrize("cur_len", [1, 3, CUR_LEN])
def test_no_repeat_ngram(ngram_size, cur_len):
    assert_processor_matches(lp.no_repeat_ngram(ngram_size), hf_processors.NoRepeatNGramLogitsProcessor(ngram_size),
                             cur_len=cur_len, token_range=3)


@pytest.mark.parametrize("cur_len", [1, 2, CUR_LEN])
def test_bad_words(cur_len):
    words = [[7], [EOS], [1, 2], [2, 0], [0, 1, 3], [3, 3, 1], [1, 1, 2, 0]]
    assert_processor_matches(lp.bad_words(words, (EOS,)), hf_processors.NoBadWordsLogitsProcessor(words, EOS),
                             cur_len=cur_len)


@pytest.mark.parametrize("cur_len", [3, 4, 5])
def test_min_length_and_min_new_tokens(cur_len):
    assert_processor_matches(lp.min_length(5, (EOS, 4)), hf_processors.MinLengthLogitsProcessor(5, [EOS, 4]),
                             cur_len=cur_len)
    # min_new_tokens=3 after a 2-token prompt is min_length=5.
    assert_processor_matches(lp.min_length(5, (EOS,)),
                             hf_processors.MinNewTokensLengthLogitsProcessor(2, 3, EOS), cur_len=cur_len)


@pytest.mark.parametrize("cur_len", [1, 2])
def test_forced_bos_token(cur_len):
    assert_processor_matches(lp.forced_bos_token(5), hf_processors.ForcedBOSTokenLogitsProcessor(5), cur_len=cur_len)


@pytest.mark.parametrize("cur_len", [8, 9])
def test_forced_eos_token(cur_len):
    assert_processor_matches(lp.forced_eos_token(10, (EOS, 7)), hf_processors.ForcedEOSTokenLogitsProcessor(10, [EOS, 7]),
                             cur_len=cur_len)


def test_suppress_tokens():
    assert_processor_matches(lp.suppress_tokens((0, 5, 49)), hf_processors.SuppressTokensLogitsProcessor([0, 5, 49]))


@pytest.mark.parametrize("seed", [0, 1])
def test_sampling_warpers(seed):
    assert_processor_matches(lp.temperature(0.7), hf_processors.TemperatureLogitsWarper(0.7), seed)
    for k, keep in ((1, 1), (5, 1), (1, 2), (80, 1)):
        assert_processor_matches(lp.top_k(k, keep), hf_processors.TopKLogitsWarper(k, min_tokens_to_keep=keep), seed)
    for p, keep in ((0.9, 1), (0.3, 1), (0.01, 2), (0.999, 1)):
        assert_processor_matches(lp.top_p(p, keep), hf_processors.TopPLogitsWarper(p, min_tokens_to_keep=keep), seed)


def hf_processor_list(**options):
    """The processor list transformers' generate builds for `options` (prompt of 1 token)."""
    model = hf_toy()
    config = transformers.GenerationConfig(**{**SPECIAL, **options})
    model._prepare_special_tokens(config, device="cpu")
    return model._get_logits_processor(config, input_ids_seq_length=1,
                                       encoder_input_ids=torch.zeros((1, 1), dtype=torch.long), device="cpu")


@pytest.mark.parametrize("num_beams", [1, 3])
def test_processor_chain_order(num_beams):
    options = dict(max_length=10, repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[3], [0, 1]],
                   min_length=12, forced_eos_token_id=EOS, suppress_tokens=[7, 8], do_sample=True,
                   temperature=0.5, top_k=4, top_p=0.8, num_beams=num_beams)
    ours = lp.chain(lp.build_logits_processors(GenerationConfig(**SPECIAL, **options).resolve(1)))
    assert_processor_matches(ours, hf_processor_list(**options), cur_len=9, atol=1e-6)


# --- GenerationConfig ----------------------------------------------------------------------
def test_config_defaults_are_transformers_defaults():
    hf_defaults = transformers.GenerationConfig._get_default_generation_params()
    hf_config = transformers.GenerationConfig()
    ours = GenerationConfig()
    for name, value in ours.to_dict().items():
        expected = hf_defaults.get(name, getattr(hf_config, name))
        if name == "max_length":
            expected = None  # unset means transformers' 20 new tokens; see test_config_resolve
        assert value == expected, f"{name}: ours {value!r}, transformers {expected!r}"


def test_config_is_hashable_and_replace_validates():
    config = GenerationConfig(bad_words_ids=[[1, 2], [3]], suppress_tokens=[4], eos_token_id=[2, 5])
    assert config.bad_words_ids == ((1, 2), (3,)) and config.eos_token_ids == (2, 5)
    assert hash(config) == hash(GenerationConfig(bad_words_ids=((1, 2), (3,)), suppress_tokens=(4,),
                                                 eos_token_id=(2, 5)))
    assert config.replace(num_beams=4).num_beams == 4
    with pytest.raises(ValueError, match="unknown generation option 'num_beam'"):
        config.replace(num_beam=4)
    with pytest.raises(ValueError, match="typical_p"):
        config.replace(typical_p=0.5)
    assert config.replace(typical_p=1.0) == config  # a neutral value of an unsupported option is harmless


@pytest.mark.parametrize("options, message", [
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "greedy search"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(eos_token_id=-1), "eos_token_id"),
    (dict(bad_words_ids=[[]]), "bad_words_ids"),
    (dict(forced_eos_token_id=2, suppress_tokens=[2]), "suppress_tokens"),
])
def test_config_rejects_invalid_options(options, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**options)


def test_config_resolve():
    resolved = GenerationConfig(eos_token_id=2).resolve(1, max_position_embeddings=64)
    assert (resolved.max_length, resolved.min_length, resolved.pad_token_id) == (21, 0, 2)
    assert GenerationConfig().resolve(1, max_position_embeddings=10).max_length == 10
    assert GenerationConfig(max_length=100).resolve(1, max_position_embeddings=10).max_length == 100
    resolved = GenerationConfig(max_length=50, max_new_tokens=7, min_length=3, min_new_tokens=2).resolve(3)
    assert (resolved.max_length, resolved.min_length) == (10, 5), "max/min_new_tokens take precedence"
    assert resolved.resolve(3) == resolved
    assert GenerationConfig(bos_token_id=0).resolve(1).decoder_start_token_id == 0
    with pytest.raises(ValueError, match="nothing to generate"):
        GenerationConfig(max_length=3).resolve(3)


def test_config_from_pretrained(tmp_path):
    options = dict(max_length=142, min_length=56, num_beams=4, length_penalty=2.0, no_repeat_ngram_size=3,
                   early_stopping=True, forced_bos_token_id=0, forced_eos_token_id=2, bad_words_ids=[[5, 6]],
                   decoder_start_token_id=2, eos_token_id=2, pad_token_id=1, bos_token_id=0)
    transformers.GenerationConfig(**options).save_pretrained(tmp_path / "new")
    loaded = GenerationConfig.from_pretrained(tmp_path / "new")
    assert loaded == GenerationConfig(**options), f"generation_config.json read as {loaded}"

    # An old checkpoint keeps its generation options in config.json.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"model_type": "bart", "d_model": 16, **options}))
    reference = transformers.GenerationConfig.from_pretrained(legacy, config_file_name="config.json",
                                                              _from_model_config=True)
    loaded = GenerationConfig.from_pretrained(legacy)
    for name, value in loaded.to_dict().items():
        if name in options:
            assert value == getattr(reference, name), f"{name}: ours {value!r}, transformers {getattr(reference, name)!r}"

    roundtrip = tmp_path / "roundtrip"
    loaded.save_pretrained(roundtrip)
    assert GenerationConfig.from_pretrained(roundtrip) == loaded
    assert transformers.GenerationConfig.from_pretrained(roundtrip).num_beams == 4

    unsupported = tmp_path / "unsupported"
    transformers.GenerationConfig(typical_p=0.5, do_sample=True).save_pretrained(unsupported)
    with pytest.raises(ValueError, match="typical_p"):
        GenerationConfig.from_pretrained(unsupported)
    with pytest.raises(ValueError, match="generation_config.json"):
        GenerationConfig.from_pretrained(tmp_path / "missing")
