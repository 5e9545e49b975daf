"""The TPU kernels: Pallas flash attention (attention_tpu.py) run in Pallas' TPU interpret mode on
the CPU, against the portable attention; where it applies and where it falls back; the policy
"tpu" through the whole model; and what lowering for a TPU keeps.

Tolerances: float32 1e-5 (forward) and 1e-4 (gradients); bfloat16 2e-2, as for the other kernels
(the flash kernel multiplies unnormalised bfloat16 probabilities by the values, the portable path
normalised ones).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from bart_jax.config import BartConfig
from bart_jax.model.attention import BartAttention
from bart_jax.model.cache import init_cache
from bart_jax.model.heads import BartForConditionalGeneration
from bart_jax.model.kernels import attention as kernels_attention
from bart_jax.model.kernels import dispatch
from bart_jax.model.kernels.attention import attend_output, attend_portable, attend_tpu
from bart_jax.model.kernels.attention_tpu import attend_flash, flash_applies, kernel_precision


@pytest.fixture(autouse=True)
def interpret():
    """Pallas TPU kernels traced inside run on the CPU, in TPU interpret mode (which also checks
    out-of-bounds reads and uninitialised memory)."""
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        yield


def key_mask(lengths: list[int], keys: int) -> np.ndarray:
    """[batch, 1, 1, keys] mask of right-padded inputs of `lengths`."""
    return (np.arange(keys)[None] < np.asarray(lengths)[:, None])[:, None, None, :]


def causal_key_mask(lengths: list[int], length: int) -> np.ndarray:
    """[batch, 1, length, length]: the decoder's causal mask combined with its key mask."""
    return np.tril(np.ones((length, length), bool))[None, None] & key_mask(lengths, length)


def inputs(batch: int, queries: int, keys: int, head_dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    query = jnp.asarray(rng.standard_normal((batch, queries, 2, head_dim)) * head_dim**-0.5, jnp.float32)
    key, value = (jnp.asarray(rng.standard_normal((batch, keys, 2, head_dim)), jnp.float32) for _ in range(2))
    return query, key, value

# queries, keys, mask, causal: encoder self-attention (padded), decoder self-attention (causal and
# padded; causal alone), cross-attention over a longer source (two key blocks), no mask at all.
CASES = {
    "encoder": (70, 70, key_mask([70, 41], 70), False),
    "decoder": (70, 70, causal_key_mask([70, 33], 70), True),
    "causal-only": (9, 9, causal_key_mask([9], 9)[:1], True),
    "cross": (20, 150, key_mask([150, 129], 150), False),
    "unmasked": (5, 9, None, False),
}


@pytest.mark.parametrize("case, dtype", [(case, "float32") for case in CASES]
                         + [("decoder", "bfloat16"), ("cross", "bfloat16")])
def test_flash_attention_equals_the_portable_one(case, dtype):
    queries, keys, mask, causal = CASES[case]
    query, key, value = inputs(2, queries, keys)
    mask = None if mask is None else jnp.asarray(mask)
    dtype = jnp.dtype(dtype)
    assert flash_applies(query.shape, key.shape, None if mask is None else mask.shape, causal)
    flash = jax.jit(lambda q, k, v: attend_flash(q, k, v, mask, dtype, causal))(query, key, value)
    portable, _ = attend_portable(query, key, value, mask, dtype)
    assert flash.shape == portable.shape and flash.dtype == jnp.float32
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(flash), np.asarray(portable), atol=tolerance, rtol=tolerance,
                               err_msg=f"flash attention differs from the portable one ({case}, {dtype})")


