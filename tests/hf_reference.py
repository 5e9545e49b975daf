"""Random-weight Hugging Face BART checkpoints for parity tests, the same converted to bart_jax,
random batches, and where the shared test data (real tokenizer files, text samples) lives.

transformers' random init leaves every bias at zero and every LayerNorm at (1, 0), which
would hide a wrongly mapped bias or scale; `perturb` fills every tensor with seeded noise.
"""

from __future__ import annotations

import functools
import json
import pathlib
import shutil

import numpy as np

# Real files the tests read, kept outside the repository: the `shared/data` folder next to the
# checkout. Tests that read them carry the `shared_data` marker or fixture (see conftest.py).
SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "bart-tokenizer"
SHARED_DATA_FILES = (
    TOKENIZER_DIR / "tokenizer.json",
    TOKENIZER_DIR / "vocab.json",
    TOKENIZER_DIR / "merges.txt",
    SHARED_DATA / "summarization" / "xsum_bbc_extracts_dev.jsonl",
    SHARED_DATA / "summarization" / "xsum_hf_fixture_sample.jsonl",
    SHARED_DATA / "classification" / "mrpc_hf_fixture" / "dev.csv",
    SHARED_DATA / "qa" / "squad_hf_fixture_sample.json",
)

TINY_CONFIG = dict(
    vocab_size=99,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=37,
    decoder_ffn_dim=37,
    max_position_embeddings=64,
    dropout=0.0,
    attn_implementation="eager",
)

# The shape of the tiny summarization models of the end-to-end tests (`tiny_summarizer`).
TINY_SUMMARIZER = dict(vocab_size=50265, d_model=16, encoder_attention_heads=2, decoder_attention_heads=2,
                       encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layers=1, decoder_layers=1)

HEADS = (
    "BartModel",
    "BartForConditionalGeneration",
    "BartForSequenceClassification",
    "BartForQuestionAnswering",
    "BartForCausalLM",
)


def hf_config(**overrides):
    import transformers

    return transformers.BartConfig(**{**TINY_CONFIG, **overrides})


def perturb(model, seed: int = 0, scale: float = 0.05):
    """Adds seeded noise to every parameter and buffer (biases, LayerNorms, final_logits_bias)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)
    return model


def hf_model(head: str = "BartForConditionalGeneration", seed: int = 0, **config_overrides):
    """A perturbed random-weight transformers model in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, head)(hf_config(**config_overrides))
    return perturb(model, seed=seed).eval()


def save_hf_model(model, directory, **save_kwargs) -> pathlib.Path:
    directory = pathlib.Path(directory)
    model.save_pretrained(directory, **save_kwargs)
    return directory


def tiny_summarizer(directory, tokenizer_dir, seed: int, **overrides) -> pathlib.Path:
    """A perturbed tiny random BartForConditionalGeneration with BART's real vocabulary (one layer
    each side, d_model 16), saved in `directory` with the real tokenizer files beside it."""
    model = hf_model("BartForConditionalGeneration", seed=seed, **{**TINY_SUMMARIZER, **overrides})
    directory = save_hf_model(model, directory)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(pathlib.Path(tokenizer_dir) / name, directory / name)
    return directory


def write_xsum_documents(path, count: int, with_ids: bool = False) -> list[str]:
    """The first `count` documents of the shared XSum sample, written to `path` as JSON lines
    ({"document"}, and {"id": "d<i>"} with `with_ids`), as summarize's end-to-end tests read them."""
    with open(SHARED_DATA / "summarization" / "xsum_hf_fixture_sample.jsonl", encoding="utf-8") as f:
        documents = [json.loads(line)["document"] for line in f][:count]
    records = ({"document": d, **({"id": f"d{i}"} if with_ids else {})} for i, d in enumerate(documents))
    pathlib.Path(path).write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return documents


def random_batch(vocab_size: int, batch: int = 3, length: int = 11, seed: int = 0, eos_token_id: int = 2,
                 pad_token_id: int = 1):
    """Right-padded input ids `<s> tokens </s> <pad>...` with rows of different lengths, and the mask."""
    rng = np.random.default_rng(seed)
    input_ids = np.full((batch, length), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((batch, length), dtype=np.int64)
    for row in range(batch):
        row_length = length - (row * 3) % max(length - 3, 1)
        tokens = rng.integers(4, vocab_size, size=row_length)
        tokens[0] = 0
        tokens[-1] = eos_token_id
        input_ids[row, :row_length] = tokens
        attention_mask[row, :row_length] = 1
    return input_ids, attention_mask


@functools.lru_cache(maxsize=None)
def tiny_flax_model(head: str, **config_overrides):
    """(bart_jax module, params) of a perturbed one-layer transformers model (non-zero biases, so a
    wrongly ignored one would show); converting avoids compiling a Flax init. Cached: do not change
    the params in place."""
    import jax
    import jax.numpy as jnp

    from bart_jax.checkpoints.conversion import hf_to_flax
    from bart_jax.config import BartConfig
    from bart_jax.model import heads

    reference = hf_model(head, seed=0, encoder_layers=1, decoder_layers=1, **config_overrides)
    config = BartConfig.from_dict(reference.config.to_dict())
    state = {key: value.detach().numpy() for key, value in reference.state_dict().items()}
    return heads.head_class(head)(config), jax.tree.map(jnp.asarray, hf_to_flax(state, config, head))


def seq2seq_training_batch(vocab_size: int, batch: int = 4) -> dict[str, np.ndarray]:
    """A training batch of the seq2seq task: inputs [batch, 9], labels [batch, 7] padded with -100,
    every example real (example_mask of ones)."""
    input_ids, attention_mask = random_batch(vocab_size, batch=batch, length=9, seed=1)
    labels, label_mask = random_batch(vocab_size, batch=batch, length=7, seed=2)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": np.where(label_mask == 1, labels, -100), "example_mask": np.ones(batch, np.float32)}
