"""Checkpoint conversion between transformers and bart_jax, checked against transformers itself."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from hf_reference import HEADS, TOKENIZER_DIR, hf_model, save_hf_model

from bart_jax.checkpoints import conversion, files, hub
from bart_jax.config import BartConfig
from bart_jax.model import heads, registry

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CLASSIFIER = "BartForSequenceClassification"
SEQ2SEQ_LM = "BartForConditionalGeneration"


def numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {key: tensor.detach().float().numpy() for key, tensor in model.state_dict().items()}


def tied_aliases(model) -> set[str]:
    """The state-dict keys transformers treats as copies of another tensor (not saved)."""
    return set(model.get_expanded_tied_weights_keys(all_submodels=True))


def assert_same_tensors(actual: dict, expected: dict, what: str):
    assert set(actual) == set(expected), (
        f"{what}: keys differ; only actual {sorted(set(actual) - set(expected))}, "
        f"only expected {sorted(set(expected) - set(actual))}"
    )
    differing = [key for key in expected if not np.array_equal(np.asarray(actual[key]), expected[key])]
    assert not differing, f"{what}: tensors differ for {differing}"


def assert_loads_cleanly(head: str, directory, **kwargs):
    model, info = getattr(transformers, head).from_pretrained(directory, output_loading_info=True, **kwargs)
    problems = {name: keys for name, keys in info.items() if keys}
    assert not problems, f"transformers.{head}.from_pretrained({directory}) reported {problems}"
    return model


def flat_shapes(tree) -> dict:
    return {path: tuple(np.shape(leaf)) for path, leaf in traverse_util.flatten_dict(tree, sep="/").items()}


def run_cli(*args, env_overrides=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_overrides or {})}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "convert_weights.py"), *map(str, args)],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """head -> (perturbed transformers model, directory written by its save_pretrained)."""
    out = {}
    for seed, head in enumerate(HEADS):
        model = hf_model(head, seed=seed)
        out[head] = model, save_hf_model(model, tmp_path_factory.mktemp(head))
    return out


@pytest.fixture(scope="module")
def converted(checkpoints):
    """head -> (config, Flax params) converted from the save_pretrained directory."""
    out = {}
    for head, (_, directory) in checkpoints.items():
        config = BartConfig.from_pretrained(directory)
        out[head] = config, conversion.hf_to_flax(files.load_hf_state_dict(directory), config, head)
    return out


def rebuilt(state_dict: dict, directory, config_source) -> pathlib.Path:
    """A checkpoint directory holding `state_dict` (as pytorch_model.bin) and a copied config."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pathlib.Path(config_source) / "config.json", directory / "config.json")
    torch.save({key: torch.as_tensor(np.array(value)) for key, value in state_dict.items()},
               directory / "pytorch_model.bin")
    return directory


# --- round trips, all heads -----------------------------------------------------------------
def test_registry_and_modeling_know_the_heads_transformers_has():
    assert registry.HEAD_NAMES == HEADS, f"registry.HEAD_NAMES {registry.HEAD_NAMES} != transformers' {HEADS}"
    assert set(heads.HEADS) == set(HEADS), f"heads.HEADS {sorted(heads.HEADS)} != transformers' {HEADS}"
    for name in HEADS:
        assert hasattr(transformers, name), f"transformers has no {name}"


@pytest.mark.parametrize("head", HEADS)
def test_converted_params_have_the_shapes_the_config_implies(converted, head):
    config, params = converted[head]
    expected = traverse_util.flatten_dict(conversion.expected_flax_shapes(config, head), sep="/")
    assert flat_shapes(params) == expected


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("head", HEADS)
def test_expected_shapes_name_every_tensor_transformers_saves(head, tied):
    # The tree the modules create, through the name map, is the state dict without its tied aliases.
    model = hf_model(head, encoder_layers=1, decoder_layers=3, decoder_ffn_dim=41, tie_word_embeddings=tied)
    config = BartConfig.from_dict(model.config.to_dict())
    aliases = tied_aliases(model)
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items() if key not in aliases}
    derived = {conversion.hf_key(path): shape
               for path, shape in traverse_util.flatten_dict(conversion.expected_flax_shapes(config, head)).items()}
    assert derived == expected, (f"only derived {sorted(derived.keys() - expected.keys())}, "
                                 f"only transformers {sorted(expected.keys() - derived.keys())}")


