"""BART as Flax linen modules: the five heads, their encoder-decoder stacks and layers, attention,
the decoder cache, and the backend-specific kernels behind one seam (`kernels/`)."""

from bart_jax.model.cache import init_cache
from bart_jax.model.heads import (
                                  HEADS,
                                  BartForCausalLM,
                                  BartForConditionalGeneration,
                                  BartForQuestionAnswering,
                                  BartForSequenceClassification,
                                  BartModel,
                                  head_class,
)
from bart_jax.model.stacks import BartDecoder, BartEncoder, shift_tokens_right

__all__ = [
    "HEADS", "BartDecoder", "BartEncoder", "BartForCausalLM", "BartForConditionalGeneration", "BartForQuestionAnswering",
    "BartForSequenceClassification", "BartModel", "head_class", "init_cache", "shift_tokens_right",
]
