"""`bart-jax aot`: compiles BART's workloads ahead of time for accelerators this machine does not
have, and reports what the compiler says of them.

    --platform tpu    libtpu's compiler (`pip install "jax[tpu]"`, no TPU needed) compiles for a
                      TPU topology (`jax.experimental.topologies`); the executable's memory
                      analysis gives the bytes per chip, its cost analysis the FLOPs and bytes
                      accessed, and the chip's published figures a roofline estimate.
    --platform cuda   `jax.export` lowers for CUDA: whether the program lowers, and the custom
                      calls it would make. Nothing is compiled (no CUDA compiler here).

Nothing the size of the model is allocated: parameters, optimizer state and batches are
`jax.ShapeDtypeStruct`s. Figures are the compiler's estimates, not measured times (docs/aot.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Optional

import jax
import jax.numpy as jnp

from bart_jax import parallel
from bart_jax.apps.aot_report import cost_report, memory_report, roofline, text_line
from bart_jax.apps.aot_search import find_max_batch
from bart_jax.apps.chips import chip_for, parse_topology
from bart_jax.apps.generation_flags import GENERATION_FLAGS, chosen_options
from bart_jax.config import BartConfig
from bart_jax.generation.config import GenerationConfig
from bart_jax.generation.generate import resolve_generation_config
from bart_jax.model.heads import BartForConditionalGeneration
from bart_jax.model.kernels import KERNELS, for_platform
from bart_jax.model.layers import REMAT_POLICIES
from bart_jax.model.quantization import MODES

if TYPE_CHECKING:
    from bart_jax.apps.aot_programs import Shapes

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
PLATFORMS = ("tpu", "cuda")
WORKLOADS = ("encode", "forward", "generate", "train")
# The generation options that change a compiled program's shapes or work (sampling's do not).
AOT_GENERATION_FLAGS = {flag: GENERATION_FLAGS[flag] for flag in (
    "--num-beams", "--num-return-sequences", "--max-length", "--max-new-tokens", "--min-length", "--min-new-tokens",
    "--length-penalty", "--no-repeat-ngram-size")}
MAX_ERROR_CHARACTERS = 2000


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="bart-jax aot", description=__doc__)
    parser.add_argument("--platform", choices=PLATFORMS, default="tpu")
    parser.add_argument("--topology", default="v5e:2x4",
                        help="TPU topology as libtpu names it (v5e:2x4, v6e:2x4, v5p:2x2x1, v4:2x2x1) or an "
                             "accelerator type (v5e-8, v6e-8, v5p-8); default: %(default)s")
    parser.add_argument("--num-slices", type=int, default=1, help="TPU slices (multislice); default: 1")
    parser.add_argument("--preset", default="bart-large-cnn",
                        help="a directory of configs/ (bart-base, bart-large-cnn, ...) or a model directory "
                             "with config.json; default: %(default)s")
    parser.add_argument("--workload", nargs="+", choices=WORKLOADS + ("all",), default=["generate"],
                        help="one or more of %(choices)s; default: generate")
    parser.add_argument("--mesh", default="data",
                        help=f"a sharding preset ({', '.join(parallel.PRESETS)}) or sizes such as "
                             "data=2,tensor=4; default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch (rows); default: one row per batch shard")
    parser.add_argument("--source-length", type=int, default=1024)
    parser.add_argument("--target-length", type=int, default=128, help="decoder tokens of forward and train")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="computation dtype")
    parser.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype the weights are kept in (training keeps float32)")
    parser.add_argument("--scan-layers", action="store_true", help="each layer stack as one scan")
    parser.add_argument("--remat-policy", choices=REMAT_POLICIES, default="none", help="layer rematerialisation")
    parser.add_argument("--accumulation-steps", type=int, default=1, help="micro-batches of the train step")
    parser.add_argument("--quantize", choices=tuple(MODES), default=None,
                        help="int8 weights, as load_pretrained(..., quantize=...) holds them (inference workloads)")
    parser.add_argument("--kernels", choices=KERNELS, default="auto",
                        help="backend formulations compiled: those of --platform (auto; on TPU the Pallas flash "
                             "attention), or one policy, e.g. portable to compare; default: %(default)s")
    group = parser.add_argument_group("generation (defaults: the preset's generation_config.json)")
    for flag, (_, kind) in AOT_GENERATION_FLAGS.items():
        group.add_argument(flag, type=kind)
    group.add_argument("--do-sample", action="store_true", default=None)
    search = parser.add_argument_group("batch search (TPU)")
    search.add_argument("--find-max-batch", action="store_true",
                        help="the largest per-chip batch whose program fits in the chip's HBM (doubling, then "
                             "bisection); --batch-size sets where it starts")
    search.add_argument("--batch-granularity", type=int, default=1, help="per-chip batches searched are multiples")
    search.add_argument("--max-per-chip-batch", type=int, default=4096, help="where doubling stops")
    parser.add_argument("--json", action="store_true", help="one JSON line per workload (default: text)")
    # The batch search's own compiles leave generation's decoder step to the end.
    parser.add_argument("--no-step-cost", action="store_true", help=argparse.SUPPRESS)
    return parser


def generation_overrides(args: argparse.Namespace) -> dict:
    return chosen_options(args, AOT_GENERATION_FLAGS)


def preset_directory(preset: str) -> str:
    """`preset` as a directory of configs/, else as a path; ValueError if it holds no config.json."""
    for directory in (os.path.join(CONFIGS_DIR, preset), preset):
        if os.path.isfile(os.path.join(directory, "config.json")):
            return directory
    names = []
    if os.path.isdir(CONFIGS_DIR):
        names = sorted(name for name in os.listdir(CONFIGS_DIR)
                       if os.path.isfile(os.path.join(CONFIGS_DIR, name, "config.json")))
    raise ValueError(f"preset {preset!r} is neither a directory of configs/ ({', '.join(names)}) nor a directory "
                     "with config.json")


def load_preset(preset: str) -> tuple[BartConfig, GenerationConfig]:
    directory = preset_directory(preset)
    config = BartConfig.from_pretrained(directory)
    if os.path.isfile(os.path.join(directory, "generation_config.json")):
        return config, GenerationConfig.from_pretrained(directory)
    return config, GenerationConfig.from_model_config(config)


def parse_mesh(text: str, devices) -> jax.sharding.Mesh:
    """A preset name ("data", "fsdp+tensor", ...) or "data=2,fsdp=4" (one size may be -1)."""
    if text in parallel.PRESETS:
        return parallel.preset_mesh(text, devices)
    sizes = {}
    for item in text.split(","):
        name, separator, value = item.partition("=")
        if not separator or name.strip() not in parallel.MESH_AXES or not re.fullmatch(r"-?\d+", value.strip()):
            raise ValueError(f"--mesh {text!r}: name a preset ({', '.join(parallel.PRESETS)}) or give sizes as "
                             "data=2,fsdp=2,tensor=2")
        sizes[name.strip()] = int(value)
    return parallel.make_mesh(**sizes, devices=devices)


def _programs():
    # Imported when a program is built: the training modules stay out of other commands' start-up.
    from bart_jax.apps import aot_programs

    return aot_programs


def _error_text(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= MAX_ERROR_CHARACTERS else text[:MAX_ERROR_CHARACTERS] + " ..."


class Compiler:
    """Compiles workloads of one model for one target (a TPU topology's mesh, or CUDA export)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.config, base_generation = load_preset(args.preset)
        self.chip = chip_for(args.platform, args.topology)
        self.module = BartForConditionalGeneration(
            self.config, dtype=jnp.dtype(args.dtype), param_dtype=jnp.dtype(args.param_dtype),
            scan_layers=args.scan_layers, remat_policy=args.remat_policy,
            kernels=for_platform(args.platform) if args.kernels == "auto" else args.kernels)
        self.overrides = generation_overrides(args)
        self.generation_config = resolve_generation_config(self.module, base_generation, **self.overrides)
        self.mesh = None
        if args.platform == "tpu":
            topology = parse_topology(args.topology)
            self.topology = topology.topology_name
            self.mesh = parse_mesh(args.mesh, topology.describe(args.num_slices).devices)
            self.shards = parallel.batch_shards(self.mesh)
        else:
            self.topology, self.shards = None, 1

    def describe(self, workload: str, shapes: Shapes) -> dict:
        record = {"workload": workload, "platform": self.args.platform, "preset": self.args.preset,
                  "dtype": self.args.dtype, "param_dtype": self.args.param_dtype,
                  "batch_size": shapes.batch,
                  "per_chip_batch": shapes.batch // self.shards if shapes.batch % self.shards == 0 else
                  shapes.batch / self.shards,
                  "source_length": shapes.source_length, "kernels": self.module.kernels}
        if self.args.quantize:
            record["quantize"] = self.args.quantize
        if workload in ("forward", "train"):
            record["target_length"] = shapes.target_length
        if workload == "train":
            record.update(accumulation_steps=shapes.accumulation_steps, scan_layers=self.args.scan_layers,
                          remat_policy=self.args.remat_policy)
        if workload == "generate":
            config = self.generation_config
            record["generation"] = {"num_beams": config.num_beams, "max_length": config.max_length,
                                    "min_length": config.min_length, "do_sample": config.do_sample,
                                    "num_return_sequences": config.num_return_sequences}
        if self.mesh is not None:
            record.update(topology=self.topology, chip=self.chip.name, devices=self.mesh.size,
                          mesh={axis: int(size) for axis, size in self.mesh.shape.items()})
        return record

    def shapes(self, per_chip_batch: Optional[int] = None) -> Shapes:
        args = self.args
        batch = args.batch_size or self.shards
        if per_chip_batch is not None:
            batch = per_chip_batch * self.shards
        return _programs().Shapes(batch, args.source_length, args.target_length, args.accumulation_steps)

    def program(self, workload: str, shapes: Shapes, mesh: Optional[jax.sharding.Mesh]):
        return _programs().build_program(workload, self.module, shapes, mesh, self.generation_config,
                                         self.args.quantize)

    def compile_tpu(self, workload: str, shapes: Shapes, step_cost: bool = True) -> dict:
        """Compiles `workload` for the topology: whether it compiled (or the compiler's error),
        memory per chip, cost and the roofline estimate. `step_cost`: for generate, also compile
        one decoder step to count the loop's tokens (`add_generation_cost`)."""
        record = self.describe(workload, shapes)
        began = time.perf_counter()
        try:
            compiled = self.program(workload, shapes, self.mesh).lower_for_mesh(self.mesh).compile()
        except Exception as error:  # the compiler's verdict (out of memory, unsupported op) is the result
            record.update(compiled=False, error=_error_text(error),
                          compile_seconds=round(time.perf_counter() - began, 2), fits=False)
            return record
        record.update(compiled=True, error=None, compile_seconds=round(time.perf_counter() - began, 2))
        record["memory"] = memory_report(compiled.memory_analysis(), self.chip)
        record["fits"] = record["memory"]["fits"]
        # Kernels the program calls (the Pallas flash attention is a "tpu_custom_call").
        calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text() or ""))
        record["custom_calls"] = dict(sorted(calls.items()))
        record["cost"] = cost_report(compiled.cost_analysis())
        record["roofline"] = roofline(record["cost"], self.chip, self.rows(workload, shapes))
        if workload == "generate" and step_cost:
            self.add_generation_cost(record, shapes)
        return record

    @staticmethod
    def rows(workload: str, shapes: Shapes) -> int:
        """Rows one call processes: documents, or training examples of all micro-batches."""
        return shapes.batch * shapes.accumulation_steps if workload == "train" else shapes.batch

    def add_generation_cost(self, record: dict, shapes: Shapes) -> None:
        """The generation loop's cost: XLA's cost analysis counts the body of a while loop once,
        so each further token adds one decoder step (compiled on its own), as if every row ran
        to max_length."""
        whole = record["cost"]
        steps = self.generation_config.max_length - 2  # the decoder start token, and the step counted
        try:
            compiled = self.program("decode", shapes, self.mesh).lower_for_mesh(self.mesh).compile()
        except Exception as error:
            record["cost"] = {**whole, "decode_step": None, "decode_step_error": _error_text(error)}
            return
        step = cost_report(compiled.cost_analysis())
        total = {key: whole[key] + steps * step[key] for key in whole}
        record["cost"] = {**total, "loop_body_counted_once": whole, "decode_step": step, "decode_steps_added": steps}
        record["roofline"] = roofline(record["cost"], self.chip, self.rows("generate", shapes))

    def export_cuda(self, workload: str, shapes: Shapes) -> dict:
        """Lowers `workload` for CUDA with `jax.export`: whether it lowers, and its custom calls."""
        record = self.describe(workload, shapes)
        began = time.perf_counter()
        try:
            exported = self.program(workload, shapes, None).export(("cuda",))
            text = exported.mlir_module()
        except Exception as error:
            record.update(lowered=False, error=_error_text(error), lower_seconds=time.perf_counter() - began)
            return record
        calls = collections.Counter(re.findall(r"stablehlo\.custom_call @([\w$.\-]+)", text))
        calls.update(re.findall(r"call_target_name = \"([^\"]+)\"", text))
        record.update(lowered=True, error=None, lower_seconds=round(time.perf_counter() - began, 2),
                      platforms=list(exported.platforms), custom_calls=dict(sorted(calls.items())),
                      stablehlo_bytes=len(text))
        return record


