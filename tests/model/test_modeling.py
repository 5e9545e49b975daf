"""Parity of the five Flax heads with transformers (PyTorch) on perturbed random weights, under
both kernel policies (bart_jax/model/kernels/): the portable one that accelerators run and the
CPU one.

Tolerance: max abs difference <= 1e-4 in float32 on every output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import HEADS, hf_model, random_batch

from bart_jax.checkpoints.conversion import hf_to_flax
from bart_jax.config import BartConfig
from bart_jax.model import heads
from bart_jax.model.kernels.attention import attends_per_example

ATOL = 1e-4

CONFIGS = {
    "gelu": {},
    "relu-scaled-deep-decoder": dict(
        scale_embedding=True, activation_function="relu", encoder_layers=1, decoder_layers=3,
        encoder_attention_heads=2, decoder_attention_heads=8, encoder_ffn_dim=16, decoder_ffn_dim=48,
    ),
    "silu-odd-vocab": dict(activation_function="silu", vocab_size=131, d_model=24, encoder_attention_heads=3,
                           decoder_attention_heads=6),
    "gelu_new-untied": dict(activation_function="gelu_new", scale_embedding=True, tie_word_embeddings=False),
}
# Long enough (>= kernels.attention.PER_EXAMPLE_MIN_QUERIES) for the CPU kernels to attend example by example.
LONG_CONFIG = {"long-inputs": dict(max_position_embeddings=300)}


def assert_close(name, reference, ours, atol=ATOL):
    reference = reference.detach().numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference)
    ours = np.asarray(ours, dtype=np.float32)
    assert reference.shape == ours.shape, f"{name}: shape {ours.shape}, transformers {reference.shape}"
    difference = np.abs(reference - ours)
    worst = np.unravel_index(np.argmax(difference), difference.shape) if difference.size else ()
    assert difference.max(initial=0.0) <= atol, (
        f"{name}: max abs difference {difference.max():.3g} > {atol} at {worst} "
        f"(ours {ours[worst]:.6g}, transformers {reference[worst]:.6g})"
    )


def assert_tuple_close(name, reference, ours, atol=ATOL):
    assert ours is not None, f"{name}: not returned"
    assert len(reference) == len(ours), f"{name}: {len(ours)} entries, transformers {len(reference)}"
    for index, (ref, our) in enumerate(zip(reference, ours)):
        assert_close(f"{name}[{index}]", ref, our, atol)


KERNELS = ("portable", "cpu")


@functools.lru_cache(maxsize=None)
def converted(head: str, config_name: str, seed: int = 0, kernels: str = "auto"):
    """(transformers model, our config, our module, our params) for a head and config."""
    model = hf_model(head, seed=seed, **{**CONFIGS, **LONG_CONFIG}[config_name])
    config = BartConfig.from_dict(model.config.to_dict())
    state = {key: value.detach().numpy() for key, value in model.state_dict().items()}
    params = hf_to_flax(state, config, head)
    return model, config, heads.head_class(head)(config, kernels=kernels), jax.tree_util.tree_map(jnp.asarray, params)


def run_both(head, config_name, torch_inputs, flax_inputs=None, kernels="auto", **flags):
    model, config, module, params = converted(head, config_name, kernels=kernels)
    # transformers sizes BartForCausalLM's cache by encoder_layers (num_hidden_layers), which
    # breaks when the decoder is deeper; no cache is needed for a full forward pass.
    torch_flags = dict(flags, use_cache=False) if head == "BartForCausalLM" else flags
    with torch.no_grad():
        reference = model(**{k: torch.as_tensor(v) for k, v in torch_inputs.items()}, **torch_flags)
    flax_inputs = torch_inputs if flax_inputs is None else flax_inputs
    ours = module.apply({"params": params}, **{k: jnp.asarray(v) for k, v in flax_inputs.items()}, **flags)
    return reference, ours


def head_inputs(head: str, config: BartConfig, seed: int = 0) -> dict:
    input_ids, attention_mask = random_batch(config.vocab_size, seed=seed)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    rng = np.random.default_rng(seed + 1)
    if head == "BartForConditionalGeneration":
        labels = rng.integers(0, config.vocab_size, size=(3, 7))
        labels[0, 5:] = -100
        inputs["labels"] = labels
    elif head == "BartForSequenceClassification":
        inputs["labels"] = rng.integers(0, config.num_labels, size=(3,))
    elif head == "BartForQuestionAnswering":
        # One position beyond the input: transformers clamps it and ignores it.
        inputs["start_positions"] = np.array([1, 3, 40])
        inputs["end_positions"] = np.array([2, 9, 0])
    elif head == "BartForCausalLM":
        labels = rng.integers(0, config.vocab_size, size=input_ids.shape)
        labels[attention_mask == 0] = -100
        inputs["labels"] = labels
    return inputs


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("head", HEADS)
def test_head_matches_transformers(head, config_name, kernels):
    _, config, _, _ = converted(head, config_name)
    inputs = head_inputs(head, config)
    reference, ours = run_both(head, config_name, inputs, kernels=kernels, output_hidden_states=True,
                               output_attentions=True)

    for name in ("loss", "logits", "start_logits", "end_logits", "last_hidden_state", "encoder_last_hidden_state"):
        ref = getattr(reference, name, None)
        if ref is not None:
            assert_close(name, ref, getattr(ours, name))
    tuples = ("encoder_hidden_states", "encoder_attentions", "decoder_hidden_states", "decoder_attentions",
              "cross_attentions", "hidden_states", "attentions")
    for name in tuples:
        ref = getattr(reference, name, None)
        if ref:  # transformers gives () for cross_attentions of a decoder-only call
            assert_tuple_close(name, ref, getattr(ours, name))
    compared = [name for name in tuples if getattr(reference, name, None)]
    assert len(compared) >= (2 if head == "BartForCausalLM" else 5), f"too few optional outputs compared: {compared}"


@pytest.mark.parametrize("kernels", KERNELS)
def test_long_inputs_match_transformers(kernels):
    """Encoder, decoder and cross-attention over >= 256 queries per example: the CPU kernels'
    per-example path."""
    head = "BartForConditionalGeneration"
    _, config, _, _ = converted(head, "long-inputs")
    input_ids, attention_mask = random_batch(config.vocab_size, batch=3, length=290, seed=21)
    decoder_input_ids, decoder_attention_mask = random_batch(config.vocab_size, batch=3, length=260, seed=22)
    assert attends_per_example(3, 260), "inputs too short to exercise the per-example path"
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                  decoder_attention_mask=decoder_attention_mask)
    reference, ours = run_both(head, "long-inputs", inputs, kernels=kernels, output_attentions=True)
    assert_close("logits", reference.logits, ours.logits)
    assert_close("encoder_last_hidden_state", reference.encoder_last_hidden_state, ours.encoder_last_hidden_state)
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        assert_tuple_close(name, getattr(reference, name), getattr(ours, name))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("config_name", ["gelu", "long-inputs"])
def test_gradients_match_transformers(config_name, kernels):
    """d loss / d every parameter, against PyTorch's backward pass (long inputs: the CPU kernels'
    per-example attention)."""
    head = "BartForConditionalGeneration"
    model, config, module, params = converted(head, config_name, kernels=kernels)
    if config_name == "long-inputs":
        input_ids, attention_mask = random_batch(config.vocab_size, batch=2, length=290, seed=4)
        labels = np.random.default_rng(4).integers(0, config.vocab_size, size=(2, 270))
        assert attends_per_example(2, 290), "inputs too short to exercise the per-example path"
    else:
        inputs = head_inputs(head, config)
        input_ids, attention_mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]

    model.zero_grad()
    model(input_ids=torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask),
          labels=torch.as_tensor(labels)).loss.backward()
    # Tied tensors share one .grad; buffers (final_logits_bias) have none and get no gradient here either.
    torch_grads = {name: np.zeros(tensor.shape, np.float32) if tensor.grad is None else tensor.grad.numpy()
                   for name, tensor in model.state_dict(keep_vars=True).items()}
    expected = hf_to_flax(torch_grads, config, head)

    def loss(p):
        return module.apply({"params": p}, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                            labels=jnp.asarray(labels)).loss

    ours = jax.grad(loss)(params)
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    for path, gradient in jax.tree_util.tree_flatten_with_path(ours)[0]:
        assert_close(f"d loss / d {jax.tree_util.keystr(path)}", flat_expected[path], gradient, atol=1e-5)


def test_conditional_generation_without_labels_shifts_input_ids():
    _, config, _, _ = converted("BartForConditionalGeneration", "gelu")
    input_ids, attention_mask = random_batch(config.vocab_size, seed=3)
    reference, ours = run_both("BartForConditionalGeneration", "gelu",
                               {"input_ids": input_ids, "attention_mask": attention_mask})
    assert_close("logits", reference.logits, ours.logits)


def test_decoder_attention_mask_and_explicit_decoder_inputs():
    _, config, _, _ = converted("BartForConditionalGeneration", "gelu")
    input_ids, attention_mask = random_batch(config.vocab_size, seed=4)
    decoder_input_ids, decoder_attention_mask = random_batch(config.vocab_size, length=6, seed=5)
    decoder_input_ids[:, 0] = config.decoder_start_token_id
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                  decoder_attention_mask=decoder_attention_mask)
    reference, ours = run_both("BartForConditionalGeneration", "gelu", inputs)
    assert_close("logits", reference.logits, ours.logits)


def test_inputs_embeds_match_transformers():
    model, config, _, params = converted("BartForConditionalGeneration", "relu-scaled-deep-decoder")
    input_ids, attention_mask = random_batch(config.vocab_size, seed=6)
    decoder_input_ids = input_ids[:, :5]
    rng = np.random.default_rng(0)
    inputs_embeds = rng.normal(size=input_ids.shape + (config.d_model,)).astype(np.float32)
    decoder_inputs_embeds = rng.normal(size=decoder_input_ids.shape + (config.d_model,)).astype(np.float32)
    inputs = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                  decoder_inputs_embeds=decoder_inputs_embeds)
    reference, ours = run_both("BartForConditionalGeneration", "relu-scaled-deep-decoder", inputs)
    assert_close("logits", reference.logits, ours.logits)


@pytest.mark.parametrize(
    "problem_type, num_labels, make_labels",
    [
        ("regression", 1, lambda rng: rng.normal(size=(3,)).astype(np.float32)),
        ("single_label_classification", 4, lambda rng: rng.integers(0, 4, size=(3,))),
        ("multi_label_classification", 4, lambda rng: (rng.random(size=(3, 4)) > 0.5).astype(np.float32)),
    ],
)
def test_classification_losses_match_transformers(problem_type, num_labels, make_labels):
    model = hf_model("BartForSequenceClassification", num_labels=num_labels)
    config = BartConfig.from_dict(model.config.to_dict())
    params = hf_to_flax({k: v.numpy() for k, v in model.state_dict().items()}, config, "BartForSequenceClassification")
    input_ids, attention_mask = random_batch(config.vocab_size, seed=7)
    labels = make_labels(np.random.default_rng(1))
    with torch.no_grad():
        reference = model(input_ids=torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask),
                          labels=torch.as_tensor(labels))
    assert model.config.problem_type == problem_type
    ours = heads.BartForSequenceClassification(config).apply(
        {"params": params}, jnp.asarray(input_ids), jnp.asarray(attention_mask), labels=jnp.asarray(labels)
    )
    assert_close(f"{problem_type} loss", reference.loss, ours.loss)
    assert_close(f"{problem_type} logits", reference.logits, ours.logits)


def test_classification_pools_last_eos_under_jit():
    model, config, module, params = converted("BartForSequenceClassification", "gelu")
    input_ids, attention_mask = random_batch(config.vocab_size, seed=8)
    input_ids[:, 3] = config.eos_token_id  # a second EOS in every row: the last one must be pooled
    apply = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask, output_hidden_states=True))
    ours = apply(params, jnp.asarray(input_ids), jnp.asarray(attention_mask))
    with torch.no_grad():
        reference = model(input_ids=torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask))
    assert_close("logits (two EOS per row, jit)", reference.logits, ours.logits)

    # Rows with different EOS counts (transformers refuses them): still the last EOS of each row.
    input_ids[0, 5] = config.eos_token_id
    ours = apply(params, jnp.asarray(input_ids), jnp.asarray(attention_mask))
    last_hidden = ours.decoder_hidden_states[-1]
    expected_positions = [max(np.nonzero(row == config.eos_token_id)[0]) for row in input_ids]
    pooled = last_hidden[np.arange(3), np.array(expected_positions)]
    head = heads.BartClassificationHead(config)
    expected = head.apply({"params": params["classification_head"]}, pooled)
    np.testing.assert_allclose(np.asarray(ours.logits), np.asarray(expected), atol=1e-6,
                               err_msg="classification did not pool the last EOS of each row under jit")


def test_causal_lm_cross_attention_matches_transformers():
    model, config, module, params = converted("BartForCausalLM", "gelu")
    input_ids, attention_mask = random_batch(config.vocab_size, length=6, seed=9)
    rng = np.random.default_rng(2)
    encoder_hidden_states = rng.normal(size=(3, 8, config.d_model)).astype(np.float32)
    encoder_attention_mask = np.ones((3, 8), dtype=np.int64)
    encoder_attention_mask[1, 5:] = 0
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                  encoder_attention_mask=encoder_attention_mask)
    reference, ours = run_both("BartForCausalLM", "gelu", inputs, output_attentions=True)
    assert_close("logits", reference.logits, ours.logits)
    assert_tuple_close("cross_attentions", reference.cross_attentions, ours.cross_attentions)


def test_shift_tokens_right_matches_transformers():
    from transformers.models.bart.modeling_bart import shift_tokens_right as reference_shift

    labels = np.array([[5, 6, -100, -100], [7, 8, 9, 2]])
    expected = reference_shift(torch.as_tensor(labels), 1, 2).numpy()
    np.testing.assert_array_equal(np.asarray(heads.shift_tokens_right(jnp.asarray(labels), 1, 2)), expected)


def _encoder_output(module, params, inputs, **kwargs):
    return module.apply({"params": params}, **inputs, **kwargs).encoder_last_hidden_state


def test_head_mask_of_ones_changes_nothing():
    _, config, module, params = converted("BartModel", "gelu")
    input_ids, attention_mask = random_batch(config.vocab_size, seed=10)
    inputs = dict(input_ids=jnp.asarray(input_ids), attention_mask=jnp.asarray(attention_mask))
    plain = module.apply({"params": params}, **inputs)
    ones = module.apply(
        {"params": params}, **inputs,
        head_mask=jnp.ones((config.encoder_layers, config.encoder_attention_heads)),
        decoder_head_mask=jnp.ones((config.decoder_layers, config.decoder_attention_heads)),
        cross_attn_head_mask=jnp.ones((config.decoder_layers, config.decoder_attention_heads)),
    )
    np.testing.assert_array_equal(np.asarray(plain.last_hidden_state), np.asarray(ones.last_hidden_state))


@pytest.mark.parametrize("mask_name, attention_path", [
    ("head_mask", ("encoder", "layers_1", "self_attn")),
    ("decoder_head_mask", ("decoder", "layers_0", "self_attn")),
    ("cross_attn_head_mask", ("decoder", "layers_1", "encoder_attn")),
])
def test_head_mask_equals_removing_the_head(mask_name, attention_path):
    """Masking head h of a layer is the same as zeroing its input columns of that layer's out_proj."""
    _, config, module, params = converted("BartModel", "gelu")
    input_ids, attention_mask = random_batch(config.vocab_size, seed=11)
    inputs = dict(input_ids=jnp.asarray(input_ids), attention_mask=jnp.asarray(attention_mask))
    layer = int(attention_path[1].split("_")[1])
    head, head_dim = 2, config.d_model // config.encoder_attention_heads
    layers = config.encoder_layers if mask_name == "head_mask" else config.decoder_layers
    mask = np.ones((layers, config.encoder_attention_heads), np.float32)
    mask[layer, head] = 0.0
    masked = module.apply({"params": params}, **inputs, **{mask_name: jnp.asarray(mask)}, output_attentions=True)

    pruned = jax.tree_util.tree_map(np.array, params)
    out_proj = pruned
    for key in attention_path + ("out_proj",):
        out_proj = out_proj[key]
    out_proj["weight"][:, head * head_dim:(head + 1) * head_dim] = 0.0  # [out, in]: the head's input columns
    expected = module.apply({"params": pruned}, **inputs)
    np.testing.assert_allclose(np.asarray(masked.last_hidden_state), np.asarray(expected.last_hidden_state),
                               atol=1e-5, err_msg=f"{mask_name} did not silence head {head} of layer {layer}")
    weights_name = {"head_mask": "encoder_attentions", "decoder_head_mask": "decoder_attentions",
                    "cross_attn_head_mask": "cross_attentions"}[mask_name]
    assert float(jnp.abs(getattr(masked, weights_name)[layer][:, head]).max()) == 0.0