@pytest.mark.parametrize("head", HEADS)
def test_flax_to_hf_gives_back_the_state_dict_without_tied_aliases(checkpoints, converted, head):
    model, _ = checkpoints[head]
    config, params = converted[head]
    reference = numpy_state_dict(model)
    expected = {key: value for key, value in reference.items() if key not in tied_aliases(model)}
    assert_same_tensors(conversion.flax_to_hf(params, config, head), expected, f"{head} flax_to_hf")


@pytest.mark.parametrize("head", HEADS)
def test_transformers_loads_the_written_directory_unchanged(checkpoints, converted, head, tmp_path):
    model, _ = checkpoints[head]
    config, params = converted[head]
    files.save_hf_directory(params, config, head, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [head]
    reloaded = assert_loads_cleanly(head, tmp_path)
    assert_same_tensors(numpy_state_dict(reloaded), numpy_state_dict(model), f"{head} reloaded by transformers")


def test_converted_directory_round_trip_keeps_params_and_head(converted, tmp_path):
    config, params = converted[CLASSIFIER]
    files.save_converted(params, config, CLASSIFIER, tmp_path)
    assert files.is_converted_directory(tmp_path)
    loaded_config, loaded_params, head = files.load_converted(tmp_path)
    assert head == CLASSIFIER
    assert loaded_config.replace(extra=()) == config.replace(extra=())
    assert_same_tensors(traverse_util.flatten_dict(loaded_params, sep="/"),
                        traverse_util.flatten_dict(params, sep="/"), "load_converted")
    assert "model/encoder/layers_0/self_attn/q_proj/weight" in traverse_util.flatten_dict(loaded_params, sep="/")


# --- source formats -------------------------------------------------------------------------
def test_sharded_safetensors_source(checkpoints, tmp_path):
    model, directory = checkpoints[SEQ2SEQ_LM]
    save_hf_model(model, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the fixture should be sharded"
    assert_same_tensors(files.load_hf_state_dict(tmp_path),
                        files.load_hf_state_dict(directory), "sharded safetensors")


def test_pytorch_bin_source_single_and_sharded(checkpoints, tmp_path):
    model, directory = checkpoints[SEQ2SEQ_LM]
    saved = files.load_hf_state_dict(directory)
    single = rebuilt(saved, tmp_path / "single", directory)
    assert_same_tensors(files.load_hf_state_dict(single), saved, "pytorch_model.bin")

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(saved)
    weight_map = {}
    for number, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), start=1):
        name = f"pytorch_model-0000{number}-of-00002.bin"
        torch.save({key: torch.from_numpy(np.array(saved[key])) for key in part}, sharded / name)
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_tensors(files.load_hf_state_dict(sharded), saved, "sharded pytorch_model.bin")


def test_bfloat16_pytorch_bin_keeps_the_exact_bits(checkpoints, tmp_path):
    model, directory = checkpoints[SEQ2SEQ_LM]
    bf16 = {key: tensor.to(torch.bfloat16) for key, tensor in model.state_dict().items()}
    shutil.copyfile(directory / "config.json", tmp_path / "config.json")
    torch.save(bf16, tmp_path / "pytorch_model.bin")
    loaded = files.load_hf_state_dict(tmp_path)
    for key, tensor in bf16.items():
        assert loaded[key].dtype == ml_dtypes.bfloat16, key
        assert np.array_equal(loaded[key].astype(np.float32), tensor.float().numpy()), key


