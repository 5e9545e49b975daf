"""The generation options the commands take (`bart-jax summarize`, `warmup`, `aot`), by flag."""

from __future__ import annotations

import argparse
from typing import Mapping

# flag -> (GenerationConfig field, type)
GENERATION_FLAGS = {
    "--num-beams": ("num_beams", int),
    "--num-return-sequences": ("num_return_sequences", int),
    "--max-length": ("max_length", int),
    "--max-new-tokens": ("max_new_tokens", int),
    "--min-length": ("min_length", int),
    "--min-new-tokens": ("min_new_tokens", int),
    "--length-penalty": ("length_penalty", float),
    "--no-repeat-ngram-size": ("no_repeat_ngram_size", int),
    "--repetition-penalty": ("repetition_penalty", float),
    "--temperature": ("temperature", float),
    "--top-k": ("top_k", int),
    "--top-p": ("top_p", float),
}


def chosen_options(args: argparse.Namespace, flags: Mapping[str, tuple[str, type]] = GENERATION_FLAGS) -> dict:
    """The GenerationConfig fields given on the command line among `flags`, with `--do-sample`."""
    options = {}
    for flag, (name, _) in flags.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            options[name] = value
    if getattr(args, "do_sample", None):
        options["do_sample"] = True
    return options
