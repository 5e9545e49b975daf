"""int8 inference (bart_jax/model/quantization.py, kernels/quantized_linear.py): error against
float32 on a tiny random-weight model, generation, the layers option, saving and loading."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hf_reference import hf_model, random_batch, save_hf_model, tiny_flax_model

from bart_jax import load_pretrained
from bart_jax.checkpoints.conversion import cast_params, stack_layers
from bart_jax.generation import generate
from bart_jax.model import quantization
from bart_jax.model.kernels.linear import project, vocabulary_product
from bart_jax.model.kernels.quantized_linear import QuantizedWeight, quantize_weight

HEAD = "BartForConditionalGeneration"


def _logits(module, params, input_ids, attention_mask):
    return np.asarray(jax.jit(lambda p: module.apply({"params": p}, input_ids=input_ids,
                                                     attention_mask=attention_mask).logits)(params))


def _relative_error(value, reference):
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


@pytest.fixture(scope="module")
def tiny():
    module, params = tiny_flax_model(HEAD)
    input_ids, attention_mask = random_batch(module.config.vocab_size)
    return module, params, input_ids, attention_mask, _logits(module, params, input_ids, attention_mask)


@pytest.mark.parametrize("mode", ["int8", "int8-weights"])
def test_quantized_logits_stay_close_to_float32(tiny, mode):
    module, params, input_ids, attention_mask, reference = tiny
    quantized = quantization.quantize_params(params, mode)
    logits = _logits(module, quantized, input_ids, attention_mask)
    # Per-channel int8 weights: about 1% relative error on this model (docs/performance.md).
    assert _relative_error(logits, reference) < 0.03
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.95
    assert quantization.quantization_of(quantized) == {"quantize": mode, "quantize_layers": ["linear", "vocabulary"]}


@pytest.mark.parametrize("num_beams", [1, 3])
def test_quantized_generation_agrees_with_float32(tiny, num_beams):
    module, params, input_ids, attention_mask, _ = tiny
    quantized = quantization.quantize_params(params, "int8")
    expected = np.asarray(generate(module, params, input_ids, attention_mask, num_beams=num_beams,
                                   max_new_tokens=8))
    ids = np.asarray(generate(module, quantized, input_ids, attention_mask, num_beams=num_beams, max_new_tokens=8))
    assert ids.shape == expected.shape
    assert (ids == expected).mean() >= 0.9


@pytest.mark.parametrize("activations", ["int8", "float"])
@pytest.mark.parametrize("rows", [(3,), (2, 5)])
def test_quantized_products_agree_across_kernels(activations, rows):
    inputs = jax.random.normal(jax.random.PRNGKey(0), (*rows, 24))
    weight = quantize_weight(jax.random.normal(jax.random.PRNGKey(1), (40, 24)), activations)
    bias = jnp.arange(40, dtype=jnp.float32)
    float_weight = np.asarray(quantization.dequantize_params(weight))
    for product in (lambda k: project(inputs, weight, bias, jnp.float32, k),
                    lambda k: vocabulary_product(inputs, weight, jnp.float32, k) + bias):
        portable, cpu = np.asarray(product("portable")), np.asarray(product("cpu"))
        assert portable.shape == (*rows, 40)
        np.testing.assert_allclose(cpu, portable, rtol=1e-5, atol=1e-4)
        # Against the dequantized weight: exact for weight-only, the inputs' rounding for int8.
        expected = np.asarray(inputs) @ float_weight.T + np.asarray(bias)
        np.testing.assert_allclose(portable, expected, atol=1e-4 if activations == "float" else 0.15)


def test_quantized_models_agree_across_kernels(tiny):
    module, params, input_ids, attention_mask, _ = tiny
    quantized = quantization.quantize_params(params, "int8")
    portable = _logits(module.clone(kernels="portable"), quantized, input_ids, attention_mask)
    cpu = _logits(module.clone(kernels="cpu"), quantized, input_ids, attention_mask)
    # Not closer: the formulations' float differences can flip an input's int8 rounding.
    assert _relative_error(cpu, portable) < 5e-3


@pytest.mark.parametrize("layers, quantized_names, float_names", [
    (("linear",), ["fc1"], ["shared"]),
    (("vocabulary",), ["shared"], ["fc1", "q_proj"]),
])
def test_layers_option_picks_the_weights(tiny, layers, quantized_names, float_names):
    module, params, input_ids, attention_mask, reference = tiny
    quantized = quantization.quantize_params(params, "int8", layers)
    kinds = {}  # module name -> whether its weights (or embedding tables) are int8, over all layers
    for path, leaf in traverse_util.flatten_dict(quantized).items():
        if len(path) > 1 and path[-1] in ("weight", "embedding", "scale"):
            kinds.setdefault(path[-2], set()).add(isinstance(leaf, QuantizedWeight))
    assert all(kinds[name] == {True} for name in quantized_names), kinds
    assert all(kinds[name] == {False} for name in float_names), kinds
    # Position embeddings and LayerNorms always stay float.
    assert kinds["embed_positions"] == {False} and kinds["layernorm_embedding"] == {False}
    assert quantization.quantization_of(quantized)["quantize_layers"] == list(layers)
    assert _relative_error(_logits(module, quantized, input_ids, attention_mask), reference) < 0.03


def test_stacked_layers_quantize_per_layer(tiny):
    module, params, input_ids, attention_mask, reference = tiny
    stacked = quantization.quantize_params(stack_layers(params), "int8")
    fc1 = stacked["model"]["encoder"]["layers"]["fc1"]["weight"]
    assert fc1.array.qvalue.dtype == jnp.int8 and fc1.array.scale.shape == (1, 37, 1)
    logits = _logits(module.clone(scan_layers=True), stacked, input_ids, attention_mask)
    assert _relative_error(logits, reference) < 0.03


@pytest.mark.parametrize("call, message", [
    (lambda p: quantization.quantize_params(p, "int4"), "quantize must be one of"),
    (lambda p: quantization.quantize_params(p, "int8", ("attention",)), "non-empty subset"),
    (lambda p: quantization.quantize_params(p, "int8", ()), "non-empty subset"),
    (lambda p: quantization.check_quantize(None, ("linear",)), "quantize_layers needs quantize"),
    (lambda p: quantization.quantize_params(quantization.quantize_params(p, "int8"), "int8"), "already quantized"),
    (lambda p: quantize_weight(jnp.ones((2, 3, 4))), "2-D"),
    (lambda p: quantize_weight(jnp.ones((2, 3)), "int4"), "activations must be"),
    (lambda p: quantization.weight_from_arrays("fc1/weight", np.ones((2, 3), np.int8), None, "int8"), "no scale"),
    (lambda p: quantization.weight_from_arrays("fc1/weight", np.ones((2, 3), np.float32), np.ones((2, 1), np.float32),
                                               "int8"), "must be int8"),
])
def test_bad_settings_raise_value_error(tiny, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny[1])


def test_cast_params_keeps_int8_weights_and_float32_scales(tiny):
    cast = cast_params(quantization.quantize_params(tiny[1], "int8"), jnp.bfloat16)
    fc1 = cast["model"]["encoder"]["layers_0"]["fc1"]
    assert fc1["weight"].array.qvalue.dtype == jnp.int8 and fc1["weight"].array.scale.dtype == jnp.float32
    assert fc1["bias"].dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory):
    return save_hf_model(hf_model(HEAD, seed=3, encoder_layers=1, decoder_layers=1),
                         tmp_path_factory.mktemp("hf") / "model")


def test_quantized_model_saves_and_loads_with_its_metadata(hf_directory, tmp_path):
    model = load_pretrained(hf_directory, quantize="int8", quantize_layers=("linear",))
    input_ids, attention_mask = random_batch(model.config.vocab_size, seed=4)
    logits = np.asarray(model(input_ids=input_ids, attention_mask=attention_mask).logits)
    ids = np.asarray(model.generate(input_ids, attention_mask, num_beams=2, max_new_tokens=6))

    model.save_pretrained(tmp_path / "int8")
    marker = json.loads((tmp_path / "int8" / "bart_jax.json").read_text())
    assert marker["quantize"] == "int8" and marker["quantize_layers"] == ["linear"]
    assert marker["dtype"] == "float32"
    loaded = load_pretrained(tmp_path / "int8")
    assert quantization.quantization_of(loaded.params) == {"quantize": "int8", "quantize_layers": ["linear"]}
    fc1 = loaded.params["model"]["decoder"]["layers_0"]["fc1"]["weight"]
    assert isinstance(fc1, QuantizedWeight) and fc1.array.qvalue.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(loaded(input_ids=input_ids, attention_mask=attention_mask).logits),
                                  logits)
    np.testing.assert_array_equal(np.asarray(loaded.generate(input_ids, attention_mask, num_beams=2,
                                                             max_new_tokens=6)), ids)
    # The same settings load; others, a head change and a Hugging Face export are refused.
    load_pretrained(tmp_path / "int8", quantize="int8", quantize_layers=["linear"])
    with pytest.raises(ValueError, match="quantized as"):
        load_pretrained(tmp_path / "int8", quantize="int8-weights")
    with pytest.raises(ValueError, match="load it as"):
        load_pretrained(tmp_path / "int8", head="BartModel")
    with pytest.raises(ValueError, match="converted format"):
        loaded.save_hf(tmp_path / "hf")