def test_safetensors_source_does_not_import_torch(checkpoints):
    _, directory = checkpoints[SEQ2SEQ_LM]
    script = (
        "import sys\n"
        "from bart_jax.checkpoints.files import load_hf_state_dict\n"
        f"assert load_hf_state_dict({str(directory)!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr


def test_old_style_checkpoint_with_tied_aliases_and_version_keys(checkpoints, converted, tmp_path):
    # Hub checkpoints such as facebook/bart-large store every tied copy and fairseq version keys.
    for head in (SEQ2SEQ_LM, "BartModel", "BartForCausalLM"):
        model, directory = checkpoints[head]
        state = numpy_state_dict(model)
        prefix = "" if head == "BartModel" else "model."
        state[f"{prefix}encoder.version"] = np.array([3.0], np.float32)
        state[f"{prefix}decoder.version"] = np.array([3.0], np.float32)
        assert tied_aliases(model) <= set(state)
        old = rebuilt(state, tmp_path / head, directory)
        config, params = converted[head]
        assert_same_tensors(
            traverse_util.flatten_dict(conversion.hf_to_flax(files.load_hf_state_dict(old), config, head)),
            traverse_util.flatten_dict(params), f"{head} from an old-style checkpoint",
        )


@pytest.mark.parametrize("alias", ["model.decoder.embed_tokens.weight", "lm_head.weight"])
def test_a_tied_alias_that_differs_is_an_error(checkpoints, converted, alias):
    model, _ = checkpoints[SEQ2SEQ_LM]
    config, _ = converted[SEQ2SEQ_LM]
    state = numpy_state_dict(model)
    state[alias] = state[alias] + 1.0
    with pytest.raises(ValueError, match=alias):
        conversion.hf_to_flax(state, config, SEQ2SEQ_LM)


def test_bfloat16_conversion_loads_in_transformers(checkpoints, converted, tmp_path):
    model, _ = checkpoints[SEQ2SEQ_LM]
    config, params = converted[SEQ2SEQ_LM]
    bf16 = conversion.cast_params(params, "bfloat16")
    assert {np.dtype(leaf.dtype) for leaf in traverse_util.flatten_dict(bf16).values()} == {
        np.dtype(ml_dtypes.bfloat16)}
    files.save_hf_directory(bf16, config, SEQ2SEQ_LM, tmp_path)
    reloaded = assert_loads_cleanly(SEQ2SEQ_LM, tmp_path)
    assert reloaded.dtype == torch.bfloat16
    # numpy's (ml_dtypes) and torch's float32 -> bfloat16 casts both round to nearest even.
    expected = {key: tensor.to(torch.bfloat16).float().numpy() for key, tensor in model.state_dict().items()}
    assert_same_tensors(numpy_state_dict(reloaded), expected, "bfloat16 weights reloaded by transformers")


@pytest.mark.parametrize("head", ["BartModel", SEQ2SEQ_LM, "BartForCausalLM"])
def test_untied_embeddings_stay_separate_both_ways(head, tmp_path):
    model = hf_model(head, seed=7, tie_word_embeddings=False)
    directory = save_hf_model(model, tmp_path / "hf")
    config = BartConfig.from_pretrained(directory)
    params = conversion.hf_to_flax(files.load_hf_state_dict(directory), config, head)
    paths = set(traverse_util.flatten_dict(params, sep="/"))
    if head != "BartModel":
        assert "lm_head/weight" in paths
    if head != "BartForCausalLM":
        prefix = "" if head == "BartModel" else "model/"
        assert {f"{prefix}encoder/embed_tokens/embedding", f"{prefix}decoder/embed_tokens/embedding"} <= paths
    assert_same_tensors(conversion.flax_to_hf(params, config, head), numpy_state_dict(model), f"untied {head}")
    files.save_hf_directory(params, config, head, tmp_path / "out")
    reloaded = assert_loads_cleanly(head, tmp_path / "out")
    assert_same_tensors(numpy_state_dict(reloaded), numpy_state_dict(model), f"untied {head} reloaded")


# --- loading one head's checkpoint into another -----------------------------------------------
def random_head_params(config, head, seed=0):
    rng = np.random.default_rng(seed)
    shapes = conversion.expected_flax_shapes(config, head)
    return {
        name: traverse_util.unflatten_dict({
            path: rng.standard_normal(shape).astype(np.float32)
            for path, shape in traverse_util.flatten_dict(subtree).items()
        })
        for name, subtree in shapes.items() if name != "model"
    }


def test_missing_head_weights_need_explicit_head_params(checkpoints, converted):
    _, directory = checkpoints[SEQ2SEQ_LM]
    state = files.load_hf_state_dict(directory)
    config, lm_params = converted[SEQ2SEQ_LM]
    with pytest.raises(ValueError, match=r"classification_head\.dense\.weight.*head_params"):
        conversion.convert_hf_state_dict(state, config, CLASSIFIER)

    head_params = random_head_params(config, CLASSIFIER)
    result = conversion.convert_hf_state_dict(state, config, CLASSIFIER, head_params=head_params)
    assert_same_tensors(traverse_util.flatten_dict(result.params["model"]),
                        traverse_util.flatten_dict(lm_params["model"]), "base model of the classifier")
    assert_same_tensors(traverse_util.flatten_dict(result.params["classification_head"]),
                        traverse_util.flatten_dict(head_params["classification_head"]), "classification head")
    head_paths = traverse_util.flatten_dict(head_params["classification_head"], sep="/")
    assert set(result.from_head_params) == {f"classification_head/{path}" for path in head_paths}

    # transformers makes the same split between unused and missing tensors.
    _, info = transformers.BartForSequenceClassification.from_pretrained(directory, output_loading_info=True)
    assert set(result.unused_keys) == info["unexpected_keys"]
    missing = {conversion.hf_key(("classification_head", *path))
               for path in traverse_util.flatten_dict(head_params["classification_head"])}
    assert missing == info["missing_keys"]

    with pytest.raises(ValueError, match="final_logits_bias.*strict=False"):
        conversion.hf_to_flax(state, config, CLASSIFIER, head_params=head_params)
    conversion.hf_to_flax(state, config, CLASSIFIER, head_params=head_params, strict=False)


def test_checkpoint_values_win_over_head_params(checkpoints, converted):
    _, directory = checkpoints[CLASSIFIER]
    config, params = converted[CLASSIFIER]
    result = conversion.convert_hf_state_dict(files.load_hf_state_dict(directory), config, CLASSIFIER,
                                              head_params=random_head_params(config, CLASSIFIER))
    assert result.from_head_params == ()
    assert_same_tensors(traverse_util.flatten_dict(result.params), traverse_util.flatten_dict(params), "classifier")


@pytest.mark.parametrize("entry", [{"model": {"shared": {"embedding": np.zeros((1, 1))}}},  # not a head weight
                                   {"classification_head": {"dense": {"bias": np.zeros(1)}}},  # wrong shape
                                   {"qa_outputs": {"bias": np.zeros(2)}}])  # another head's
def test_head_params_must_be_weights_of_the_head(checkpoints, converted, entry):
    config, _ = converted[CLASSIFIER]
    state = files.load_hf_state_dict(checkpoints[SEQ2SEQ_LM][1])
    with pytest.raises(ValueError, match="head_params entry"):
        conversion.convert_hf_state_dict(state, config, CLASSIFIER, head_params=entry)


@pytest.mark.parametrize("source, target", [("BartModel", SEQ2SEQ_LM), (SEQ2SEQ_LM, "BartModel"),
                                            ("BartForQuestionAnswering", SEQ2SEQ_LM)])
def test_cross_head_loading_matches_transformers(checkpoints, source, target, tmp_path):
    _, directory = checkpoints[source]
    config = BartConfig.from_pretrained(directory)
    result = conversion.convert_hf_state_dict(files.load_hf_state_dict(directory), config, target)
    reference, info = getattr(transformers, target).from_pretrained(directory, output_loading_info=True)
    assert set(result.unused_keys) == info["unexpected_keys"]
    assert not info["missing_keys"], "transformers zero-fills only final_logits_bias, as bart_jax does"
    expected = {key: value for key, value in numpy_state_dict(reference).items() if key not in tied_aliases(reference)}
    assert_same_tensors(conversion.flax_to_hf(result.params, config, target), expected, f"{source} -> {target}")


def test_seq2seq_checkpoint_feeds_causal_lm_decoder(checkpoints, tmp_path):
    model, directory = checkpoints[SEQ2SEQ_LM]
    config = BartConfig.from_pretrained(directory)
    result = conversion.convert_hf_state_dict(files.load_hf_state_dict(directory), config, "BartForCausalLM")
    assert all(key.startswith(("model.encoder.", "final_logits_bias")) for key in result.unused_keys)
    # transformers 5 only finds the decoder's (tied) token embeddings when the checkpoint stores the alias.
    old_style = rebuilt(numpy_state_dict(model), tmp_path, directory)
    reference = transformers.BartForCausalLM.from_pretrained(old_style)
    expected = {key: value for key, value in numpy_state_dict(reference).items() if key not in tied_aliases(reference)}
    assert_same_tensors(conversion.flax_to_hf(result.params, config, "BartForCausalLM"), expected,
                        "seq2seq -> causal LM")


# --- errors -----------------------------------------------------------------------------------
@pytest.fixture
def lm_state(checkpoints):
    _, directory = checkpoints[SEQ2SEQ_LM]
    return BartConfig.from_pretrained(directory), dict(files.load_hf_state_dict(directory))


def test_missing_tensor_is_named(lm_state):
    config, state = lm_state
    del state["model.encoder.layers.1.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing tensors model\.encoder\.layers\.1\.fc2\.bias"):
        conversion.hf_to_flax(state, config, SEQ2SEQ_LM)


def test_extra_tensor_is_named_even_when_not_strict(lm_state):
    config, state = lm_state
    state["model.decoder.layers.2.fc1.weight"] = state["model.decoder.layers.1.fc1.weight"]
    with pytest.raises(ValueError, match=r"unexpected tensors model\.decoder\.layers\.2\.fc1\.weight"):
        conversion.hf_to_flax(state, config, SEQ2SEQ_LM, strict=False)


def test_wrong_shape_is_named_with_both_shapes(lm_state):
    config, state = lm_state
    ffn, d = config.encoder_ffn_dim, config.d_model
    state["model.encoder.layers.0.fc1.weight"] = np.zeros((ffn - 1, d), np.float32)
    expected = f"model.encoder.layers.0.fc1.weight (expected ({ffn}, {d}), found ({ffn - 1}, {d}))"
    with pytest.raises(ValueError) as error:
        conversion.hf_to_flax(state, config, SEQ2SEQ_LM)
    assert expected in str(error.value)


def test_vocab_size_mismatch(lm_state):
    config, state = lm_state
    rows = config.vocab_size
    with pytest.raises(ValueError, match=f"vocab_size is {rows + 1} .* have {rows} rows"):
        conversion.hf_to_flax(state, config.replace(vocab_size=rows + 1), SEQ2SEQ_LM)


def test_unknown_head(lm_state):
    config, state = lm_state
    with pytest.raises(ValueError, match="unknown head"):
        conversion.hf_to_flax(state, config, "BartForMaskedLM")


def test_non_bart_config(checkpoints, tmp_path):
    _, directory = checkpoints[SEQ2SEQ_LM]
    shutil.copytree(directory, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(ValueError, match="not a BART config"):
        files.convert_hf_directory(tmp_path, tmp_path / "out")


def test_flax_to_hf_names_bad_params(converted):
    config, params = converted[SEQ2SEQ_LM]
    flat = dict(traverse_util.flatten_dict(params, sep="/"))
    ffn, d = config.decoder_ffn_dim, config.d_model
    del flat["model/decoder/layers_1/fc2/bias"]
    flat["model/decoder/layers_0/fc1/weight"] = np.zeros((d, ffn), np.float32)
    flat["model/pooler/weight"] = np.zeros((d, d), np.float32)
    with pytest.raises(ValueError) as error:
        conversion.flax_to_hf(traverse_util.unflatten_dict(flat, sep="/"), config, SEQ2SEQ_LM)
    for fragment in ("missing model/decoder/layers_1/fc2/bias", "unexpected model/pooler/weight",
                     f"model/decoder/layers_0/fc1/weight (expected ({ffn}, {d}), found ({d}, {ffn}))"):
        assert fragment in str(error.value)


def test_truncated_safetensors_names_the_file(checkpoints, tmp_path):
    _, directory = checkpoints[SEQ2SEQ_LM]
    shutil.copytree(directory, tmp_path, dirs_exist_ok=True)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        files.load_hf_state_dict(tmp_path)


def test_garbage_pytorch_bin_names_the_file(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is not a readable PyTorch checkpoint"):
        files.load_hf_state_dict(tmp_path)


def test_missing_shard_is_named(checkpoints, tmp_path):
    model, _ = checkpoints[SEQ2SEQ_LM]
    save_hf_model(model, tmp_path, max_shard_size="20KB")
    shard = sorted(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(ValueError, match=f"lists shard {shard}, which is missing"):
        files.load_hf_state_dict(tmp_path)


def test_directory_without_weights(tmp_path):
    with pytest.raises(ValueError, match="no weights in .*model.safetensors"):
        files.load_hf_state_dict(tmp_path)


def test_load_converted_rejects_other_directories(checkpoints, converted, tmp_path):
    _, directory = checkpoints[SEQ2SEQ_LM]
    with pytest.raises(ValueError, match="not a converted bart_jax directory"):
        files.load_converted(directory)
    config, params = converted[SEQ2SEQ_LM]
    files.save_converted(params, config, SEQ2SEQ_LM, tmp_path)
    marker = tmp_path / files.CONVERTED_MARKER_NAME
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        files.load_converted(tmp_path)


def test_save_hf_directory_refuses_to_leave_stale_weights(converted, checkpoints, tmp_path):
    config, params = converted[SEQ2SEQ_LM]
    shutil.copytree(checkpoints[SEQ2SEQ_LM][1], tmp_path, dirs_exist_ok=True)
    with pytest.raises(ValueError, match="already holds weights"):
        files.save_hf_directory(params, config, SEQ2SEQ_LM, tmp_path, max_shard_size="20KB")


# --- hub --------------------------------------------------------------------------------------
def test_local_directory_is_used_as_is(checkpoints):
    _, directory = checkpoints[SEQ2SEQ_LM]
    assert hub.resolve_model_directory(directory) == str(directory)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        hub.resolve_model_directory(tmp_path / "nowhere" / "model")


def test_hub_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubUnavailableError, match="could not be fetched from the Hugging Face hub.*local dir"):
        hub.resolve_model_directory("facebook/bart-base", cache_dir=tmp_path)


def test_unreachable_hub_is_a_clear_error(tmp_path):
    with pytest.raises(hub.HubUnavailableError, match="could not be fetched"):
        hub.resolve_model_directory("facebook/bart-base", cache_dir=tmp_path, endpoint="http://127.0.0.1:9")


# --- command line -------------------------------------------------------------------------------
@pytest.mark.shared_data
def test_cli_converts_both_ways(checkpoints, converted, tmp_path):
    model, directory = checkpoints[SEQ2SEQ_LM]
    source = tmp_path / "hf"
    shutil.copytree(directory, source)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        shutil.copyfile(TOKENIZER_DIR / name, source / name)

    result = run_cli(source, tmp_path / "bart_jax")
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer.json",
                 "params.safetensors", "bart_jax.json"):
        assert (tmp_path / "bart_jax" / name).is_file(), f"converted directory lacks {name}"
    config, params, head = files.load_converted(tmp_path / "bart_jax")
    assert head == SEQ2SEQ_LM
    assert_same_tensors(traverse_util.flatten_dict(params), traverse_util.flatten_dict(converted[SEQ2SEQ_LM][1]),
                        "params written by the CLI")

    result = run_cli("--to-hf", tmp_path / "bart_jax", tmp_path / "back", "--max-shard-size", "20KB")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    reloaded = assert_loads_cleanly(SEQ2SEQ_LM, tmp_path / "back")
    assert_same_tensors(numpy_state_dict(reloaded), numpy_state_dict(model), "CLI round trip")


def test_cli_bfloat16_and_head_choice(checkpoints, tmp_path):
    _, directory = checkpoints[SEQ2SEQ_LM]
    result = run_cli(directory, tmp_path / "out", "--dtype", "bfloat16", "--head", "BartModel")
    assert result.returncode == 0, result.stderr
    assert "final_logits_bias" in result.stderr, "dropped tensors should be reported"
    marker = json.loads((tmp_path / "out" / "bart_jax.json").read_text())
    assert marker["head"] == "BartModel" and marker["dtype"] == "bfloat16"
    _, params, _ = files.load_converted(tmp_path / "out")
    assert {leaf.dtype for leaf in traverse_util.flatten_dict(params).values()} == {np.dtype(ml_dtypes.bfloat16)}


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere/model", "{tmp}/out"], "is not a directory"),
    (["{garbage}", "{tmp}/out"], "not a readable PyTorch checkpoint"),
    (["--to-hf", "{garbage}", "{tmp}/out"], "not a converted bart_jax directory"),
])
def test_cli_errors_are_one_line(checkpoints, tmp_path, args, message):
    garbage = tmp_path / "garbage"
    shutil.copytree(checkpoints[SEQ2SEQ_LM][1], garbage)
    (garbage / "model.safetensors").unlink()
    (garbage / "pytorch_model.bin").write_bytes(b"garbage")
    result = run_cli(*[arg.format(tmp=tmp_path, garbage=garbage) for arg in args])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_unreachable_hub(tmp_path):
    result = run_cli("facebook/bart-base", tmp_path / "out",
                     env_overrides={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
                                    "HF_HOME": str(tmp_path / "hf_home")})
    assert result.returncode == 2
    assert "could not be fetched from the Hugging Face hub" in result.stderr and "Traceback" not in result.stderr
