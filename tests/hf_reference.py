"""Random-weight Hugging Face BART checkpoints for parity tests.

transformers' random init leaves every bias at zero and every LayerNorm at (1, 0), which
would hide a wrongly mapped bias or scale; `perturb` fills every tensor with seeded noise.
"""

from __future__ import annotations

import pathlib

import numpy as np

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "bart-tokenizer"

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