@pytest.mark.parametrize("case", ["decoder", "cross"])
def test_flash_attention_gradients_equal_the_portable_ones(case):
    """The kernel's own backward pass (which recomputes the scores block by block)."""
    queries, keys, mask, causal = CASES[case]
    query, key, value = inputs(2, queries, keys, seed=1)
    mask = jnp.asarray(mask)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(query.shape), jnp.float32)

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v) * cotangent)

    flash = jax.jit(jax.grad(loss(lambda q, k, v: attend_flash(q, k, v, mask, jnp.float32, causal)), (0, 1, 2)))
    portable = jax.grad(loss(lambda q, k, v: attend_portable(q, k, v, mask, jnp.float32)[0]), (0, 1, 2))
    for name, ours, reference in zip(("query", "key", "value"), flash(query, key, value),
                                     portable(query, key, value)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-4, rtol=1e-4,
                                   err_msg=f"d {name}: flash attention's gradient differs ({case})")


def test_flash_attention_under_a_mesh_runs_per_device_and_agrees():
    """Under `activation_sharding` the kernel runs inside `jax.shard_map` (one CPU device here;
    the v5e compile of tests/apps/test_aot.py splits batch and heads over four chips)."""
    from bart_jax.model.partitioning import activation_sharding
    from bart_jax.parallel import RULES, make_mesh

    queries, keys, mask, causal = CASES["decoder"]
    query, key, value = inputs(2, queries, keys, seed=5)
    mask = jnp.asarray(mask)

    def run(query, key, value):
        with activation_sharding(make_mesh(), RULES):
            return attend_flash(query, key, value, mask, jnp.float32, causal)

    assert "shard_map" in str(jax.make_jaxpr(run)(query, key, value))
    expected, _ = attend_portable(query, key, value, mask, jnp.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(run)(query, key, value)), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("query_shape, key_shape, mask_shape, causal, applies", [
    ((2, 5, 4, 64), (2, 9, 4, 64), (2, 1, 1, 9), False, True),     # key mask
    ((2, 5, 4, 64), (2, 9, 4, 64), (1, 1, 1, 9), False, True),     # one key mask for every row
    ((2, 9, 4, 64), (2, 9, 4, 64), (2, 1, 9, 9), True, True),      # causal and key mask
    ((2, 5, 4, 256), (2, 9, 4, 256), None, False, True),           # head_dim a multiple of 128
    ((2, 9, 4, 64), (2, 9, 4, 64), (2, 1, 9, 9), False, False),    # a mask per query, not causal
    ((2, 5, 4, 64), (2, 9, 4, 64), (2, 1, 5, 9), True, False),     # causal needs as many queries as keys
    ((2, 5, 4, 64), (2, 9, 4, 64), (2, 4, 1, 9), False, False),    # a mask per head
    ((2, 5, 4, 64), (2, 9, 4, 64), (3, 1, 1, 9), False, False),    # another batch
    ((2, 5, 4, 192), (2, 9, 4, 192), None, False, False),          # head_dim over 128, not a multiple
])
def test_flash_applies_to_key_masks_and_causal_masks_only(query_shape, key_shape, mask_shape, causal, applies):
    assert flash_applies(query_shape, key_shape, mask_shape, causal) == applies


def test_flash_attention_rejects_what_it_cannot_take():
    query, key, value = inputs(2, 9, 9)
    with pytest.raises(ValueError, match="flash_applies"):
        attend_flash(query, key, value, jnp.ones((2, 1, 9, 9), bool), jnp.float32)


def test_other_masks_fall_back_to_the_fused_attention(monkeypatch):
    """`attend_tpu` with a mask the kernel cannot take runs `attend_fused`."""
    calls = []
    monkeypatch.setattr(kernels_attention, "attend_flash", lambda *args: calls.append(args))
    query, key, value = inputs(2, 9, 9)
    mask = jnp.asarray(np.random.default_rng(3).random((2, 1, 9, 9)) > 0.3).at[..., 0].set(True)
    output = attend_tpu(query, key, value, mask, jnp.float32)
    expected, _ = attend_portable(query, key, value, mask, jnp.float32)
    assert not calls, "a per-query mask reached the flash kernel"
    np.testing.assert_allclose(np.asarray(output), np.asarray(expected), atol=1e-6)


