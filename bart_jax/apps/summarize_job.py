"""`bart-jax summarize`: its arguments and the job (read, summarize, write, score, report).

Documents are read and summarized in windows of `--window` documents (sorted by length within
each window), so that memory stays flat however long the input is; results are written as they
are produced (in input order within each window on standard output), and the output file is
put in input order at the end. On several local devices the job runs data parallel by default
(`--mesh`). On several hosts (`--num-processes`, `--distributed`) each process summarizes its
own share into its own part of the output, and the parts are merged at the end (summarize_hosts.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Iterator, Optional

import jax
from tqdm import tqdm

from bart_jax import parallel
from bart_jax.apps import document_io, inputs, outputs, summarize_hosts
from bart_jax.apps.scores import RougeAccumulator
from bart_jax.apps.summarize import LENGTH_BUCKETS, SummaryStats, params_mesh, source_limit, warmup
from bart_jax.apps.summarize_hosts import Hosts

DEFAULT_WINDOW = 10_000
MESH_CHOICES = ("auto", "none", *parallel.PRESETS)
WARNINGS_SHOWN = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The summarize command's own arguments (model and generation arguments are cli.py's)."""
    parser.add_argument("input", nargs="?",
                        help="documents: .txt (one per line), .jsonl, .csv, .tsv, .parquet, .arrow, a directory "
                             "saved by datasets' save_to_disk, or - for standard input")
    parser.add_argument("--dataset-name", help="read a Hugging Face hub dataset instead (needs `datasets`)")
    parser.add_argument("--dataset-config", help="the dataset's configuration (e.g. 3.0.0 for cnn_dailymail)")
    parser.add_argument("--split", help="the split of a hub dataset (default: test) or of a saved DatasetDict")
    parser.add_argument("--text-field", help="field holding the text (default: text, document or article)")
    parser.add_argument("--id-field", help="field holding an id to keep with each result (default: id, if any)")
    parser.add_argument("--reference-field", help="field holding a reference summary: score ROUGE against it")
    parser.add_argument("--strict", action="store_true", help="stop at an invalid JSON line instead of skipping it")
    parser.add_argument("-o", "--output", help="output file (default: JSON lines on standard output)")
    parser.add_argument("--output-format", choices=outputs.FORMATS,
                        help="jsonl, parquet or csv (default: from the output's name, else jsonl)")
    parser.add_argument("--output-ids", action="store_true", help="also write the generated token ids")
    parser.add_argument("--metrics-output", help="write the final report (and ROUGE scores) to this JSON file")
    parser.add_argument("--resume", action="store_true", help="skip documents already in --output")
    parser.add_argument("--warmup", action="store_true", help="compile every bucket shape before starting")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help="documents read, sorted by length and summarized at a time (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true")
    add_mesh_argument(parser)
    summarize_hosts.add_arguments(parser)


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", choices=MESH_CHOICES, default="auto",
                        help="device mesh over this host's devices (bart_jax.parallel.PRESETS); auto: data "
                             "parallel where there are several devices, none: one device")


def job_mesh(name: Optional[str]) -> Optional[jax.sharding.Mesh]:
    """The mesh of `--mesh` over this process's devices (None: one device)."""
    if name in (None, "auto"):
        name = "data" if jax.local_device_count() > 1 else "none"
    if name == "none":
        return None
    return parallel.preset_mesh(name, devices=jax.local_devices())


def _windows(documents, size: int) -> Iterator[list[inputs.Document]]:
    window = []
    for document in documents:
        window.append(document)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _bucket_lengths(model, max_source_length: Optional[int]) -> list[int]:
    limit = source_limit(model, max_source_length)
    return sorted({min(size, limit) for size in LENGTH_BUCKETS})


