"""Text generation: greedy search, sampling and beam search with transformers' semantics.

`generate` drives a BART model; `search` and the logits processors know nothing about BART
and work with any `tokens_to_logits` function.
"""

from bart_jax.generation.config import GenerationConfig
from bart_jax.generation.generate import GenerationOutput, generate, generate_static, resolve_generation_config
from bart_jax.generation.logits_processors import build_logits_processors
from bart_jax.generation.search import SearchOutput, beam_search, greedy_search, sample_search, search

__all__ = [
    "GenerationConfig",
    "GenerationOutput",
    "SearchOutput",
    "beam_search",
    "generate",
    "generate_static",
    "greedy_search",
    "build_logits_processors",
    "resolve_generation_config",
    "sample_search",
    "search",
]