@pytest.mark.parametrize("case", ["head_mask", "weights", "dropout"])
def test_attention_layer_takes_the_flash_kernel_unless_probabilities_are_needed(monkeypatch, case):
    """Returned weights (output_attentions) and attention dropout need the probabilities: those
    calls run the portable einsum attention; a head mask scales outputs and keeps the kernel."""
    calls = []
    original = kernels_attention.attend_flash
    monkeypatch.setattr(kernels_attention, "attend_flash", lambda *args: calls.append(1) or original(*args))
    module = BartAttention(embed_dim=32, num_heads=2, dropout=0.5 if case == "dropout" else 0.0, kernels="tpu")
    hidden = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 32)), jnp.float32)
    mask = jnp.asarray(key_mask([6, 4], 6))
    params = module.init(jax.random.PRNGKey(0), hidden)
    head_mask = jnp.asarray([1.0, 0.5]) if case == "head_mask" else None
    output, weights, _ = module.apply(params, hidden, mask, layer_head_mask=head_mask,
                                      deterministic=case != "dropout", need_weights=case == "weights",
                                      rngs={"dropout": jax.random.PRNGKey(1)})
    assert bool(calls) == (case == "head_mask"), f"{case}: flash kernel used: {bool(calls)}"
    assert (weights is not None) == (case == "weights")
    if case == "head_mask":
        expected, _, _ = module.clone(kernels="portable").apply(params, hidden, mask, layer_head_mask=head_mask)
        np.testing.assert_allclose(np.asarray(output), np.asarray(expected), atol=1e-5,
                                   err_msg=f"{case}: the flash kernel differs from the portable attention")


TINY = dict(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=160)


def tiny_batch():
    rng = np.random.default_rng(4)
    input_ids = rng.integers(3, 64, (2, 140)).astype(np.int32)  # a source of two key blocks
    attention_mask = key_mask([140, 90], 140)[:, 0, 0].astype(np.int32)
    decoder_input_ids = rng.integers(3, 64, (2, 12)).astype(np.int32)
    decoder_attention_mask = key_mask([12, 7], 12)[:, 0, 0].astype(np.int32)
    return tuple(jnp.asarray(array) for array in (input_ids, attention_mask, decoder_input_ids,
                                                  decoder_attention_mask))


def test_model_with_tpu_kernels_equals_portable_in_training(monkeypatch):
    """A whole train-like pass (layer scan, rematerialisation) under kernels="tpu": every attention
    takes the flash kernel, decoder self-attention as causal and the others not, and the logits
    and gradients are the portable ones. Run by Pallas' plain interpreter (interpret=True): TPU
    interpret mode's callbacks are effects, which `jax.checkpoint` refuses."""
    seen = []
    original = kernels_attention.attend_flash
    monkeypatch.setattr(kernels_attention, "attend_flash",
                        lambda q, k, v, mask, dtype, causal=False: seen.append((q.shape[1], k.shape[1], causal))
                        or original(q, k, v, mask, dtype, causal))
    batch = tiny_batch()
    portable = BartForConditionalGeneration(BartConfig(**TINY), kernels="portable", scan_layers=True,
                                            remat_policy="full")
    params = jax.jit(portable.init)(jax.random.PRNGKey(0), *batch)["params"]

    def run(module):
        def loss(params):
            logits = module.apply({"params": params}, *batch).logits
            return jnp.sum(jnp.sin(logits)), logits
        return jax.jit(jax.grad(loss, has_aux=True))(params)

    expected_grads, expected = run(portable)
    with pltpu.force_tpu_interpret_mode(True):
        grads, logits = run(portable.clone(kernels="tpu"))
    # Encoder self-attention, decoder self-attention (causal), cross-attention.
    assert sorted(set(seen)) == [(12, 12, True), (12, 140, False), (140, 140, False)], seen
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5, rtol=1e-5,
                               err_msg="kernels='tpu' logits differ from kernels='portable' ones")
    for (path, leaf), reference in zip(jax.tree_util.tree_leaves_with_path(grads),
                                       jax.tree_util.tree_leaves(expected_grads)):
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(reference), atol=1e-4, rtol=1e-4,
                                   err_msg=f"gradient {jax.tree_util.keystr(path)} differs under kernels='tpu'")