def run_command(args: argparse.Namespace) -> int:
    # Compile-only TPU devices need no TPU: keep JAX itself on the CPU, and let several
    # processes load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
    if args.find_max_batch and args.platform != "tpu":
        raise ValueError("--find-max-batch needs --platform tpu (a CUDA lowering has no memory analysis)")
    workloads = list(WORKLOADS) if "all" in args.workload else list(dict.fromkeys(args.workload))
    if args.quantize and "train" in workloads:
        raise ValueError("--quantize is for inference workloads: train keeps float weights")
    try:
        compiler = Compiler(args)
    except RuntimeError as error:  # no libtpu, or a topology it does not know
        raise ValueError(f"cannot describe TPU topology {args.topology!r}: {error} (install libtpu: "
                         "pip install \"jax[tpu]\")") from None
    failed = False
    for workload in workloads:
        if args.platform == "cuda":
            record = compiler.export_cuda(workload, compiler.shapes())
            failed |= not record["lowered"]
        elif args.find_max_batch:
            record = find_max_batch(compiler, workload, build_parser())
            failed |= record["max_per_chip_batch"] == 0
        else:
            record = compiler.compile_tpu(workload, compiler.shapes(), step_cost=not args.no_step_cost)
            failed |= not record["compiled"]
        print(json.dumps(record) if args.json else text_line(record), flush=True)
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except ValueError as error:
        print(f"bart-jax aot: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
