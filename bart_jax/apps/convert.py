"""Command line for converting BART checkpoints (behind `convert_weights.py`).

    convert_weights.py SRC DST [--dtype float32|bfloat16] [--head NAME] [--overwrite]
        SRC: Hugging Face model directory or hub id -> DST: converted bart_jax directory
    convert_weights.py --to-hf SRC DST [--max-shard-size 2GB] [--overwrite]
        SRC: converted bart_jax directory -> DST: Hugging Face model directory

A DST that already holds a model (a config.json, weights, a converted directory) is refused
unless --overwrite is given; DST is never SRC. Errors are one line on standard error, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from bart_jax.checkpoints.files import DTYPES, convert_hf_directory, export_hf_directory, writing_destination
from bart_jax.checkpoints.hub import resolve_model_directory
from bart_jax.model.registry import HEAD_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert BART weights between Hugging Face and bart_jax formats.",
    )
    parser.add_argument("source", metavar="SRC",
                        help="Hugging Face model directory or hub id (with --to-hf: a bart_jax directory)")
    parser.add_argument("destination", metavar="DST", help="directory to write")
    parser.add_argument("--to-hf", action="store_true",
                        help="convert a bart_jax directory back to a Hugging Face directory")
    parser.add_argument("--dtype", choices=DTYPES, help="cast the floating-point weights (default: keep)")
    parser.add_argument("--head", choices=HEAD_NAMES, help="model head to convert to (default: config.architectures)")
    parser.add_argument("--max-shard-size", metavar="SIZE",
                        help="with --to-hf: split the safetensors weights into shards of at most SIZE (e.g. 2GB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model DST already holds (its config and weights); without it such a DST "
                             "is refused")
    return parser


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.to_hf and (args.dtype or args.head):
        parser.error("--dtype and --head apply when converting to bart_jax, not with --to-hf")
    if not args.to_hf and args.max_shard_size:
        parser.error("--max-shard-size applies with --to-hf")
    try:
        # Before the source is fetched or read: a DST that would be destroyed, or cannot be written, fails at once.
        with writing_destination(args.destination, overwrite=args.overwrite, source=args.source):
            if args.to_hf:
                head = export_hf_directory(args.source, args.destination, max_shard_size=args.max_shard_size,
                                           overwrite=args.overwrite)
            else:
                source = resolve_model_directory(args.source)
                head, unused = convert_hf_directory(source, args.destination, head=args.head, dtype=args.dtype,
                                                    overwrite=args.overwrite)
        if args.to_hf:
            print(f"wrote {head} in Hugging Face format to {args.destination}")
        else:
            if unused:
                print(f"note: dropped {len(unused)} checkpoint tensors {head} does not use: {', '.join(unused)}",
                      file=sys.stderr)
            print(f"wrote {head} in bart_jax format to {args.destination}")
    except (ValueError, OSError) as error:  # bad input or unwritable destination; no traceback
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0
