"""The model presets in configs/: copies of the published Hugging Face BART configs.

Each preset must load in transformers and in `bart_jax.config.BartConfig`, build a model of the
published size, and carry the generation settings of its checkpoint. The expected values below
are those of the published hub files (sources in configs/README.md); the parameter count is
derived from the config itself and checked against a transformers model built on the meta device,
so nothing is allocated.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import pytest

from bart_jax.config import BartConfig

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"

PRESETS = (
    "bart-base",
    "bart-large",
    "bart-large-cnn",
    "bart-large-xsum",
    "bart-large-mnli",
    "distilbart-cnn-12-6",
)

# Sizes of the published checkpoints. bart-large-cnn, bart-large-xsum and distilbart-cnn-12-6
# ship a 50264-token embedding (no <mask>), the others 50265.
ARCHITECTURE = {
    "bart-base": dict(vocab_size=50265, d_model=768, layers=(6, 6), heads=(12, 12), ffn=(3072, 3072)),
    "bart-large": dict(vocab_size=50265, d_model=1024, layers=(12, 12), heads=(16, 16), ffn=(4096, 4096)),
    "bart-large-cnn": dict(vocab_size=50264, d_model=1024, layers=(12, 12), heads=(16, 16), ffn=(4096, 4096)),
    "bart-large-xsum": dict(vocab_size=50264, d_model=1024, layers=(12, 12), heads=(16, 16), ffn=(4096, 4096)),
    "bart-large-mnli": dict(vocab_size=50265, d_model=1024, layers=(12, 12), heads=(16, 16), ffn=(4096, 4096)),
    "distilbart-cnn-12-6": dict(vocab_size=50264, d_model=1024, layers=(12, 6), heads=(16, 16), ffn=(4096, 4096)),
}

CNN_GENERATION = dict(
    num_beams=4,
    max_length=142,
    min_length=56,
    length_penalty=2.0,
    no_repeat_ngram_size=3,
    early_stopping=True,
    forced_bos_token_id=0,
)
# Decoding settings of each checkpoint; keys not listed stay unset (None: generate's defaults).
GENERATION = {
    "bart-base": dict(num_beams=4, no_repeat_ngram_size=3, early_stopping=True, forced_bos_token_id=0),
    "bart-large": dict(num_beams=4, no_repeat_ngram_size=3, early_stopping=True, forced_bos_token_id=0),
    "bart-large-cnn": CNN_GENERATION,
    "bart-large-xsum": dict(
        num_beams=6,
        max_length=62,
        min_length=11,
        no_repeat_ngram_size=3,
        early_stopping=True,
        forced_bos_token_id=None,
    ),
    "bart-large-mnli": dict(num_beams=None, forced_bos_token_id=None),
    "distilbart-cnn-12-6": CNN_GENERATION,
}

DEFAULT_LABELS = {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
LABELS = {name: DEFAULT_LABELS for name in PRESETS} | {
    "bart-large-mnli": {0: "contradiction", 1: "neutral", 2: "entailment"},
}

# SHA-256 of files whose bytes were published in snapshot manifests (see configs/README.md).
PUBLISHED_SHA256 = {
    ("bart-large-cnn", "config.json"): "c6cb642aec929b65f514ee0ec7c04f9de19f705c143491577ecd8b7cc923c6ed",
    ("bart-large-cnn", "generation_config.json"): "4897361917410254e3132e8fe7786d37f3ef7cff54a650845c1147c2450a790f",
    ("bart-large-mnli", "config.json"): "a0f9bcb245b680a96ccae0ad8d155f267ec3e3c971ef4a4937e52ea9ba368a86",
}

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "forced_eos_token_id")
# GenerationConfig bookkeeping that says nothing about decoding, and `use_cache`: files written
# before transformers 5 leave it unset (the model default, True); the derivation writes it out.
IGNORED_GENERATION_KEYS = (
    "transformers_version",
    "_from_model_config",
    "_commit_hash",
    "_original_object_hash",
    "use_cache",
)


def preset_dir(name: str) -> pathlib.Path:
    return CONFIGS_DIR / name


def published_json(name: str, file_name: str = "config.json") -> dict:
    return json.loads((preset_dir(name) / file_name).read_text(encoding="utf-8"))


def bart_model_parameter_count(config: dict) -> int:
    """Parameters of a `BartModel` (shared embedding counted once), from the config alone."""
    d = config["d_model"]
    attention = 4 * (d * d + d)  # q, k, v, out projections with biases
    layer_norm = 2 * d

    def feed_forward(ffn: int) -> int:
        return (d * ffn + ffn) + (ffn * d + d)

    encoder_layer = attention + layer_norm + feed_forward(config["encoder_ffn_dim"]) + layer_norm
    decoder_layer = 2 * (attention + layer_norm) + feed_forward(config["decoder_ffn_dim"]) + layer_norm
    shared_embedding = config["vocab_size"] * d
    # Learned positions of encoder and decoder; BART offsets positions by 2.
    positions = 2 * (config["max_position_embeddings"] + 2) * d
    embedding_layer_norms = 2 * layer_norm
    return (
        shared_embedding
        + positions
        + embedding_layer_norms
        + config["encoder_layers"] * encoder_layer
        + config["decoder_layers"] * decoder_layer
    )


def head_parameter_count(architecture: str, config: dict, num_labels: int) -> int:
    """Parameters a head adds on top of `BartModel` (the LM head is tied to the embedding)."""
    d = config["d_model"]
    if architecture == "BartForSequenceClassification":
        return (d * d + d) + (d * num_labels + num_labels)
    return 0


def build_on_meta(name: str):
    """The published architecture (`architectures[0]`) of a preset, built without allocating."""
    architecture = published_json(name)["architectures"][0]
    config = transformers.BartConfig.from_pretrained(preset_dir(name))
    with torch.device("meta"):
        return architecture, getattr(transformers, architecture)(config)


def test_configs_dir_holds_exactly_the_presets():
    found = {
        path.name
        for path in CONFIGS_DIR.iterdir()
        if path.is_dir() and not path.name.startswith("train") and (path / "config.json").is_file()
    }
    assert found == set(PRESETS), f"configs/ presets {sorted(found)} != expected {sorted(PRESETS)}"


def sizes(config) -> dict:
    """The architecture numbers of a transformers or bart_jax config, as in ARCHITECTURE."""
    return dict(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        layers=(config.encoder_layers, config.decoder_layers),
        heads=(config.encoder_attention_heads, config.decoder_attention_heads),
        ffn=(config.encoder_ffn_dim, config.decoder_ffn_dim),
    )


@pytest.mark.parametrize("name", PRESETS)
def test_config_loads_in_transformers_with_published_sizes(name):
    config = transformers.BartConfig.from_pretrained(preset_dir(name))
    expected = ARCHITECTURE[name]
    actual = sizes(config)
    assert actual == expected, f"{name}: transformers reads {actual}, published checkpoint is {expected}"
    assert config.model_type == "bart"
    assert config.max_position_embeddings == 1024
    assert config.id2label == LABELS[name], f"{name}: id2label {config.id2label}"
    raw = published_json(name)
    for key in TOKEN_ID_KEYS:
        assert getattr(config, key) == raw[key], f"{name}: transformers reads {key}={getattr(config, key)}"


@pytest.mark.parametrize("name", PRESETS)
def test_published_architecture_builds_expected_shapes_and_parameter_count(name):
    architecture, model = build_on_meta(name)
    raw = published_json(name)
    d, vocab_size = raw["d_model"], raw["vocab_size"]
    base = model.base_model

    shapes = {
        "shared": tuple(base.shared.weight.shape),
        "encoder positions": tuple(base.encoder.embed_positions.weight.shape),
        "decoder positions": tuple(base.decoder.embed_positions.weight.shape),
        "encoder fc1": tuple(base.encoder.layers[0].fc1.weight.shape),
        "decoder fc1": tuple(base.decoder.layers[0].fc1.weight.shape),
    }
    expected_shapes = {
        "shared": (vocab_size, d),
        "encoder positions": (raw["max_position_embeddings"] + 2, d),
        "decoder positions": (raw["max_position_embeddings"] + 2, d),
        "encoder fc1": (raw["encoder_ffn_dim"], d),
        "decoder fc1": (raw["decoder_ffn_dim"], d),
    }
    assert shapes == expected_shapes, f"{name}: {shapes}"
    assert (len(base.encoder.layers), len(base.decoder.layers)) == (raw["encoder_layers"], raw["decoder_layers"])
    assert base.encoder.layers[0].self_attn.num_heads == raw["encoder_attention_heads"]
    assert base.decoder.layers[0].encoder_attn.num_heads == raw["decoder_attention_heads"]

    if architecture == "BartForConditionalGeneration":
        assert tuple(model.lm_head.weight.shape) == (vocab_size, d)
        assert model.lm_head.weight is base.shared.weight, f"{name}: LM head is not tied to the embedding"
        assert tuple(model.final_logits_bias.shape) == (1, vocab_size)
    if architecture == "BartForSequenceClassification":
        assert tuple(model.classification_head.out_proj.weight.shape) == (len(LABELS[name]), d)

    expected_count = bart_model_parameter_count(raw) + head_parameter_count(architecture, raw, len(LABELS[name]))
    actual_count = sum(p.numel() for p in model.parameters())
    assert actual_count == expected_count, (
        f"{name} ({architecture}): transformers has {actual_count:,} parameters, the config formula gives "
        f"{expected_count:,}"
    )


@pytest.mark.parametrize("name", PRESETS)
def test_generation_config_loads_with_checkpoint_settings(name):
    generation_config = transformers.GenerationConfig.from_pretrained(preset_dir(name))
    defaults = transformers.GenerationConfig()
    expected = {key: getattr(defaults, key) for key in ("max_length", "min_length", "length_penalty")}
    expected |= GENERATION[name]
    actual = {key: getattr(generation_config, key) for key in expected}
    assert actual == expected, f"{name}: generation_config.json gives {actual}"
    raw = published_json(name)
    for key in TOKEN_ID_KEYS:
        assert getattr(generation_config, key) == raw[key], f"{name}: {key} disagrees with config.json"


@pytest.mark.parametrize("name", PRESETS)
def test_generation_config_is_what_transformers_derives_from_config(name):
    """Old checkpoints keep decoding settings in config.json; generation_config.json must agree."""
    on_disk = transformers.GenerationConfig.from_pretrained(preset_dir(name)).to_dict()
    derived = transformers.GenerationConfig.from_pretrained(
        preset_dir(name), config_file_name="config.json", _from_model_config=True
    ).to_dict()
    for key in IGNORED_GENERATION_KEYS:
        on_disk.pop(key, None)
        derived.pop(key, None)
    differences = {
        key: (on_disk.get(key), derived.get(key))
        for key in on_disk.keys() | derived.keys()
        if on_disk.get(key) != derived.get(key)
    }
    assert not differences, f"{name}: generation_config.json vs derived from config.json: {differences}"


@pytest.mark.parametrize(("name", "file_name"), sorted(PUBLISHED_SHA256))
def test_byte_identical_to_published_file(name, file_name):
    digest = hashlib.sha256((preset_dir(name) / file_name).read_bytes()).hexdigest()
    assert digest == PUBLISHED_SHA256[name, file_name], (
        f"configs/{name}/{file_name} is no longer byte-identical to the published file"
    )


@pytest.mark.parametrize("name", PRESETS)
def test_round_trip_through_bart_jax_config(name):
    raw = published_json(name)
    round_tripped = BartConfig.from_pretrained(preset_dir(name)).to_dict()
    differences = {
        key: (raw[key], round_tripped.get(key, "<missing>"))
        for key in raw
        if round_tripped.get(key, "<missing>") != raw[key]
    }
    assert not differences, f"{name}: (config.json, BartConfig.to_dict()) differ on {differences}"


@pytest.mark.parametrize("name", PRESETS)
def test_bart_jax_config_reads_published_sizes(name):
    config = BartConfig.from_pretrained(preset_dir(name))
    expected = ARCHITECTURE[name]
    actual = sizes(config)
    assert actual == expected, f"{name}: bart_jax reads {actual}, published checkpoint is {expected}"
    assert dict(config.id2label) == LABELS[name]
