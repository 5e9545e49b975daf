"""Sharding over a device mesh, scan over layers and rematerialisation.

Here, on one device: scan-over-layers equals the unrolled model, remat changes memory and not
results, the stacked-layer layout converts both ways, every parameter has logical axes, and the
rules resolve as documented. In subprocesses: every sharding preset on 8 simulated CPU devices
(tests/parallel/multidevice_sharding.py) and two processes on localhost (scripts/two_process_demo.py).
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import HEADS
from jax.sharding import AbstractMesh, PartitionSpec

from bart_jax import parallel
from bart_jax.checkpoints import conversion
from bart_jax.config import BartConfig
from bart_jax.generation import resolve_generation_config
from bart_jax.model import heads
from bart_jax.model.cache import init_cache
from bart_jax.model.layers import REMAT_POLICIES

REPO = pathlib.Path(__file__).resolve().parents[2]
# Optimisation level 0 compiles 2-3x faster on CPU; both sides of every comparison share it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
ATOL = 1e-5
CONFIG = BartConfig(
    vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64, dropout=0.0,
)


def run_isolated(command, timeout: float, devices: int | None = None):
    flags = FAST_COMPILE if devices is None else f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)
    output = "\n".join(line for line in (result.stdout + result.stderr).splitlines()
                       if "Involuntary full rematerialization" not in line and "[Gloo]" not in line)
    return result.returncode, output


@pytest.mark.slow
def test_every_sharding_preset_on_eight_devices():
    code, output = run_isolated([sys.executable, "-m", "pytest", "tests/parallel/multidevice_sharding.py", "-q",
                                 "-p", "no:cacheprovider"], timeout=900, devices=8)
    assert code == 0, f"sharded checks failed on 8 simulated devices:\n{output[-6000:]}"
    assert " passed" in output and "skipped" not in output, output[-2000:]


@pytest.mark.slow
def test_two_processes_on_localhost_compute_what_one_process_does():
    code, output = run_isolated([sys.executable, "scripts/two_process_demo.py", "--timeout", "600"], timeout=900)
    assert code == 0 and "results match" in output, f"two-process run failed:\n{output[-6000:]}"


# --- scan over layers ---------------------------------------------------------------------------
def random_inputs(rows=2, length=7, seed=0):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(4, CONFIG.vocab_size, (rows, length)).astype(np.int32)
    input_ids[:, -1] = CONFIG.eos_token_id
    attention_mask = np.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    return jnp.asarray(input_ids), jnp.asarray(attention_mask)


@functools.lru_cache(maxsize=None)
def params_of(head: str, config: BartConfig = CONFIG):
    module = heads.head_class(head)(config)
    input_ids, attention_mask = random_inputs()
    params = jax.jit(module.init)(jax.random.PRNGKey(0), input_ids, attention_mask)["params"]
    # Noise everywhere, so that no bias is zero and no LayerNorm is (1, 0).
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [leaf + 0.05 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)])


def assert_trees_close(name, expected, actual, atol=ATOL):
    expected_flat, expected_tree = jax.tree_util.tree_flatten_with_path(expected)
    actual_flat, actual_tree = jax.tree_util.tree_flatten_with_path(actual)
    assert expected_tree == actual_tree, f"{name}: structure differs:\n{expected_tree}\n{actual_tree}"
    for (path, want), (_, got) in zip(expected_flat, actual_flat):
        difference = float(jnp.max(jnp.abs(jnp.asarray(want, jnp.float32) - jnp.asarray(got, jnp.float32)),
                                    initial=0.0))
        assert difference <= atol, f"{name}{jax.tree_util.keystr(path)}: max abs difference {difference:.3g} > {atol}"


# The layer stacks are the same in every head; these two cover both stacks, with and without
# cross-attention.
@pytest.mark.parametrize("head", ["BartForConditionalGeneration", "BartForCausalLM"])
def test_scanned_layers_give_the_unrolled_outputs(head):
    params = params_of(head)
    stacked = conversion.stack_layers(params)
    scanned = heads.head_class(head)(CONFIG, scan_layers=True)
    input_ids, attention_mask = random_inputs()
    shapes = jax.eval_shape(scanned.init, jax.random.PRNGKey(0), input_ids, attention_mask)["params"]
    assert jax.tree_util.tree_map(lambda a: a.shape, shapes) == jax.tree_util.tree_map(jnp.shape, stacked), (
        "scan_layers=True initialises another layout than conversion.stack_layers")

    def run(module, params):
        return jax.jit(lambda p: module.apply({"params": p}, input_ids, attention_mask, output_hidden_states=True,
                                              output_attentions=True))(params)

    assert_trees_close(head, run(heads.head_class(head)(CONFIG), params), run(scanned, stacked))


def test_scanned_decoder_steps_over_the_cache_like_the_unrolled_one():
    params = params_of("BartForConditionalGeneration")
    unrolled = heads.BartForConditionalGeneration(CONFIG)
    scanned = heads.BartForConditionalGeneration(CONFIG, scan_layers=True)
    input_ids, attention_mask = random_inputs()

    @functools.partial(jax.jit, static_argnums=0)
    def decode(module, params):
        encoded = module.apply({"params": params}, input_ids, attention_mask, method="encode").last_hidden_state
        cross = module.apply({"params": params}, encoded, method="project_cross_key_values")
        cache, logits = init_cache(CONFIG, 2, 4), []
        for index in range(3):
            step_logits, cache = module.apply({"params": params}, input_ids[:, index:index + 1], cache,
                                              jnp.int32(index), cross, attention_mask, method="decode_step")
            logits.append(step_logits)
        return cross, cache, logits

    assert_trees_close("decode steps", decode(unrolled, params), decode(scanned, conversion.stack_layers(params)))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_layerdrop_draws_per_layer_in_training_mode(scan_layers):
    config = BartConfig(**{**CONFIG.__dict__, "encoder_layerdrop": 1.0})
    module = heads.BartModel(config, scan_layers=scan_layers)
    params = params_of("BartModel")
    params = conversion.stack_layers(params) if scan_layers else params
    input_ids, attention_mask = random_inputs()
    encoded = jax.jit(lambda p: module.apply({"params": p}, input_ids, attention_mask, deterministic=False,
                                             rngs={"dropout": jax.random.PRNGKey(0)}, method="encode",
                                             output_hidden_states=True))(params)
    # Every layer dropped: the output is the embedding layer's.
    assert_trees_close("all layers dropped", encoded.hidden_states[0], encoded.last_hidden_state, atol=0)


# --- remat --------------------------------------------------------------------------------------
def test_remat_changes_memory_not_gradients():
    config = BartConfig(**{**CONFIG.__dict__, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "encoder_layers": 3})
    input_ids = jnp.asarray(np.random.default_rng(0).integers(4, 99, (4, 48)), jnp.int32)
    params = conversion.stack_layers(params_of("BartForConditionalGeneration", config))

    def gradient(policy):
        module = heads.BartForConditionalGeneration(config, scan_layers=True, remat_policy=policy)
        compiled = jax.jit(jax.grad(lambda p: module.apply({"params": p}, input_ids, labels=input_ids).loss)).lower(
            params).compile()
        return compiled(params), compiled.memory_analysis().temp_size_in_bytes

    expected, kept_everything = gradient("none")
    for policy in REMAT_POLICIES[1:]:
        actual, temporaries = gradient(policy)
        assert_trees_close(f"gradients with remat_policy={policy}", expected, actual)
        assert temporaries < kept_everything, f"{policy}: {temporaries} temporary bytes, {kept_everything} without"
    with pytest.raises(ValueError, match="unknown remat_policy 'everything'"):
        heads.BartForConditionalGeneration(config, remat_policy="everything").init(
            jax.random.PRNGKey(0), input_ids)


def test_unrolled_remat_keeps_gradients():
    params = params_of("BartForConditionalGeneration")
    input_ids, attention_mask = random_inputs()

    def gradient(policy):
        module = heads.BartForConditionalGeneration(CONFIG, remat_policy=policy)
        return jax.jit(jax.grad(lambda p: module.apply({"params": p}, input_ids, attention_mask,
                                                       labels=input_ids).loss))(params)

    assert_trees_close("unrolled remat gradients", gradient("none"), gradient("full"))


# --- stacked layout in conversion ------------------------------------------------------------------
def test_stacked_layers_convert_both_ways():
    from hf_reference import hf_model

    model = hf_model("BartForConditionalGeneration")
    config = BartConfig.from_dict(model.config.to_dict())
    state = {key: value.detach().numpy() for key, value in model.state_dict().items()}
    unrolled = conversion.hf_to_flax(state, config, "BartForConditionalGeneration")
    stacked = conversion.hf_to_flax(state, config, "BartForConditionalGeneration", scan_layers=True)
    kernel = stacked["model"]["encoder"]["layers"]["fc1"]["weight"]
    assert kernel.shape == (config.encoder_layers, config.encoder_ffn_dim, config.d_model), kernel.shape
    assert "layers_0" not in stacked["model"]["decoder"]
    assert_trees_close("unstack(stack(params))", unrolled, conversion.unstack_layers(stacked), atol=0)
    assert_trees_close("stack twice", stacked, conversion.stack_layers(stacked), atol=0)
    written = conversion.flax_to_hf(stacked, config, "BartForConditionalGeneration")
    assert written.keys() == conversion.flax_to_hf(unrolled, config, "BartForConditionalGeneration").keys()
    for key, value in written.items():
        np.testing.assert_array_equal(value, model.state_dict()[key].numpy(), err_msg=key)


# --- logical axes and rules -----------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("head", HEADS)
def test_every_parameter_has_logical_axes(head, tied):
    config = BartConfig(**{**CONFIG.__dict__, "tie_word_embeddings": tied})
    shapes = conversion.expected_flax_shapes(config, head)
    shapes = jax.tree_util.tree_map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32), shapes,
                                    is_leaf=lambda node: isinstance(node, tuple))
    assert parallel.unmatched_leaves(shapes) == [], "parameters without logical axes"
    stacked = jax.eval_shape(conversion.stack_layers, shapes)
    assert parallel.unmatched_leaves(stacked) == [], "stacked parameters without logical axes"


@pytest.mark.parametrize("quantize", ["int8", "int8-weights"])
def test_int8_weights_are_split_as_their_float_weights(quantize):
    from bart_jax.model.quantization import quantize_params

    shapes = jax.tree_util.tree_map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32),
                                    conversion.expected_flax_shapes(CONFIG, "BartForConditionalGeneration"),
                                    is_leaf=lambda node: isinstance(node, tuple))
    quantized = jax.eval_shape(lambda params: quantize_params(params, quantize), shapes)
    assert parallel.unmatched_leaves(quantized) == [], "int8 weights without logical axes"
    mesh = AbstractMesh((1, 2, 2), parallel.MESH_AXES)
    shardings = parallel.tree_shardings(quantized, mesh, indivisible="replicate")
    floats = parallel.tree_shardings(shapes, mesh, indivisible="replicate")
    flat_floats = dict(jax.tree_util.tree_flatten_with_path(floats)[0])
    split = 0
    for path, sharding in jax.tree_util.tree_flatten_with_path(shardings)[0]:
        name = parallel.path_name(path)
        if name.endswith("/array/qvalue"):
            float_spec = tuple(flat_floats[path[:-2]].spec)
            assert tuple(sharding.spec) == float_spec, name
            split += any(axis is not None for axis in float_spec)
        elif name.endswith("/array/scale"):
            assert tuple(sharding.spec) == tuple(flat_floats[path[:-2]].spec)[:1] + (None,) * (
                len(sharding.spec) - 1), name
    assert split, "no int8 weight was split: the test's mesh splits nothing"


def test_rules_resolve_each_mesh_axis_once_per_array():
    mesh = AbstractMesh((2, 2, 2), parallel.MESH_AXES)
    spec = parallel.logical_to_spec
    assert spec(("embed", "joined_kv"), (8, 8), mesh) == PartitionSpec("fsdp", "tensor")
    assert spec(("layers", "mlp", "embed"), (3, 8, 8), mesh) == PartitionSpec(None, "tensor", "fsdp")
    # Attention keys [batch, heads, head_dim, length]: inputs over the data axes, heads over tensor.
    assert spec(parallel.KEYS, (8, 4, 2, 15), mesh) == PartitionSpec(("data", "fsdp"), "tensor", None, None)
    # "tensor" already splits the heads, so the vocabulary axis stays whole.
    assert spec(("activation_heads", "activation_vocab"), (4, 8), mesh) == PartitionSpec("tensor", None)
    # Rules naming an axis the mesh lacks use the axes it has.
    assert spec(parallel.HIDDEN, (4, 3, 8), AbstractMesh((4,), ("data",))) == PartitionSpec("data", None, None)
    with pytest.raises(ValueError, match=r"'vocab' of size 99 .* cannot be split 2 ways over mesh axes \('tensor',\)"):
        spec(("vocab", "embed"), (99, 8), mesh, name="shared")
    assert spec(("vocab", "embed"), (99, 8), mesh, indivisible="replicate") == PartitionSpec(None, "fsdp")


def test_constraints_are_inert_without_a_mesh():
    x = jnp.ones((2, 3, 4))
    assert parallel.constrain(x, parallel.HIDDEN) is x


def test_mesh_over_one_device():
    mesh = parallel.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs 2 devices, there are 1"):
        parallel.make_mesh(data=2)


def test_equal_generation_requests_reuse_one_sharded_function():
    """jit_generate with equal arguments gives the same function, whose compilations later calls
    (each evaluation of a training run, each window of a summarization job) then reuse."""
    module = heads.head_class("BartForConditionalGeneration")(CONFIG)
    params = params_of("BartForConditionalGeneration")
    mesh = parallel.make_mesh()
    config = resolve_generation_config(module, None, max_new_tokens=3)

    def sharded(rules=parallel.RULES):
        return parallel.jit_generate(module, mesh, parallel.tree_shardings(params, mesh), config, rules)

    assert sharded() is sharded() and sharded() is sharded(list(parallel.RULES)), "an equal request built anew"
    assert sharded() is not parallel.jit_generate(module, mesh, parallel.tree_shardings(params, mesh),
                                                  config.replace(max_new_tokens=4)), "other options shared"
