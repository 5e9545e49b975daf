"""Converts BART checkpoints between Hugging Face and bart_jax formats; see `--help`."""

import sys

from bart_jax.apps.convert import main

if __name__ == "__main__":
    sys.exit(main())