def test_decoding_with_a_cache_keeps_the_portable_attention(monkeypatch):
    """Cached self-attention and precomputed cross-attention keys/values (generation) never take the
    flash kernel: a step attends a few queries, which the kernel would pad to a block. Traced only."""
    config = BartConfig(**TINY)
    module = BartForConditionalGeneration(config, kernels="tpu")
    input_ids, attention_mask = (jax.ShapeDtypeStruct((2, 8), jnp.int32) for _ in range(2))
    params = jax.eval_shape(lambda ids, mask: module.init(jax.random.PRNGKey(0), ids, mask, ids), input_ids,
                            attention_mask)["params"]

    def decode_step(params, input_ids, attention_mask):
        encoded = module.apply({"params": params}, input_ids, attention_mask, method="encode")
        cross = module.apply({"params": params}, encoded.last_hidden_state, method="project_cross_key_values")
        calls.clear()  # the encoder's attention takes the kernel; the step's must not
        cache = init_cache(config, 2, 8, 1, jnp.float32, "tpu")
        return module.apply({"params": params}, jnp.full((2, 1), 2, jnp.int32), cache, jnp.asarray(0), cross,
                            attention_mask, method="decode_step")

    calls = []
    original = kernels_attention.attend_flash
    monkeypatch.setattr(kernels_attention, "attend_flash", lambda *args: calls.append(args) or original(*args))
    logits, _ = jax.eval_shape(decode_step, params, input_ids, attention_mask)
    assert logits.shape[:2] == (2, 1) and not calls, "a decoding step reached the flash kernel"


def test_auto_lowers_to_the_pallas_kernel_for_tpu_only():
    """"auto" keeps the Pallas kernel (a `tpu_custom_call`) in a lowering for a TPU, the fused
    attention in one for a GPU or the CPU: no TPU or libtpu needed to lower."""
    shape = jax.ShapeDtypeStruct((2, 70, 2, 64), jnp.float32)
    mask = jax.ShapeDtypeStruct((2, 1, 1, 70), jnp.bool_)

    def run(query, key, value, mask):
        return attend_output(query, key, value, mask, jnp.float32, kernels="auto")

    with pltpu.force_tpu_interpret_mode(None):  # lowered for the hardware, not interpreted
        texts = {platform: jax.export.export(jax.jit(run), platforms=[platform])(shape, shape, shape,
                                                                                 mask).mlir_module()
                 for platform in ("tpu", "cuda", "cpu")}
    assert "tpu_custom_call" in texts["tpu"], "lowering for a TPU did not keep the Pallas kernel"
    assert not any("tpu_custom_call" in texts[platform] for platform in ("cuda", "cpu"))


def test_tpu_policy_dispatches_only_where_there_is_a_tpu_kernel():
    picked = dispatch("tpu", lambda: "cpu", lambda: "portable")
    assert picked == "portable" and dispatch("tpu", lambda: "cpu", lambda: "portable", tpu=lambda: "tpu") == "tpu"


def test_float32_kernel_products_run_at_full_precision():
    """Mosaic takes "highest" or its default; a user's fast setting falls back to the default."""
    assert kernel_precision(jnp.float32) == "highest" and kernel_precision(jnp.bfloat16) == "default"
    with jax.default_matmul_precision("tensorfloat32"):
        assert kernel_precision(jnp.float32) == "default"
    with jax.default_matmul_precision("float32"):
        assert kernel_precision(jnp.float32) == "highest"
