"""Side-by-side benchmark: bart_jax (fp32, bf16, int8 with fp32 or bf16 activations) against
transformers (PyTorch eager and torch.compile) and CTranslate2 (fp32, int8), on the same random
weights, in one run.

Each system runs in its own worker process (so its peak memory is its own); the workloads are
interleaved across systems, repeat by repeat. Workloads, on a batch of random source ids:

    W1  beam search with bart-large-cnn's options, `target` tokens forced (min_length = max_length)
    W2  greedy search, `greedy_target` tokens forced
    W3  encoder forward (CTranslate2: encoder plus one greedy step, its smallest call)
    W4  training step: forward + backward + AdamW, decoder length `train_target`

Latency rows: W1 and W2 run again at each of `--latency-batches` (default 1 and 4 documents),
the same source length, right after the `--batch` row: the few-row regime of single requests is
measured beside the headline shape (`"latency": true` in their rows).

Before timing, the generating systems' token ids are compared with transformers'.
`bart-jax bench --help` lists the knobs; results go to a JSON lines file and a printed table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Optional, Sequence

from bart_jax.apps.benchmark.systems import (
    SHAPES,
    SUPPORTS,
    SYSTEMS,
    TINY_SHAPE,
    WORKLOADS,
    Setup,
    make_system,
    matmul_peak_gflops,
    model_flops,
)
from bart_jax.training.host_memory import keep_freed_host_memory, training_on_cpu


def stolen_cpu_seconds() -> Optional[float]:
    """CPU time the hypervisor gave to other guests so far, summed over this machine's CPUs
    (Linux's "steal" in /proc/stat); None where the system does not report it.

    On a shared virtual machine, a call during which others took CPU time ran slower for it:
    the benchmark reports the steal during each call next to its time.
    """
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if fields[0] == "cpu" and len(fields) > 8 else None
    except (OSError, ValueError, IndexError):
        return None


def peak_memory_mib() -> float:
    """This process's peak resident memory in MiB.

    Linux's VmHWM belongs to the process's own address space; `ru_maxrss` would also count the
    parent's resident memory at the fork that started this worker (its copy of the parent's pages).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


# glibc's malloc backs its large blocks with transparent huge pages (glibc >= 2.35 on Linux).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


@contextlib.contextmanager
def worker_environment(huge_pages: bool):
    """The environment workers start with: with `huge_pages`, GLIBC_TUNABLES gains
    `HUGE_PAGES_TUNABLE` (unless already set).

    Every XLA CPU execution allocates its temporary buffers anew (a bart-base W4 step: about
    4 GiB) and returns them after; in 4 KiB pages each is faulted in again on every step (about a
    million page faults). Huge pages make that 512x fewer faults (W4 7-12% faster, PyTorch's too).
    All systems get the same environment.
    """
    previous = os.environ.get("GLIBC_TUNABLES")
    if huge_pages and "glibc.malloc.hugetlb" not in (previous or ""):
        os.environ["GLIBC_TUNABLES"] = HUGE_PAGES_TUNABLE if previous is None else f"{previous}:{HUGE_PAGES_TUNABLE}"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("GLIBC_TUNABLES", None)
        else:
            os.environ["GLIBC_TUNABLES"] = previous


def worker(name: str, setup: Setup, training: bool, connection) -> None:
    """Runs one system: answers ("run", workload) with timing, tokens and peak memory.

    A training worker (W4) of bart_jax's starts as train.py does (`bart_jax.training.host_memory`).
    """
    if training and name.startswith("bart_jax") and training_on_cpu():
        keep_freed_host_memory()
    try:
        began = time.perf_counter()
        system = make_system(name, setup, training)
        connection.send(("ready", time.perf_counter() - began))
    except Exception as error:  # noqa: BLE001 - a missing optional system is reported, not fatal
        connection.send(("unavailable", f"{type(error).__name__}: {error}"))
        return
    while True:
        message = connection.recv()
        if message is None:
            return
        _, workload, batch = message
        stolen_before = stolen_cpu_seconds()
        began = time.perf_counter()
        _, tokens = system.run(workload, batch)
        elapsed = time.perf_counter() - began
        stolen_after = stolen_cpu_seconds()
        stolen = None if stolen_before is None or stolen_after is None else stolen_after - stolen_before
        peak_mib = peak_memory_mib()
        connection.send((elapsed, None if tokens is None else tokens.tolist(), peak_mib, stolen))


