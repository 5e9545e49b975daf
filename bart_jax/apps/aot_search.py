"""`bart-jax aot --find-max-batch`: the largest per-chip batch whose program compiles and fits the
chip's HBM, by doubling and then bisection.

Each attempt compiles in a process of its own (`bart-jax aot` for that one batch): libtpu's
compiler has ended its process on some shapes (a stack overflow in its own code), and such a
crash must end one attempt, not the search.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from typing import Any

# What the last lines of a crashed compiler's standard error may show in a result.
ERROR_TAIL_CHARACTERS = 600
_CRASH_LINES = r"\*\*\* SIG|Check failed|PC: @|Fatal|RESOURCE_EXHAUSTED"


def child_argv(args: argparse.Namespace, parser: argparse.ArgumentParser, **changes: Any) -> list[str]:
    """Command-line arguments that parse back to `args` with `changes` (by destination), without
    --find-max-batch."""
    argv = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "find_max_batch"):
            continue
        value = changes.get(action.dest, getattr(args, action.dest, None))
        flag = action.option_strings[-1]
        if action.nargs == 0:
            if value and value != action.default:
                argv.append(flag)
        elif value is not None and value != action.default:
            argv += [flag, *map(str, value if isinstance(value, list) else [value])]
    return argv


def compile_isolated(compiler, workload: str, per_chip: int, parser: argparse.ArgumentParser) -> dict:
    """`compiler.compile_tpu` of `workload` at `per_chip` rows per batch shard, in a child process;
    a crash of the compiler is a result that does not fit."""
    shapes = compiler.shapes(per_chip)
    argv = child_argv(compiler.args, parser, workload=[workload], batch_size=shapes.batch, json=True,
                      no_step_cost=True)
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "bart_jax", "aot", *argv], capture_output=True, text=True,
                            check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    record = compiler.describe(workload, shapes)
    ended = f"signal {-result.returncode}" if result.returncode < 0 else f"exit status {result.returncode}"
    # The crash's own lines (signal, failed check, where), else the end of standard error.
    lines = [line.strip() for line in result.stderr.splitlines() if re.search(_CRASH_LINES, line)]
    tail = (" | ".join(lines[:4]) or result.stderr.strip())[-ERROR_TAIL_CHARACTERS:]
    record.update(compiled=False, fits=False, compile_seconds=round(time.perf_counter() - began, 2),
                  error=f"the compiler's process ended without a result ({ended}): {tail}")
    return record


def find_max_batch(compiler, workload: str, parser: argparse.ArgumentParser) -> dict:
    """The largest per-chip batch (a multiple of --batch-granularity) whose program compiles and
    fits the chip's HBM: doubling from the start, then bisection of the bracket. Each bisection
    probe is where the memory of the two largest fitting batches, extended as a line, reaches the
    HBM (the midpoint when that is unknown, or after such a probe failed), so that a few compiles
    do. Returns the record of that batch with `max_per_chip_batch` and every attempt (`search`)."""
    args, step = compiler.args, max(1, compiler.args.batch_granularity)
    start = max(step, (args.batch_size or compiler.shards) // compiler.shards // step * step)
    tried, fitting = [], {}  # per-chip batch -> total bytes of those that fit
    best, first_failure = None, None

    def attempt(per_chip: int) -> bool:
        nonlocal best, first_failure
        record = compile_isolated(compiler, workload, per_chip, parser)
        total = (record.get("memory") or {}).get("total")
        tried.append({"per_chip_batch": per_chip, "fits": record["fits"], "total": total,
                      "error": None if record["compiled"] else record["error"][:200]})
        verdict = "fits" if record["fits"] else "does not fit" if record["compiled"] else "does not compile"
        size = "" if total is None else f" ({total / 2**30:.2f} GiB)"
        print(f"{workload}: {per_chip} per chip {verdict}{size}, {record['compile_seconds']} s", file=sys.stderr,
              flush=True)
        if record["fits"]:
            fitting[per_chip] = total
            if best is None or per_chip > best["per_chip_batch"]:
                best = record
        elif first_failure is None:
            first_failure = record
        return record["fits"]

    size, failing = start, None
    while failing is None and size <= args.max_per_chip_batch:
        if attempt(size):
            size *= 2
        else:
            failing = size
    low, high, interpolate = max(fitting, default=0), failing, True
    while high is not None and high - low > step:
        probe = _probe(fitting if interpolate else {}, low, high, step, compiler.chip.hbm_bytes)
        if attempt(probe):
            low = probe
        else:
            # A line that overshot once bisects next: the compiler's limit sits below the HBM.
            high, interpolate = probe, not interpolate
    record = best or first_failure
    if best is not None and workload == "generate":
        compiler.add_generation_cost(record, compiler.shapes(best["per_chip_batch"]))
    record["max_per_chip_batch"] = low
    record["search"] = tried
    return record


def _probe(fitting: dict, low: int, high: int, step: int, hbm_bytes: int) -> int:
    """The next batch to try strictly between `low` (fits) and `high` (does not)."""
    middle = (low + high) // 2 // step * step
    sizes = sorted(fitting)[-2:]
    if len(sizes) == 2 and fitting[sizes[1]] > fitting[sizes[0]]:
        slope = (fitting[sizes[1]] - fitting[sizes[0]]) / (sizes[1] - sizes[0])
        middle = int(sizes[1] + (hbm_bytes - fitting[sizes[1]]) / slope) // step * step
    return min(max(middle, low + step), high - step)