def test_dropout_is_driven_by_the_rng_and_off_when_deterministic():
    model = hf_model("BartForConditionalGeneration", dropout=0.3, attention_dropout=0.2, activation_dropout=0.1)
    config = BartConfig.from_dict(model.config.to_dict())
    params = hf_to_flax({k: v.numpy() for k, v in model.state_dict().items()}, config, "BartForConditionalGeneration")
    module = heads.BartForConditionalGeneration(config)
    input_ids, attention_mask = random_batch(config.vocab_size, seed=12)

    @jax.jit
    def train_logits(key):
        return module.apply({"params": params}, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                            deterministic=False, rngs={"dropout": key}).logits

    first, again, other = train_logits(jax.random.PRNGKey(0)), train_logits(jax.random.PRNGKey(0)), train_logits(
        jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert float(jnp.abs(first - other).max()) > 1e-3, "different dropout keys gave the same output"
    with torch.no_grad():
        reference = model(input_ids=torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask))
    evaluation = module.apply({"params": params}, jnp.asarray(input_ids), jnp.asarray(attention_mask))
    assert_close("deterministic logits", reference.logits, evaluation.logits)
    assert float(jnp.abs(first - evaluation.logits).max()) > 1e-3, "dropout had no effect"


def test_layerdrop_is_a_traced_random_draw():
    _, config, _, params = converted("BartModel", "gelu")
    input_ids, attention_mask = random_batch(config.vocab_size, seed=13)
    inputs = (jnp.asarray(input_ids), jnp.asarray(attention_mask))

    def encoder_states(layerdrop, key):
        module = heads.BartModel(config.replace(encoder_layerdrop=layerdrop, decoder_layerdrop=layerdrop, dropout=0.0))
        return module.apply({"params": params}, *inputs, deterministic=False, rngs={"dropout": key},
                            output_hidden_states=True)

    dropped_all = jax.jit(functools.partial(encoder_states, 1.0))(jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(dropped_all.encoder_last_hidden_state),
                               np.asarray(dropped_all.encoder_hidden_states[0]), atol=0,
                               err_msg="layerdrop=1 must skip every encoder layer")
    kept_all = encoder_states(0.0, jax.random.PRNGKey(0))
    plain = heads.BartModel(config).apply({"params": params}, *inputs)
    np.testing.assert_allclose(np.asarray(kept_all.last_hidden_state), np.asarray(plain.last_hidden_state), atol=1e-6)

    half = jax.jit(functools.partial(encoder_states, 0.5))
    outputs = {np.asarray(half(jax.random.PRNGKey(seed)).encoder_last_hidden_state).tobytes() for seed in range(8)}
    assert len(outputs) > 1, "layerdrop=0.5 gave the same encoder output for 8 different keys"


