"""The persistent XLA compilation cache: a second process loads compiled executables from
disk instead of compiling again."""

from __future__ import annotations

import os

import jax


def enable_persistent_cache(directory: str) -> str:
    """Stores and reuses every compiled executable under `directory` (created if needed)."""
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache everything: generation loops compile in seconds, but are loaded in milliseconds.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory
