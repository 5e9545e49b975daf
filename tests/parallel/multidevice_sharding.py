"""Sharded BART equals unsharded BART on 8 simulated CPU devices, for every sharding preset.

Run by tests/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is fixed at JAX start-up,
so these checks cannot share a process with the rest of the suite). To run it alone:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/parallel/multidevice_sharding.py

The reference for every check is the same function jitted on one device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax import parallel
from bart_jax.checkpoints import conversion
from bart_jax.config import BartConfig
from bart_jax.generation.generate import generate_static, resolve_generation_config
from bart_jax.model import heads

if jax.device_count() != 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8", allow_module_level=True)

ATOL = 1e-5
# Every sharded dimension divisible by 8: heads, head_dim * heads, ffn, vocab, batch. No dropout:
# random-bit generation makes CPU compiles several times slower; dropout has its own test.
CONFIG = BartConfig(
    vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=8,
    decoder_attention_heads=8, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
)
BATCH, SOURCE, TARGET = 8, 12, 7
PRESETS = tuple(parallel.PRESETS)


def perturbed_params(module, seed=0):
    """Initialised params plus noise, so that no bias is zero and no LayerNorm is (1, 0)."""
    ids = jnp.ones((1, 4), jnp.int32)
    params = jax.jit(module.init)(jax.random.PRNGKey(seed), ids, ids, decoder_input_ids=ids)["params"]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    noisy = [leaf + 0.05 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
    return jax.tree_util.tree_map(np.asarray, jax.tree_util.tree_unflatten(treedef, noisy))


@functools.lru_cache(maxsize=None)
def model(scan_layers=False, remat_policy="none"):
    """(module, host params); the scanned variant holds the same weights, stacked."""
    module = heads.BartForConditionalGeneration(CONFIG, scan_layers=scan_layers, remat_policy=remat_policy)
    params = perturbed_params(heads.BartForConditionalGeneration(CONFIG))
    return module, conversion.stack_layers(params) if scan_layers else params


def make_batch(rows=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(4, CONFIG.vocab_size, (rows, SOURCE)).astype(np.int32)
    lengths = rng.integers(3, SOURCE + 1, rows)
    attention_mask = (np.arange(SOURCE)[None] < lengths[:, None]).astype(np.int32)
    input_ids = np.where(attention_mask == 1, input_ids, CONFIG.pad_token_id).astype(np.int32)
    labels = rng.integers(4, CONFIG.vocab_size, (rows, TARGET)).astype(np.int32)
    labels[0, 4:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@functools.lru_cache(maxsize=None)
def reference_forward():
    module, params = model()
    return jax.jit(lambda p, b: module.apply({"params": p}, **b, output_hidden_states=True))(params, make_batch())


def assert_trees_close(name, expected, actual, atol=ATOL):
    expected_flat, expected_tree = jax.tree_util.tree_flatten_with_path(expected)
    actual_flat, actual_tree = jax.tree_util.tree_flatten_with_path(actual)
    assert expected_tree == actual_tree, f"{name}: structure differs"
    for (path, want), (_, got) in zip(expected_flat, actual_flat):
        want, got = np.asarray(want), np.asarray(got)
        assert want.shape == got.shape, f"{name}{jax.tree_util.keystr(path)}: shape {got.shape} != {want.shape}"
        difference = np.max(np.abs(want.astype(np.float64) - got.astype(np.float64)), initial=0.0)
        assert difference <= atol, f"{name}{jax.tree_util.keystr(path)}: max abs difference {difference:.3g} > {atol}"


def shard_shape(array):
    return array.addressable_shards[0].data.shape


# --- parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_parameters_are_split_as_the_preset_says(preset):
    mesh = parallel.preset_mesh(preset)
    _, params = model()
    placed = parallel.shard_params(params, mesh)
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    layer = placed["model"]["encoder"]["layers_0"]
    d, ffn, vocab = CONFIG.d_model, CONFIG.encoder_ffn_dim, CONFIG.vocab_size
    expected = {
        "q_proj weight (column-parallel)": (layer["self_attn"]["q_proj"]["weight"], (d // tensor, d // fsdp)),
        "q_proj bias": (layer["self_attn"]["q_proj"]["bias"], (d // tensor,)),
        "out_proj weight (row-parallel)": (layer["self_attn"]["out_proj"]["weight"], (d // fsdp, d // tensor)),
        "fc1 weight (column-parallel)": (layer["fc1"]["weight"], (ffn // tensor, d // fsdp)),
        "fc2 weight (row-parallel)": (layer["fc2"]["weight"], (d // fsdp, ffn // tensor)),
        "embedding (vocab-parallel)": (placed["model"]["shared"]["embedding"], (vocab // tensor, d // fsdp)),
        "final_logits_bias": (placed["final_logits_bias"], (1, vocab // tensor)),
        "layer norm": (layer["final_layer_norm"]["scale"], (d // fsdp,)),
    }
    for name, (array, shape) in expected.items():
        assert shard_shape(array) == shape, f"{preset}: {name} shard {shard_shape(array)}, expected {shape}"
        assert len(array.addressable_shards) == 8
    total = sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(params))
    per_device = parallel.per_device_bytes(placed, jax.tree_util.tree_map(lambda a: a.sharding, placed))
    # Biases, LayerNorms and position embeddings are split by one of the two axes only.
    split = fsdp * tensor
    assert per_device == total if split == 1 else per_device < 2 * total / split, (
        f"{preset}: {per_device} bytes per device of {total}, expected about 1/{split}")
    assert_trees_close(f"{preset} placed params", params, placed, atol=0)


# --- forward, encode, decode_step -------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_forward_equals_unsharded(preset):
    mesh = parallel.preset_mesh(preset)
    module, params = model()
    forward = parallel.jit_forward(module, mesh, parallel.tree_shardings(params, mesh), output_hidden_states=True)
    actual = forward(parallel.shard_params(params, mesh), make_batch())
    assert_trees_close(f"{preset} forward", reference_forward(), actual)
    assert shard_shape(actual.logits)[0] == BATCH // parallel.batch_shards(mesh), "logits rows are not split"


def test_dropout_draws_the_same_masks_sharded():
    mesh = parallel.preset_mesh("fsdp+tensor")
    dropout = dataclasses.replace(CONFIG, dropout=0.2, attention_dropout=0.1, activation_dropout=0.1)
    module = heads.BartForConditionalGeneration(dropout)
    _, params = model()
    rng = jax.random.PRNGKey(7)

    batch = make_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def encode(params, inputs, deterministic):
        return module.apply({"params": params}, **inputs, deterministic=deterministic, rngs={"dropout": rng},
                            method="encode").last_hidden_state

    expected = jax.jit(encode, static_argnums=2)(params, inputs, False)
    sharded = parallel.jit_sharded(encode, mesh, static_argnums=2, in_shardings=(
        parallel.tree_shardings(params, mesh), parallel.batch_sharding(mesh)))
    assert not np.allclose(expected, jax.jit(encode, static_argnums=2)(params, inputs, True)), "dropout did nothing"
    actual = sharded(parallel.shard_params(params, mesh), inputs, False)
    assert_trees_close("encoder states with dropout", expected, actual)


def test_encode_and_decode_steps_equal_unsharded_with_a_split_cache():
    from bart_jax.model.cache import init_cache

    mesh = parallel.preset_mesh("data+fsdp+tensor")
    module, params = model()
    batch = make_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    max_length = 5
    steps = np.random.default_rng(1).integers(4, CONFIG.vocab_size, (BATCH, max_length)).astype(np.int32)

    def run(encode, project, decode_step, params, cache):
        encoded = encode(params, inputs).last_hidden_state
        cross = project(params, {"encoder_hidden_states": encoded})
        logits = []
        for index in range(3):
            step_logits, cache = decode_step(params, steps[:, index:index + 1], cache, jnp.int32(index), cross,
                                             batch["attention_mask"])
            logits.append(step_logits)
        return encoded, cross, logits, cache

    apply = lambda method: jax.jit(lambda p, b: module.apply({"params": p}, **b, method=method))  # noqa: E731
    unsharded_step = jax.jit(lambda p, *a: module.apply({"params": p}, *a, method="decode_step"))
    expected = run(apply("encode"), apply("project_cross_key_values"), unsharded_step, params,
                   init_cache(CONFIG, BATCH, max_length))

    shardings = parallel.tree_shardings(params, mesh)
    cache_shapes = init_cache(CONFIG, BATCH, max_length)
    cache = parallel.put_sharded(cache_shapes, parallel.cache_shardings(cache_shapes, mesh))
    actual = run(
        parallel.jit_forward(module, mesh, shardings, method="encode"),
        parallel.jit_forward(module, mesh, shardings, method="project_cross_key_values"),
        parallel.jit_decode_step(module, mesh, shardings),
        parallel.shard_params(params, mesh), cache,
    )
    assert_trees_close("encode/decode_step", expected, actual)
    heads, head_dim = CONFIG.decoder_attention_heads, CONFIG.d_model // CONFIG.decoder_attention_heads
    # Inputs over data x fsdp, heads over tensor: cache keys [batch, heads, head_dim, slots],
    # values [batch, heads, slots, head_dim] (one chunk of max_length * beams slots here);
    # cross-attention keys [batch, heads, head_dim, source].
    (cache_key,), (cache_value,) = actual[3]["layers"][0]["key"], actual[3]["layers"][0]["value"]
    cache_shard = shard_shape(cache_key)
    assert cache_shard == (BATCH // 4, heads // 2, head_dim, max_length), f"cache key shard {cache_shard}"
    cache_shard = shard_shape(cache_value)
    assert cache_shard == (BATCH // 4, heads // 2, max_length, head_dim), f"cache value shard {cache_shard}"
    cross_shard = shard_shape(actual[1][0]["key"])
    assert (cross_shard[0], cross_shard[1], cross_shard[2]) == (BATCH // 4, heads // 2, head_dim), (
        f"cross-attention keys shard {cross_shard}")


# --- generation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,num_beams", [("fsdp+tensor", 1), ("data+tensor", 3)])
def test_generation_equals_unsharded(preset, num_beams):
    mesh = parallel.preset_mesh(preset)
    module, params = model()
    batch = make_batch()
    config = resolve_generation_config(module, None, num_beams=num_beams, max_new_tokens=6, no_repeat_ngram_size=0,
                                       forced_bos_token_id=None)
    expected = generate_static(module, params, batch["input_ids"], batch["attention_mask"], config)
    generate = parallel.jit_generate(module, mesh, parallel.tree_shardings(params, mesh), config)
    actual = generate(parallel.shard_params(params, mesh), batch["input_ids"], batch["attention_mask"])
    np.testing.assert_array_equal(np.asarray(actual.sequences), np.asarray(expected.sequences),
                                  err_msg=f"{preset}, {num_beams} beams: generated ids differ")
    np.testing.assert_array_equal(np.asarray(actual.lengths), np.asarray(expected.lengths))


# --- training -------------------------------------------------------------------------------------------
def training(module, params):
    """(train_step, optimizer) from bart_jax.training: AdamW, warmup, clipping, weight decay."""
    from bart_jax.training.objectives import make_objective
    from bart_jax.training.optimizer import learning_rate_schedule, make_optimizer, trainable_mask
    from bart_jax.training.train_step import make_train_step

    # Moderate steps: the key projections' bias has a zero gradient up to rounding (softmax
    # ignores a constant shift), which Adam would amplify into rounding-level differences.
    schedule = learning_rate_schedule(1e-3, total_steps=10, warmup_steps=1)
    optimizer = make_optimizer(params, schedule, weight_decay=0.01)
    step = make_train_step(make_objective(module, "seq2seq"), optimizer, trainable_mask(params), schedule)
    return step, optimizer


def train_batches(count=2, accumulation=2):
    """[accumulation_steps, micro_batch, ...] batches, as bart_jax.training feeds them."""
    batches = []
    for index in range(count):
        micro = [make_batch(seed=10 * index + part) for part in range(accumulation)]
        batch = {key: np.stack([m[key] for m in micro]) for key in micro[0]}
        batch["example_mask"] = np.ones(batch["input_ids"].shape[:2], np.float32)
        batches.append(batch)
    return batches


def run_steps(step_fn, state, batches):
    """([host copies of (state, metrics) after each step], final state); dropout keys as a
    training loop draws them."""
    history = []
    for index, batch in enumerate(batches):
        state, metrics = step_fn(state, batch, jax.random.PRNGKey(index))
        history.append(jax.device_get((state, metrics)))  # copied: the next step may donate `state`
    return history, state


@functools.lru_cache(maxsize=None)
def reference_training():
    from bart_jax.training.train_step import create_train_state

    module, params = model()
    train_step, optimizer = training(module, params)
    return run_steps(jax.jit(train_step), create_train_state(params, optimizer), train_batches())[0]


@pytest.mark.parametrize("preset", ["fsdp", "tensor"])
def test_train_steps_equal_unsharded(preset):
    from bart_jax.training.train_step import compile_train_step

    mesh = parallel.preset_mesh(preset)
    module, params = model()
    train_step, optimizer = training(module, params)
    # As the training loop does: the optimizer state is created already split over the mesh.
    sharded_step, state = compile_train_step(train_step, params, optimizer, mesh)
    assert jax.tree_util.tree_map(lambda leaf: leaf.sharding, state) == sharded_step.state_shardings, \
        f"{preset}: the initial state is not placed as the step expects"
    history, final = run_steps(sharded_step, state, train_batches())
    moved = max(np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree_util.tree_leaves(history[-1][0].params),
                                                                 jax.tree_util.tree_leaves(params)))
    assert moved > 1e-4, f"the steps barely changed the parameters ({moved:.3g})"
    for index, ((expected, expected_metrics), (actual, metrics)) in enumerate(zip(reference_training(), history)):
        assert_trees_close(f"{preset} params after {index + 1} steps", expected.params, actual.params)
        assert_trees_close(f"{preset} optimizer state after {index + 1} steps", expected.opt_state, actual.opt_state)
        assert_trees_close(f"{preset} metrics of step {index + 1}", expected_metrics, metrics)
    # The optimizer state is split like the parameters it tracks (ZeRO-3 under fsdp).
    mu = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(final.opt_state)[0]
          if parallel.path_name(path).endswith("mu/model/encoder/layers_0/fc1/weight")]
    kernel = final.params["model"]["encoder"]["layers_0"]["fc1"]["weight"]
    assert mu and mu[0].sharding.spec == kernel.sharding.spec, f"{preset}: AdamW mu is not split like its parameter"
    assert kernel.sharding.spec == sharded_step.state_shardings.params["model"]["encoder"]["layers_0"]["fc1"][
        "weight"].spec, "the new state left its sharding"


# --- scan over layers, remat ---------------------------------------------------------------------------
def test_scanned_rematerialised_model_trains_like_the_unrolled_one_when_sharded():
    from bart_jax.training.train_step import compile_train_step

    mesh = parallel.preset_mesh("data+fsdp+tensor")
    scanned, stacked = model(scan_layers=True, remat_policy="full")
    shardings = parallel.tree_shardings(stacked, mesh)
    kernel = shardings["model"]["encoder"]["layers"]["self_attn"]["q_proj"]["weight"]
    assert kernel.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp"), kernel.spec
    forward = parallel.jit_forward(scanned, mesh, shardings, output_hidden_states=True)
    assert_trees_close("scanned forward", reference_forward(), forward(parallel.shard_params(stacked, mesh),
                                                                       make_batch()))

    train_step, optimizer = training(scanned, stacked)
    sharded_step, state = compile_train_step(train_step, stacked, optimizer, mesh)
    history, _ = run_steps(sharded_step, state, train_batches())
    assert_trees_close("scanned, rematerialised train steps", reference_training()[-1][0].params,
                       conversion.unstack_layers(history[-1][0].params))


# --- loading ---------------------------------------------------------------------------------------------
def test_load_pretrained_places_parameters_on_the_mesh(tmp_path):
    from bart_jax.checkpoints.files import save_converted
    from bart_jax.pretrained import load_pretrained

    _, params = model()
    save_converted(params, CONFIG, "BartForConditionalGeneration", tmp_path)
    mesh = parallel.preset_mesh("fsdp+tensor")
    loaded = load_pretrained(tmp_path, mesh=mesh)
    kernel = loaded.params["model"]["decoder"]["layers_1"]["fc2"]["weight"]
    assert shard_shape(kernel) == (32 // 4, 64 // 2), f"fc2 weight shard {shard_shape(kernel)}"
    assert_trees_close("loaded params", params, loaded.params, atol=0)
    batch = make_batch()
    actual = loaded(**batch, output_hidden_states=True)
    assert_trees_close("load_pretrained(mesh=...) outputs", reference_forward(), actual)


# --- errors ---------------------------------------------------------------------------------------------
def test_a_mesh_that_does_not_divide_a_dimension_is_an_error_or_replicates_it_when_asked():
    mesh = parallel.preset_mesh("tensor")
    odd = BartConfig(**{**CONFIG.__dict__, "vocab_size": 99})
    module = heads.BartForConditionalGeneration(odd)
    params = perturbed_params(module)
    with pytest.raises(ValueError, match=r"model/shared/embedding: dimension 'vocab' of size 99") as error:
        parallel.shard_params(params, mesh)
    assert "final_logits_bias" in str(error.value), "every indivisible parameter should be named"
    placed = parallel.shard_params(params, mesh, indivisible="replicate")
    assert shard_shape(placed["model"]["shared"]["embedding"]) == (99, CONFIG.d_model)
    assert shard_shape(placed["model"]["encoder"]["layers_0"]["fc1"]["weight"]) == (64 // 8, CONFIG.d_model)
    batch = make_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    expected = jax.jit(lambda p, b: module.apply({"params": p}, **b, method="encode"))(params, inputs)
    shardings = parallel.tree_shardings(params, mesh, indivisible="replicate")
    actual = parallel.jit_forward(module, mesh, shardings, method="encode")(placed, inputs)
    assert_trees_close("encoder with a replicated vocab", expected, actual)


def test_a_batch_the_batch_shards_do_not_divide_is_an_error():
    mesh = parallel.preset_mesh("data")
    module, params = model()
    batch = make_batch(rows=6)
    forward = parallel.jit_forward(module, mesh, parallel.tree_shardings(params, mesh))
    with pytest.raises(ValueError, match=r"has 6 rows \(axis 0 of shape \(6, 12\)\), not divisible by the 8 batch"):
        forward(parallel.shard_params(params, mesh), batch)
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        parallel.shard_batch(batch, mesh)
    config = resolve_generation_config(module, None, max_new_tokens=3)
    generate = parallel.jit_generate(module, mesh, parallel.tree_shardings(params, mesh), config)
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        generate(params, batch["input_ids"], batch["attention_mask"])


def test_mesh_sizes_must_use_every_device():
    with pytest.raises(ValueError, match="needs 6 devices, there are 8"):
        parallel.make_mesh(data=3, tensor=2)
    with pytest.raises(ValueError, match="cannot be split"):
        parallel.make_mesh(data=-1, tensor=3)
    with pytest.raises(ValueError, match="unknown sharding preset"):
        parallel.preset_mesh("pipeline")
