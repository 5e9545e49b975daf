"""The `bart-jax` command (also `python -m bart_jax`): summarize, warmup, fill-mask,
zero-shot, qa, bench, aot and convert."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import jax.numpy as jnp

from bart_jax.apps import aot, benchmark, pipelines, summarize_job
from bart_jax.apps.compilation_cache import enable_persistent_cache
from bart_jax.apps.convert import main as convert_main
from bart_jax.apps.generation_flags import GENERATION_FLAGS, chosen_options
from bart_jax.apps.summarize import LENGTH_BUCKETS, SummaryStats, iter_summaries, source_limit, warmup
from bart_jax.model import quantization
from bart_jax.model.kernels import KERNELS
from bart_jax.pretrained import load_pretrained

DEFAULT_MODEL = "facebook/bart-large-cnn"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "bart_jax", "xla")



def _early_stopping(value: str):
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "never":
        return "never"
    raise argparse.ArgumentTypeError("early stopping is true, false or never")


def _add_model_arguments(parser: argparse.ArgumentParser, default: Optional[str] = DEFAULT_MODEL) -> None:
    parser.add_argument("--model", default=default, required=default is None,
                        help="hub id, Hugging Face directory or converted bart_jax directory (default: %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="computation dtype (weights stay float32)")
    parser.add_argument("--quantize", choices=tuple(quantization.MODES),
                        help="int8 weights for inference: int8 (inputs quantized per row too, int8 products) or "
                             "int8-weights (weight-only); see docs/performance.md for speed and quality")
    parser.add_argument("--quantize-layers", nargs="+", choices=quantization.LAYERS,
                        help="which weights --quantize stores as int8 (default: "
                             f"{' '.join(quantization.DEFAULT_LAYERS)}); vocabulary: embeddings and LM head")
    parser.add_argument("--kernels", choices=KERNELS, default="auto",
                        help="backend formulations: those of the platform the model runs on (auto), the plain JAX "
                             "ones every backend runs (portable), the CPU-tuned ones, or the TPU ones (Pallas flash "
                             "attention); results agree")
    parser.add_argument("--compilation-cache", default=os.environ.get("BART_JAX_COMPILATION_CACHE", DEFAULT_CACHE_DIR),
                        help="persistent XLA compilation cache directory (default: %(default)s)")
    parser.add_argument("--no-compilation-cache", action="store_true", help="do not use the persistent cache")


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (defaults: the model's generation_config.json)")
    for flag, (_, kind) in GENERATION_FLAGS.items():
        group.add_argument(flag, type=kind)
    group.add_argument("--early-stopping", type=_early_stopping)
    group.add_argument("--do-sample", action="store_true", default=None)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--max-source-length", type=int, help="truncate documents to this many tokens")


def generation_options(args: argparse.Namespace) -> dict:
    options = chosen_options(args)
    if args.early_stopping is not None:
        options["early_stopping"] = args.early_stopping
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bart-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    summarize = commands.add_parser("summarize", help="summarize documents (files, standard input, datasets)")
    summarize_job.add_arguments(summarize)
    _add_model_arguments(summarize)
    _add_generation_arguments(summarize)

    warmup = commands.add_parser("warmup", help="compile generation for every bucket shape ahead of time")
    warmup.add_argument("--lengths", type=_positive_int, nargs="+", help="source length buckets (default: all)")
    summarize_job.add_mesh_argument(warmup)
    _add_model_arguments(warmup)
    _add_generation_arguments(warmup)

    fill = commands.add_parser("fill-mask", help="fill the <mask> tokens of a text")
    fill.add_argument("text")
    fill.add_argument("--top-k", type=int, default=5)
    _add_model_arguments(fill, default="facebook/bart-large")

    zero_shot = commands.add_parser("zero-shot", help="zero-shot classification with an MNLI model")
    zero_shot.add_argument("text")
    zero_shot.add_argument("--labels", required=True, help="comma-separated candidate labels")
    zero_shot.add_argument("--hypothesis-template", default="This example is {}.")
    zero_shot.add_argument("--multi-label", action="store_true")
    _add_model_arguments(zero_shot, default="facebook/bart-large-mnli")

    qa = commands.add_parser("qa", help="extract the answer to a question from a context")
    qa.add_argument("question")
    qa.add_argument("context")
    _add_model_arguments(qa, default=None)

    benchmark.build_parser(commands.add_parser("bench", help="benchmark against transformers and CTranslate2"))
    aot.build_parser(commands.add_parser("aot", help="compile for a TPU topology (or lower for CUDA) this machine "
                                                     "lacks: memory per chip, FLOPs, roofline estimate"))

    convert = commands.add_parser("convert", help="convert checkpoints (same arguments as convert_weights.py)",
                                  add_help=False)
    convert.add_argument("arguments", nargs=argparse.REMAINDER)
    return parser


def _load(args):
    if not args.no_compilation_cache:
        enable_persistent_cache(os.path.expanduser(args.compilation_cache))
    return load_pretrained(args.model, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
                           kernels=args.kernels, mesh=summarize_job.job_mesh(getattr(args, "mesh", "none")),
                           quantize=args.quantize, quantize_layers=args.quantize_layers)


def summary_settings(args: argparse.Namespace) -> dict:
    """What a summary depends on besides its document; a resumed job must use the same."""
    model = os.path.realpath(args.model) if os.path.isdir(args.model) else args.model
    return {"options": generation_options(args), "seed": args.seed, "max_source_length": args.max_source_length,
            "model": model, "dtype": args.dtype, **_quantize_settings(args)}


def _quantize_settings(args: argparse.Namespace) -> dict:
    """--quantize and its layers, when given (absent otherwise, so that float jobs keep their settings)."""
    if args.quantize is None:
        return {}
    return {"quantize": args.quantize, "quantize_layers": list(quantization.check_quantize(
        args.quantize, args.quantize_layers)[1])}


def run_summarize(args) -> int:
    # `_load` and `iter_summaries` are looked up when called, so that tests can stand in for them.
    return summarize_job.run(args, lambda: _load(args), lambda *a, **k: iter_summaries(*a, **k),
                             summary_settings(args), generation_options(args))


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def run_warmup(args) -> int:
    model = _load(args)
    limit = source_limit(model, args.max_source_length)
    too_long = [length for length in args.lengths or () if length > limit]
    if too_long:
        raise ValueError(f"--lengths {too_long} exceed the model's limit of {limit} tokens")
    lengths = args.lengths or sorted({min(size, limit) for size in LENGTH_BUCKETS})
    began, stats = time.perf_counter(), SummaryStats()
    count = warmup(model, args.batch_size, lengths, stats=stats, **generation_options(args))
    print(f"compiled {count} shapes in {time.perf_counter() - began:.1f} s ({stats.compiles} compiled, "
          f"{stats.cache_hits} loaded from the compilation cache)", file=sys.stderr)
    return 0


def run_pipeline(args) -> int:

    model = _load(args)
    if args.command == "fill-mask":
        result = pipelines.fill_mask(model, args.text, top_k=args.top_k)
    elif args.command == "zero-shot":
        result = pipelines.zero_shot_classify(model, args.text, args.labels, args.hypothesis_template, args.multi_label)
    else:
        result = pipelines.answer_question(model, args.question, args.context)
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0


def describe_os_error(error: OSError) -> str:
    """One line naming the path of a failed file operation."""
    if error.filename is None:
        return str(error)
    return f"{error.filename}: {error.strerror or error}"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        return convert_main(argv[1:])
    args = build_parser().parse_args(argv)
    runners = {"summarize": run_summarize, "warmup": run_warmup, "bench": benchmark.run_command,
               "aot": aot.run_command}
    try:
        return runners.get(args.command, run_pipeline)(args)
    except ValueError as error:
        print(f"bart-jax {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an unreadable or unwritable path: one line naming it, no traceback
        print(f"bart-jax {args.command}: error: {describe_os_error(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