def test_bfloat16_compute_stays_close_to_float32():
    """bf16 activations with float32 softmax/LayerNorm: measured max abs logit difference ~2e-2 here."""
    _, config, module, params = converted("BartForConditionalGeneration", "gelu")
    input_ids, attention_mask = random_batch(config.vocab_size, seed=14)
    inputs = (jnp.asarray(input_ids), jnp.asarray(attention_mask))
    full = module.apply({"params": params}, *inputs).logits
    bf16_module = heads.BartForConditionalGeneration(config, dtype=jnp.bfloat16)
    half = bf16_module.apply({"params": params}, *inputs).logits
    assert half.dtype == jnp.bfloat16
    difference = float(jnp.abs(half.astype(jnp.float32) - full).max())
    assert difference < 0.1, f"bf16 logits differ from float32 by {difference}"
    bf16_params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    half_params = heads.BartForConditionalGeneration(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply(
        {"params": bf16_params}, *inputs).logits
    difference = float(jnp.abs(half_params.astype(jnp.float32) - full).max())
    assert difference < 0.15, f"bf16 params and compute differ from float32 by {difference}"


@pytest.mark.parametrize("config_name", ["gelu", "gelu_new-untied"])
def test_init_creates_exactly_the_converted_tree(config_name):
    for head in HEADS:
        _, config, module, params = converted(head, config_name)
        input_ids, _ = random_batch(config.vocab_size)
        shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.asarray(input_ids)))["params"]
        expected = jax.tree_util.tree_map(lambda x: x.shape, params)
        assert jax.tree_util.tree_map(lambda x: x.shape, shapes) == expected, f"{head}: init tree differs"