def run(args: argparse.Namespace, load: Callable, summaries: Callable, settings: dict, options: dict) -> int:
    """Runs the job of `args`: `load()` gives the model, `summaries` is `iter_summaries`,
    `settings` what the summaries depend on (hashed into each record), `options` the
    generation options."""
    if args.window < 1:
        raise ValueError(f"--window must be positive, got {args.window}")
    hosts = summarize_hosts.identify(args)
    if hosts.several and not args.output:
        raise ValueError(f"{hosts.count} processes cannot share standard output; name the output with -o "
                         f"(each process writes its part next to it, merged at the end)")
    fmt = outputs.output_format(args.output, args.output_format)
    # Several processes: this one writes JSON lines to its own part, which is its journal.
    written = hosts.part(args.output) if hosts.several else args.output
    journal = written if hosts.several else outputs.journal_path(args.output, fmt) if args.output else None
    lock = None
    if args.metrics_output and not os.path.isdir(os.path.dirname(os.path.abspath(args.metrics_output))):
        raise ValueError(f"--metrics-output {args.metrics_output} cannot be written: its directory does not exist")
    if args.output:
        # Before any work: an output that cannot be written, or that another job is writing, fails at once.
        document_io.check_output(args.output, args.input, journal)
        if hosts.several:
            document_io.check_output(written, args.input)
        lock = document_io.OutputLock(written)
        try:
            if hosts.several:
                summarize_hosts.check_part(args.output, hosts, args.resume)
            elif args.resume and journal != args.output and not os.path.exists(journal) and \
                    os.path.exists(args.output):
                raise ValueError(f"{args.output} is complete (there is no {journal} to resume from); "
                                 f"drop --resume to write it again")
        except BaseException:
            lock.release()
            raise
    source = None
    try:
        source = inputs.open_documents(args.input, args.text_field, args.id_field, args.reference_field,
                                       args.strict, dataset_name=args.dataset_name,
                                       dataset_config=args.dataset_config, split=args.split)
        return _run(args, hosts, source, fmt, journal, load, summaries, settings, options)
    finally:
        if source is not None:
            source.close()
        if lock is not None:
            lock.release()


def _run(args, hosts: Hosts, source, fmt, journal, load, summaries, settings, options) -> int:
    settings_hash = document_io.options_hash(settings)
    documents = summarize_hosts.Share(source, hosts) if hosts.several else source
    done = document_io.read_done(journal) if journal and args.resume else {}
    if done:
        document_io.check_done(journal if hosts.several else args.output, done, documents, settings_hash)
    model = load()
    if args.warmup:
        began, warmed = time.perf_counter(), SummaryStats()
        count = warmup(model, args.batch_size, _bucket_lengths(model, args.max_source_length), stats=warmed,
                       **options)
        print(f"warmup: {count} shapes in {time.perf_counter() - began:.1f} s ({warmed.compiles} compiled, "
              f"{warmed.cache_hits} loaded from the compilation cache)", file=sys.stderr)

    if hosts.several:
        summarize_hosts.withdraw_part(args.output, hosts)
    writer = document_io.ResultWriter(journal, resume=args.resume) if args.output else None
    stats = SummaryStats()
    scorer = RougeAccumulator(seed=args.seed) if args.reference_field else None
    missing_references = 0
    started = time.perf_counter()
    total_todo = None if documents.size is None else max(documents.size - len(done), 0)
    progress = tqdm(total=total_todo, unit="doc", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)

    def on_batch(count: int, tokens: int) -> None:
        elapsed = max(time.perf_counter() - started, 1e-9)
        progress.update(count)
        progress.set_postfix(docs_per_s=f"{stats.documents / elapsed:.2f}",
                             tokens_per_s=f"{stats.generated_tokens / elapsed:.1f}")

    def score(window: list, texts: dict[int, str]) -> None:
        # In input order: the bootstrap interval depends on the order of the scores.
        nonlocal missing_references
        for document in window if scorer is not None else ():
            if document.reference is None:
                missing_references += 1
            else:
                scorer.add(texts[document.index], document.reference)

    total = 0
    try:
        for window in _windows(documents, args.window):
            total += len(window)
            produced = {d.index: done[d.index].get("summary", "") for d in window if d.index in done}
            todo = [document for document in window if document.index not in done]
            # Standard output: in input order within the window, as soon as that order allows.
            sink = writer or document_io.OrderedWriter(sys.stdout, (document.index for document in todo))
            generated = summaries(model, [d.text for d in todo], args.batch_size, args.max_source_length, args.seed,
                                  stats, on_batch, details=True, **options) if todo else ()
            for position, summary in generated:
                document = todo[position]
                record = outputs.make_record(document, summary, settings_hash, args.output_ids)
                sink.write(record)
                produced[document.index] = record["summary"]
            score(window, produced)
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    if hosts.several:
        summarize_hosts.finish_part(args.output, hosts, documents, settings_hash)
    elif args.output:
        outputs.finalize_output(args.output, fmt, total)
    report = _report(stats, time.perf_counter() - started, len(done), source.counts)
    mesh = params_mesh(model.params) if hasattr(model, "params") else None
    report["mesh"] = None if mesh is None else dict(mesh.shape)
    if scorer is not None:
        report["rouge"] = scorer.result()
        report["missing_references"] = missing_references
    print("summary: " + json.dumps(report), file=sys.stderr)
    if args.metrics_output:
        metrics = summarize_hosts.report_path(args.metrics_output, hosts)
        temporary = metrics + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(temporary, metrics)
    _warn(stats, source.counts, missing_references)
    if hosts.several:
        _merge(args, hosts, fmt)
    return 0


