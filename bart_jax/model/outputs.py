"""Output containers with the field names of transformers' `ModelOutput` classes.

Fields that were not asked for (`output_attentions=False`, no labels, ...) are None.
Hidden-state tuples hold the embedding output followed by every layer's output; attention
tuples hold one [batch, heads, query_length, key_length] array per layer.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax

Array = jax.Array
Tuple = Optional[tuple[Array, ...]]


@flax.struct.dataclass
class EncoderOutput:
    last_hidden_state: Array  # [batch, source_length, d_model]
    hidden_states: Tuple = None
    attentions: Tuple = None


@flax.struct.dataclass
class DecoderOutput:
    last_hidden_state: Array  # [batch, target_length, d_model]
    hidden_states: Tuple = None
    attentions: Tuple = None
    cross_attentions: Tuple = None
    cache: Any = None  # the updated self-attention cache, when one was passed in


@flax.struct.dataclass
class Seq2SeqOutput:
    """Output of `BartModel` and of the encoder-decoder heads."""

    loss: Optional[Array] = None
    logits: Optional[Array] = None  # conditional generation [b, t, vocab]; classification [b, num_labels]
    start_logits: Optional[Array] = None  # question answering [batch, source_length]
    end_logits: Optional[Array] = None
    last_hidden_state: Optional[Array] = None  # decoder output [batch, target_length, d_model]
    decoder_hidden_states: Tuple = None
    decoder_attentions: Tuple = None
    cross_attentions: Tuple = None
    encoder_last_hidden_state: Optional[Array] = None
    encoder_hidden_states: Tuple = None
    encoder_attentions: Tuple = None


@flax.struct.dataclass
class CausalLMOutput:
    loss: Optional[Array] = None
    logits: Optional[Array] = None  # [batch, length, vocab]
    hidden_states: Tuple = None
    attentions: Tuple = None
    cross_attentions: Tuple = None
    cache: Any = None
