"""Checkpoints: the Hugging Face ⇄ Flax name map (`conversion.py`), reading and writing files
(`files.py`) and hub ids (`hub.py`)."""