def _merge(args, hosts: Hosts, fmt: str) -> None:
    """Process 0 waits for every part and merges them; the others merge if theirs completes the set."""
    timeout = args.merge_timeout if hosts.index == 0 else 0.0
    if hosts.index == 0:
        summarize_hosts.note(f"part {hosts.part(args.output)} complete; waiting up to {timeout:g} s for the "
                             f"other parts to merge them into {args.output}")
    if summarize_hosts.merge(args.output, fmt, hosts, timeout):
        summarize_hosts.note(f"merged the {hosts.count} parts into {args.output}")
    else:
        summarize_hosts.note(f"part {hosts.part(args.output)} complete; {args.output} is merged by the last "
                             f"process to complete its part (or process 0)")


def _report(stats: SummaryStats, wall: float, skipped: int, counts: inputs.ReadCounts) -> dict:
    seconds = max(wall, 1e-9)
    return {
        "documents": stats.documents, "skipped_by_resume": skipped, "empty": stats.empty,
        "truncated": stats.truncated, "replaced_bytes_lines": counts.replaced_bytes_lines,
        "invalid_lines": counts.invalid_lines, "source_tokens": stats.source_tokens,
        "generated_tokens": stats.generated_tokens, "padded_source_tokens": stats.padded_source_tokens,
        "padding_efficiency": round(stats.padding_efficiency, 4), "wall_seconds": round(wall, 2),
        "documents_per_second": round(stats.documents / seconds, 3),
        "source_tokens_per_second": round(stats.source_tokens / seconds, 1),
        "generated_tokens_per_second": round(stats.generated_tokens / seconds, 1),
        "compiles": stats.compiles, "cache_hits": stats.cache_hits, "batches": stats.batches,
        "shapes": sorted(stats.shapes), "devices": jax.local_device_count(),
        # How busy the devices were: the share of the wall time spent in generation calls, and
        # each local device's peak memory where its backend reports it (GPU, TPU; not the CPU).
        "generation_seconds": round(stats.seconds, 2), "generation_share": round(stats.seconds / seconds, 3),
        "device_peak_memory_bytes": _device_peak_memory(),
    }


def _device_peak_memory() -> Optional[list[int]]:
    """Peak bytes in use of each local device, or None where the backend does not report them."""
    peaks = []
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        peaks.append(int(stats["peak_bytes_in_use"]))
    return peaks


def _warn(stats: SummaryStats, counts: inputs.ReadCounts, missing_references: int) -> None:
    for line in counts.warnings[:WARNINGS_SHOWN]:
        print(f"warning: {line}", file=sys.stderr)
    if len(counts.warnings) > WARNINGS_SHOWN:
        print(f"warning: ... and {len(counts.warnings) - WARNINGS_SHOWN} more", file=sys.stderr)
    for count, message in ((stats.empty, "empty documents got empty summaries"),
                           (stats.truncated, "documents were longer than the model's input and were truncated"),
                           (counts.replaced_bytes_lines, "lines had bytes that are not UTF-8; they were replaced"),
                           (counts.invalid_lines, "invalid lines were skipped (--strict stops at the first)"),
                           (missing_references, "documents had no reference and were not scored")):
        if count:
            print(f"warning: {count} {message}", file=sys.stderr)
