"""`bart-jax bench`: bart_jax side by side with transformers and CTranslate2 (`runner.py`), on
the systems of `systems.py`."""

from bart_jax.apps.benchmark.runner import (
                                            HUGE_PAGES_TUNABLE,
                                            build_parser,
                                            format_table,
                                            main,
                                            peak_memory_mib,
                                            run,
                                            run_command,
                                            stolen_cpu_seconds,
                                            worker_environment,
)
from bart_jax.apps.benchmark.systems import SHAPES, SYSTEMS, WORKLOADS, Setup, make_system, model_flops

__all__ = [
    "HUGE_PAGES_TUNABLE", "SHAPES", "SYSTEMS", "WORKLOADS", "Setup", "build_parser", "format_table", "main",
    "make_system", "model_flops", "peak_memory_mib", "run", "run_command", "stolen_cpu_seconds", "worker_environment",
]
