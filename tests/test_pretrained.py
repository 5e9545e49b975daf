"""`load_pretrained`: HF and converted directories, heads, input validation at the boundary."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import hf_model, random_batch, save_hf_model

from bart_jax import BartForConditionalGeneration, load_pretrained
from bart_jax.checkpoints.files import convert_hf_directory
from bart_jax.model.kernels import for_platform
from bart_jax.model.parameters import weights_in_compute_dtype


@pytest.fixture(scope="module")
def generation_dir(tmp_path_factory, tokenizer_dir):
    model = hf_model("BartForConditionalGeneration", seed=1)
    directory = save_hf_model(model, tmp_path_factory.mktemp("hf") / "model")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return model, directory


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    model = hf_model("BartForSequenceClassification", seed=2)
    return model, save_hf_model(model, tmp_path_factory.mktemp("hf") / "classifier")


def torch_logits(model, **inputs):
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in inputs.items()}).logits.numpy()


def test_hf_directory_loads_with_head_from_architectures(generation_dir):
    model, directory = generation_dir
    pretrained = load_pretrained(directory)
    assert pretrained.head == "BartForConditionalGeneration"
    assert pretrained.tokenizer is not None and pretrained.tokenizer.encode("Hello world") == [0, 31414, 232, 2]
    assert pretrained.generation_config is not None
    input_ids, attention_mask = random_batch(pretrained.config.vocab_size)
    output = pretrained(input_ids=input_ids, attention_mask=attention_mask)
    np.testing.assert_allclose(np.asarray(output.logits), torch_logits(model, input_ids=input_ids,
                                                                     attention_mask=attention_mask), atol=1e-4)


def test_converted_directory_loads_the_same_and_can_change_head(generation_dir, tmp_path):
    model, directory = generation_dir
    convert_hf_directory(directory, tmp_path / "converted")
    pretrained = load_pretrained(tmp_path / "converted")
    assert pretrained.tokenizer is not None, "tokenizer files were not carried into the converted directory"
    input_ids, attention_mask = random_batch(pretrained.config.vocab_size, seed=5)
    output = pretrained(input_ids=input_ids, attention_mask=attention_mask)
    np.testing.assert_allclose(np.asarray(output.logits), torch_logits(model, input_ids=input_ids,
                                                                     attention_mask=attention_mask), atol=1e-4)
    bare = load_pretrained(tmp_path / "converted", head="BartModel", strict=False)
    hidden = bare(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    with torch.no_grad():
        expected = model.model(input_ids=torch.as_tensor(input_ids),
                               attention_mask=torch.as_tensor(attention_mask)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(hidden), expected, atol=1e-4)


def test_bfloat16_load_runs_and_stays_close(generation_dir):
    model, directory = generation_dir
    pretrained = load_pretrained(directory, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert jax.tree_util.tree_leaves(pretrained.params)[0].dtype == jnp.bfloat16
    input_ids, attention_mask = random_batch(pretrained.config.vocab_size, seed=6)
    logits = np.asarray(pretrained(input_ids=input_ids, attention_mask=attention_mask).logits, np.float32)
    reference = torch_logits(model, input_ids=input_ids, attention_mask=attention_mask)
    assert np.abs(logits - reference).max() < 0.15


def test_bfloat16_computation_keeps_its_weights_in_bfloat16_with_the_same_results(generation_dir):
    # param_dtype None (the default): weights the computation casts to bfloat16 are stored so, the
    # rest float32; outputs and generated ids equal those of float32 parameters.
    _, directory = generation_dir
    stored = load_pretrained(directory, dtype=jnp.bfloat16)
    full = load_pretrained(directory, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    dtypes = {"/".join(str(getattr(key, "key", key)) for key in path): leaf.dtype
              for path, leaf in jax.tree_util.tree_leaves_with_path(stored.params)}
    wrong = {name: dtype for name, dtype in dtypes.items()
             if dtype != (jnp.bfloat16 if name.rsplit("/", 1)[-1] in ("weight", "embedding") else jnp.float32)}
    assert not wrong, f"parameters stored in the wrong dtype: {wrong}"
    recast = weights_in_compute_dtype(full.params, jnp.bfloat16)
    same = jax.tree.map(lambda a, b: a.dtype == b.dtype and bool(jnp.array_equal(a, b)), recast, stored.params)
    assert all(jax.tree_util.tree_leaves(same)), "weights_in_compute_dtype differs from the loaded bfloat16 weights"
    input_ids, attention_mask = random_batch(stored.config.vocab_size, seed=6)
    for kernels in ("cpu", "portable"):
        logits = [np.asarray(dataclasses.replace(model, module=model.module.clone(kernels=kernels))(
            input_ids=input_ids, attention_mask=attention_mask).logits, np.float32) for model in (stored, full)]
        assert np.array_equal(*logits), f"kernels={kernels}: max difference {np.abs(logits[0] - logits[1]).max()}"
    ids = [np.asarray(model.generate(input_ids, attention_mask, num_beams=2, max_new_tokens=8)) for model in (stored, full)]
    assert np.array_equal(*ids), f"generated ids differ:\n{ids[0]}\n{ids[1]}"


def test_training_mode_uses_the_dropout_rng(generation_dir):
    _, directory = generation_dir
    pretrained = load_pretrained(directory)
    config = pretrained.config.replace(dropout=0.3)
    pretrained = dataclasses.replace(pretrained, config=config, module=BartForConditionalGeneration(config))
    input_ids, attention_mask = random_batch(pretrained.config.vocab_size, seed=7)
    evaluation = pretrained(input_ids=input_ids, attention_mask=attention_mask).logits
    training = pretrained(input_ids=input_ids, attention_mask=attention_mask, dropout_rng=jax.random.PRNGKey(0)).logits
    assert float(jnp.abs(training - evaluation).max()) > 1e-4, "dropout_rng did not switch on dropout"


def test_classifier_loads_and_validates_eos(classifier_dir):
    model, directory = classifier_dir
    pretrained = load_pretrained(directory)
    assert pretrained.head == "BartForSequenceClassification"
    input_ids, attention_mask = random_batch(pretrained.config.vocab_size, seed=8)
    logits = pretrained(input_ids=input_ids, attention_mask=attention_mask).logits
    np.testing.assert_allclose(np.asarray(logits), torch_logits(model, input_ids=input_ids,
                                                                 attention_mask=attention_mask), atol=1e-4)
    no_eos = np.where(input_ids == 2, 5, input_ids)
    with pytest.raises(ValueError, match="rows \\[0, 1, 2\\] have none"):
        pretrained(input_ids=no_eos)
    uneven = input_ids.copy()
    uneven[0, 2] = 2
    with pytest.raises(ValueError, match="same number of EOS"):
        pretrained(input_ids=uneven)


def test_missing_head_weights_are_an_error_not_a_random_init(generation_dir):
    _, directory = generation_dir
    with pytest.raises(ValueError, match="no weights for the BartForSequenceClassification head"):
        load_pretrained(directory, head="BartForSequenceClassification", strict=False)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(input_ids=np.array([[0, 5, 200, 2]])), "outside the vocabulary"),
        (dict(input_ids=np.array([[0, -3, 2]])), "outside the vocabulary"),
        (dict(input_ids=np.zeros((1, 65), np.int64)), "longer than the model's max_position_embeddings"),
        (dict(input_ids=np.array([[0, 5, 2]]), attention_mask=np.array([[1, 1]])), "attention_mask has shape"),
        (dict(input_ids=np.array([[0, 5, 2]]), attention_mask=np.array([[1, 2, 1]])), "only 0 and 1"),
        (dict(input_ids=np.array([0, 5, 2])), "shape \\[batch, length\\]"),
        (dict(input_ids=np.array([[0.0, 5.0]])), "integer token ids"),
        (dict(input_ids=np.array([[0, 5, 2]]), decoder_input_ids=np.array([[2, 500]])), "decoder_input_ids holds"),
        (dict(input_ids=np.array([[0, 5, 2]]), labels=np.array([[7, 99]])), "labels holds"),
        (dict(input_ids=np.array([[0, 5, 2]]), head_mask=np.ones((3, 4))), "head_mask must have shape"),
        (dict(input_ids=np.array([[0, 5, 2]]), start_positions=np.array([1])), "takes no argument"),
    ],
)
def test_bad_inputs_raise_clear_errors(generation_dir, inputs, message):
    _, directory = generation_dir
    pretrained = load_pretrained(directory)
    with pytest.raises(ValueError, match=message):
        pretrained(**inputs)


def test_labels_with_ignore_index_are_accepted(generation_dir):
    model, directory = generation_dir
    pretrained = load_pretrained(directory)
    input_ids, attention_mask = random_batch(pretrained.config.vocab_size, seed=9)
    labels = np.array([[5, 6, 7, -100], [8, 9, -100, -100], [10, 11, 12, 2]])
    loss = pretrained(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    with torch.no_grad():
        expected = model(input_ids=torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask),
                         labels=torch.as_tensor(labels)).loss.item()
    assert abs(float(loss) - expected) < 1e-4


def test_not_a_directory_nor_reachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="local directory"):
        load_pretrained("facebook/bart-large-cnn-does-not-exist-here")


def test_kernel_policies_give_transformers_logits_and_the_same_ids(tmp_path):
    """load_pretrained(kernels="portable") and kernels="cpu": logits within 1e-5 of each other
    and of transformers, and the same generated ids; "auto" names the policy it settled on."""
    model = hf_model("BartForConditionalGeneration", seed=9)
    directory = save_hf_model(model, tmp_path / "model")
    input_ids, attention_mask = random_batch(model.config.vocab_size, batch=3, length=12, seed=9)
    expected = torch_logits(model, input_ids=input_ids, attention_mask=attention_mask)
    logits, ids = {}, {}
    for kernels in ("portable", "cpu", "auto"):
        pretrained = load_pretrained(directory, kernels=kernels)
        settled = kernels if kernels != "auto" else for_platform(jax.default_backend())
        assert pretrained.module.kernels == settled, pretrained.module.kernels
        logits[kernels] = np.asarray(pretrained(input_ids=input_ids, attention_mask=attention_mask).logits)
        ids[kernels] = np.asarray(pretrained.generate(input_ids, attention_mask, num_beams=3, max_new_tokens=8))
    for kernels, values in logits.items():
        np.testing.assert_allclose(values, expected, atol=1e-5, err_msg=f"kernels={kernels} vs transformers")
        np.testing.assert_allclose(values, logits["portable"], atol=1e-5, err_msg=f"kernels={kernels} vs portable")
        assert np.array_equal(ids[kernels], ids["portable"]), f"kernels={kernels} ids differ:\n{ids}"
    with pytest.raises(ValueError, match="kernels must be one of"):
        load_pretrained(directory, kernels="gpu")