def start_workers(systems: Sequence[str], setup: Setup, training: bool, huge_pages: bool) -> dict:
    """{name: (process, connection)} of the `systems` that could start (the others reported)."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for name in systems:
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(name, setup, training, child), daemon=True)
        with worker_environment(huge_pages):
            process.start()
        status, detail = parent.recv()
        if status != "ready":
            print(f"{name}: unavailable ({detail})", file=sys.stderr)
            process.join()
            continue
        workers[name] = (process, parent)
    return workers


def stop_workers(workers: dict) -> None:
    for process, connection in workers.values():
        connection.send(None)
        process.join(timeout=10)


# --- preparing the weights ----------------------------------------------------------------
def prepare_model(shape: str, directory: str, seed: int, configs_dir: str, tokenizer_dir: Optional[str]) -> dict:
    """Writes a random-weight HF model (and its CTranslate2 conversion) to `directory`."""
    import torch
    import transformers

    if shape == "tiny":
        config = transformers.BartConfig(**TINY_SHAPE)
    else:
        config = transformers.BartConfig.from_pretrained(os.path.join(configs_dir, SHAPES[shape]))
    config.dropout = 0.0
    torch.manual_seed(seed)
    model = transformers.BartForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    if tokenizer_dir:
        for name in ("tokenizer.json", "vocab.json", "merges.txt"):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(directory, name))
        try:
            _convert_ctranslate2(directory)
        except Exception as error:  # noqa: BLE001 - CTranslate2 is optional
            print(f"CTranslate2 conversion skipped: {type(error).__name__}: {error}", file=sys.stderr)
    return config.to_dict()


def _convert_ctranslate2(directory: str) -> None:
    import ctranslate2.converters

    # CTranslate2's BART loader reads two fairseq-era config fields that transformers 5 no longer writes.
    source = os.path.join(directory, "ctranslate2-source")
    shutil.copytree(directory, source, ignore=shutil.ignore_patterns("ctranslate2*"))
    path = os.path.join(source, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(normalize_before=False, add_final_layer_norm=False)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    ctranslate2.converters.TransformersConverter(source).convert(os.path.join(directory, "ctranslate2"), force=True)
    shutil.rmtree(source)


# --- the run ------------------------------------------------------------------------------
LATENCY_WORKLOADS = ("W1", "W2")


def jobs(workloads: Sequence[str], batch: int, latency_batches: Sequence[int]) -> list[tuple[str, int]]:
    """(workload, batch) in the order they run: each workload at `batch`, W1 and W2 followed by
    their latency rows (each of `latency_batches` other than `batch`, once)."""
    extra = [size for size in dict.fromkeys(latency_batches) if size != batch]
    return [(workload, size) for workload in workloads
            for size in [batch] + (extra if workload in LATENCY_WORKLOADS else [])]


def run(args, on_workload=None) -> list[dict]:
    """Runs the benchmark `args` describes (see `build_parser`); `on_workload(rows)` receives
    each workload's result rows (one batch size) as soon as they are measured. A system whose
    worker dies (e.g. out of memory) is reported and left out of the remaining workloads."""
    if min([args.batch, *args.latency_batches]) < 1:
        raise ValueError(f"batch sizes must be positive, got --batch {args.batch} "
                         f"--latency-batches {' '.join(map(str, args.latency_batches))}")
    workdir = tempfile.mkdtemp(prefix="bart-jax-bench-")
    setup = Setup(workdir, args.batch, args.source_length, args.target, args.greedy_target, args.train_target,
                  args.seed, args.threads)
    config = prepare_model(args.shape, workdir, args.seed, args.configs_dir, args.tokenizer_dir)
    peak = matmul_peak_gflops()
    # Generation (W1-W3) and training (W4) run in workers of their own, as in use: a program
    # summarizes or trains. The generation workers end before training ones start.
    workers, training, results = {}, None, []
    for workload, batch in jobs(args.workloads, args.batch, args.latency_batches):
        if training != (workload == "W4"):
            stop_workers(workers)
            training = workload == "W4"
            phase = {w for w in args.workloads if (w == "W4") == training}
            systems = [name for name in args.systems if phase & set(SUPPORTS[name])]
            workers = start_workers(systems, setup, training, args.huge_pages)
        active = [name for name in workers if workload in SUPPORTS[name]]
        first, times, tokens, memory = {}, {name: [] for name in active}, {}, {}
        stolen = {name: [] for name in active}  # CPU steal during each call: the first call's, then the repeats'

        def call(name):
            try:
                return _call(workers[name][1], workload, batch)
            except (EOFError, OSError) as error:
                print(f"{name}: worker died during {workload} ({type(error).__name__}); left out",
                      file=sys.stderr)
                workers.pop(name)[0].join(timeout=10)
                active.remove(name)
                return None

        for name in list(active):  # first call: compilation / warm-up, timed separately
            answer = call(name)
            if answer is not None:
                first[name], tokens[name], memory[name], first_stolen = answer
                stolen[name].append(first_stolen)
        for _ in range(args.repeats):
            for name in list(active):
                answer = call(name)
                if answer is not None:
                    times[name].append(answer[0])
                    memory[name] = answer[2]
                    stolen[name].append(answer[3])
        reference = tokens.get("transformers")
        shape = dataclasses.replace(setup, batch=batch)
        flops = model_flops(config, workload, shape)
        for name in active:
            median = statistics.median(times[name])
            same = None
            if reference is not None and tokens.get(name) is not None:
                same = tokens[name] == reference
            # Tokens/s: generated tokens (W1, W2), source tokens encoded (W3), source and
            # target tokens trained on (W4).
            generated = {"W3": batch * setup.source_length,
                         "W4": batch * (setup.source_length + setup.train_target)}.get(workload, 0)
            if tokens.get(name) is not None:
                generated = sum(sum(1 for t in row[1:] if t != 1) for row in tokens[name])
            results.append({
                "workload": workload, "system": name, "shape": args.shape, "batch": batch,
                "latency": batch != args.batch,
                "source_length": args.source_length, "median_s": median, "min_s": min(times[name]),
                "max_s": max(times[name]), "first_call_s": first[name], "tokens_per_s": generated / median,
                "gflops": flops / median / 1e9, "peak_fraction": flops / median / 1e9 / peak,
                "peak_memory_mib": memory[name], "same_tokens_as_transformers": same,
                "machine_matmul_gflops": peak, "huge_pages": args.huge_pages,
                "first_call_stolen_s": stolen[name][0],
                "stolen_s": None if None in stolen[name] else statistics.median(stolen[name][1:]),
            })
        rows = [row for row in results if (row["workload"], row["batch"]) == (workload, batch)]
        for row in rows:
            row["speedup"] = {other["system"]: other["median_s"] / row["median_s"] for other in rows}
        if on_workload is not None:
            on_workload(rows)
    stop_workers(workers)
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def _call(connection, workload: str, batch: int):
    connection.send(("run", workload, batch))
    return connection.recv()


def format_table(results: list[dict]) -> str:
    lines = ["| workload | system | median s (min-max) | first call s | CPU stolen s | tokens/s | GFLOP/s | "
             "% peak | peak MiB | vs transformers | same ids |", "|" + "---|" * 11]
    for row in results:
        ratio = row["speedup"].get("transformers")
        workload = f"{row['workload']} (batch {row['batch']})" if row.get("latency") else row["workload"]
        stolen = ("" if row.get("stolen_s") is None
                  else f"{row['stolen_s']:.2f} (first {row['first_call_stolen_s']:.2f})")
        lines.append(
            f"| {workload} | {row['system']} | {row['median_s']:.2f} ({row['min_s']:.2f}-{row['max_s']:.2f}) "
            f"| {row['first_call_s']:.2f} | {stolen} | {row['tokens_per_s']:.1f} | {row['gflops']:.1f} "
            f"| {100 * row['peak_fraction']:.0f}% | {row['peak_memory_mib']:.0f} "
            f"| {'' if ratio is None else f'{ratio:.2f}x'} | {'' if row['same_tokens_as_transformers'] is None else row['same_tokens_as_transformers']} |"
        )
    return "\n".join(lines)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="bart-jax bench", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    parser.add_argument("--shape", choices=("tiny", *SHAPES), default="bart-base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latency-batches", type=int, nargs="*", default=[1, 4],
                        help="also run W1 and W2 at these batch sizes (default: 1 4; none: only --batch)")
    parser.add_argument("--source-length", type=int, default=512)
    parser.add_argument("--target", type=int, default=142, help="W1 forced length")
    parser.add_argument("--greedy-target", type=int, default=128, help="W2 forced length")
    parser.add_argument("--train-target", type=int, default=128, help="W4 decoder length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs-dir", default=os.path.join(here, "configs"))
    parser.add_argument("--tokenizer-dir", help="BART tokenizer files (needed for CTranslate2's vocabulary)")
    parser.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=False,
                        help=f"start every worker with GLIBC_TUNABLES={HUGE_PAGES_TUNABLE} (see worker_environment)")
    parser.add_argument("--output", default="benchmark.jsonl")
    return parser


def run_command(args) -> int:
    """`bart-jax bench`: runs the workloads, appends each one's rows to `args.output` as soon as
    it is measured, and prints the table."""

    def write(rows):
        with open(args.output, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    print(format_table(run(args, on_workload=write)))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
