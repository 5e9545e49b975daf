"""Training BART: denoising pre-training and fine-tuning (seq2seq, classification, extractive QA).

`train(TrainingArguments(...))` runs or resumes a run; `main(argv)` is the command line
(`python train.py --help`).
"""

import json
import logging
import sys

from bart_jax.parallel.distributed import initialize_if_needed
from bart_jax.training.arguments import TrainingArguments, parse_arguments
from bart_jax.training.host_memory import keep_freed_host_memory, training_on_cpu
from bart_jax.training.loop import NonFiniteLossError, train
from bart_jax.training.noise import NoiseConfig, NoiseVocabulary, add_noise
from bart_jax.training.train_step import TrainState, make_eval_step, make_train_step

__all__ = [
    "NoiseConfig",
    "NoiseVocabulary",
    "NonFiniteLossError",
    "TrainState",
    "TrainingArguments",
    "add_noise",
    "main",
    "make_eval_step",
    "make_train_step",
    "parse_arguments",
    "train",
]


def main(argv=None) -> int:
    """The command line: parses options (recipe + flags), trains, prints the final metrics as JSON."""
    # Only bart_jax's messages at INFO: orbax and jax log a lot at that level.
    package_logger = logging.getLogger("bart_jax")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
        package_logger.propagate = False
    try:
        arguments = parse_arguments(argv)
        # Before any other JAX call: joins the run's other processes (TPU pod, GPU cluster, SLURM).
        initialize_if_needed(arguments.coordinator_address, arguments.num_processes, arguments.process_id)
        if training_on_cpu():
            keep_freed_host_memory()
        results = train(arguments)
    except (ValueError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # an unreadable or unwritable path: one line naming it
        print(f"error: {error.filename}: {error.strerror}" if error.filename else f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(results, sort_keys=True))
    return 0
