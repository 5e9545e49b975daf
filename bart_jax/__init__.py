"""bart_jax: BART (Lewis et al., 2019) in JAX/Flax, numerically equal to Hugging Face transformers."""

from bart_jax.config import BartConfig
from bart_jax.model.cache import init_cache
from bart_jax.model.heads import (
    BartForCausalLM,
    BartForConditionalGeneration,
    BartForQuestionAnswering,
    BartForSequenceClassification,
    BartModel,
    shift_tokens_right,
)
from bart_jax.pretrained import PretrainedBart, load_pretrained
from bart_jax.tokenizer import BartTokenizer

__all__ = [
    "BartConfig",
    "BartForCausalLM",
    "BartForConditionalGeneration",
    "BartForQuestionAnswering",
    "BartForSequenceClassification",
    "BartModel",
    "BartTokenizer",
    "PretrainedBart",
    "init_cache",
    "load_pretrained",
    "shift_tokens_right",
]
