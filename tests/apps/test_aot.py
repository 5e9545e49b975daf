"""`bart-jax aot`: ahead-of-time compilation for a TPU topology (libtpu's compiler, no TPU) and
lowering for CUDA (`jax.export`, no GPU), on a tiny model; the chip table and topology names;
the batch search."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from bart_jax.apps import aot, aot_search, chips
from bart_jax.apps.cli import main as cli_main
from bart_jax.config import BartConfig
from bart_jax.generation.config import GenerationConfig

TINY = dict(vocab_size=99, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
REQUIRE_TPU_COMPILER = "BART_JAX_REQUIRE_TPU_COMPILER"


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    """A model directory with a tiny config.json and generation_config.json (beam search)."""
    directory = tmp_path_factory.mktemp("tiny-bart")
    BartConfig(**TINY).save_pretrained(directory)
    GenerationConfig(num_beams=2, max_length=10, no_repeat_ngram_size=2, bos_token_id=0, pad_token_id=1,
                     eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2).save_pretrained(directory)
    return str(directory)


def require_tpu_compiler() -> None:
    """Skips without libtpu (`pip install "jax[tpu]"`), or fails with BART_JAX_REQUIRE_TPU_COMPILER=1."""
    if importlib.util.find_spec("libtpu") is not None:
        return
    reason = 'needs libtpu, the TPU compiler (pip install "jax[tpu]" of the installed jax version; no TPU needed)'
    if os.environ.get(REQUIRE_TPU_COMPILER) == "1":
        pytest.fail(f"{reason} ({REQUIRE_TPU_COMPILER}=1: a missing TPU compiler is an error)", pytrace=False)
    pytest.skip(reason)


def run_aot(*arguments: str) -> list[dict]:
    """`bart-jax aot ... --json` in a fresh process (libtpu stays out of the test process)."""
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    result = subprocess.run([sys.executable, "-m", "bart_jax", "aot", *arguments, "--json"], capture_output=True,
                            text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_tpu_generate_and_train_compile_on_a_sharded_mesh(tiny_preset):
    require_tpu_compiler()
    records = run_aot("--platform", "tpu", "--topology", "v5e:2x4", "--preset", tiny_preset,
                      "--workload", "generate", "train", "--mesh", "data=2,fsdp=2,tensor=2", "--batch-size", "8",
                      "--source-length", "16", "--target-length", "8", "--max-new-tokens", "4", "--dtype", "bfloat16")
    assert [record["workload"] for record in records] == ["generate", "train"]
    for record in records:
        assert record["compiled"], record["error"]
        assert record["chip"] == "v5e" and record["devices"] == 8
        assert record["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
        assert record["per_chip_batch"] == 2
        memory = record["memory"]
        assert memory["arguments"] > 0 and memory["total"] > 0 and memory["fits"]
        assert memory["hbm"] == chips.CHIPS["v5e"].hbm_bytes
        assert record["cost"]["flops"] > 0 and record["cost"]["bytes_accessed"] > 0
        estimate = record["roofline"]
        assert estimate["seconds"] == max(estimate["compute_seconds"], estimate["memory_seconds"]) > 0
    generate, train = records
    assert generate["generation"]["num_beams"] == 2 and generate["generation"]["max_length"] == 5
    # The loop's body counted once by XLA, plus one decoder step per further token.
    assert generate["cost"]["decode_steps_added"] == 3
    assert generate["cost"]["flops"] > generate["cost"]["loop_body_counted_once"]["flops"]
    # The donated train state is both argument and output.
    assert train["memory"]["aliased"] > 0


def test_tpu_compiles_the_pallas_flash_attention(tiny_preset):
    """On TPU the kernels are the TPU ones: attention in the encoder and in training (forward and
    backward) runs the Pallas flash-attention kernel, a `tpu_custom_call` in the compiled program;
    --kernels portable compiles none."""
    require_tpu_compiler()
    common = ("--platform", "tpu", "--topology", "v5e:2x2", "--preset", tiny_preset, "--mesh", "data=2,tensor=2",
              "--batch-size", "4", "--source-length", "16", "--target-length", "8", "--dtype", "bfloat16")
    encode, train = run_aot(*common, "--workload", "encode", "train")
    (portable,) = run_aot(*common, "--workload", "encode", "--kernels", "portable")
    assert encode["kernels"] == train["kernels"] == "tpu" and portable["kernels"] == "portable"
    assert encode["compiled"] and train["compiled"] and portable["compiled"], (encode["error"], train["error"])
    # One kernel per encoder layer; training adds decoder self- and cross-attention and the backward kernels.
    assert encode["custom_calls"].get("tpu_custom_call", 0) >= TINY["encoder_layers"], encode["custom_calls"]
    assert train["custom_calls"].get("tpu_custom_call", 0) > encode["custom_calls"]["tpu_custom_call"]
    assert "tpu_custom_call" not in portable["custom_calls"], portable["custom_calls"]


def test_tpu_compiles_int8_weights_in_less_memory_than_bfloat16(tiny_preset):
    """--quantize: the parameters as load_pretrained(..., quantize=...) holds them, split by the
    rules; the int8 values and their scales take less argument memory per chip than bf16 weights
    (at bart-large-cnn's size, half: docs/performance.md)."""
    require_tpu_compiler()
    common = ("--platform", "tpu", "--topology", "v5e:2x2", "--preset", tiny_preset, "--mesh", "data=2,tensor=2",
              "--batch-size", "4", "--source-length", "16", "--max-new-tokens", "4", "--dtype", "bfloat16",
              "--param-dtype", "bfloat16", "--no-step-cost")
    (bfloat16,) = run_aot(*common, "--workload", "encode")
    encode, generate = run_aot(*common, "--workload", "encode", "generate", "--quantize", "int8")
    assert encode["compiled"] and generate["compiled"], (encode["error"], generate["error"])
    assert encode["quantize"] == generate["quantize"] == "int8" and "quantize" not in bfloat16
    assert encode["memory"]["arguments"] < bfloat16["memory"]["arguments"], (encode["memory"], bfloat16["memory"])


def test_tpu_find_max_batch_stops_at_the_limit(tiny_preset):
    require_tpu_compiler()
    (record,) = run_aot("--platform", "tpu", "--topology", "v5e-4", "--preset", tiny_preset, "--workload", "encode",
                        "--source-length", "16", "--find-max-batch", "--max-per-chip-batch", "4")
    assert record["topology"] == "v5e:2x2" and record["devices"] == 4
    assert record["max_per_chip_batch"] == 4 and record["per_chip_batch"] == 4
    assert [attempt["per_chip_batch"] for attempt in record["search"]] == [1, 2, 4]


@pytest.mark.parametrize("workload", ["forward", "generate", "train"])
def test_cuda_export_lowers(tiny_preset, workload, capsys, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the command leaves the process's JAX platforms alone
    code = cli_main(["aot", "--platform", "cuda", "--preset", tiny_preset, "--workload", workload, "--batch-size",
                     "2", "--source-length", "16", "--target-length", "8", "--max-new-tokens", "4", "--json"])
    assert code == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["lowered"], record["error"]
    assert record["platforms"] == ["cuda"] and record["stablehlo_bytes"] > 0
    assert isinstance(record["custom_calls"], dict)


def test_find_max_batch_doubles_then_bisects(monkeypatch):
    """The search on a stand-in compiler: 1 GiB plus 0.7 GiB a row per chip, and programs over
    15.75 GiB fail to compile (the compiler's limit sits below the published 16 GiB)."""
    compiler = object.__new__(aot.Compiler)
    compiler.args = aot.build_parser().parse_args(["--batch-size", "8", "--find-max-batch"])
    compiler.shards, compiler.chip = 4, chips.CHIPS["v5e"]
    sizes = []

    def compile_isolated(compiler, workload, per_chip, parser):
        sizes.append(per_chip)
        total = int((1 + 0.7 * per_chip) * chips.GIB)
        fits = total <= 15.75 * chips.GIB
        return {"workload": workload, "per_chip_batch": per_chip, "fits": fits, "compiled": fits,
                "compile_seconds": 1.0, "error": None if fits else "RESOURCE_EXHAUSTED",
                **({"memory": {"total": total}} if fits else {})}

    monkeypatch.setattr(aot_search, "compile_isolated", compile_isolated)
    record = aot_search.find_max_batch(compiler, "train", aot.build_parser())
    assert record["max_per_chip_batch"] == 21 and record["per_chip_batch"] == 21
    # Doubling from 8 / 4 shards, then the line through 8 and 16 rows lands on 21 at once.
    assert sizes == [2, 4, 8, 16, 32, 21, 22]
    assert [attempt["fits"] for attempt in record["search"]] == [True] * 4 + [False, True, False]

    sizes.clear()
    compiler.args.batch_granularity = 4
    assert aot_search.find_max_batch(compiler, "train", aot.build_parser())["max_per_chip_batch"] == 20
    assert all(size % 4 == 0 for size in sizes)


def test_search_attempts_parse_back_to_the_same_options():
    parser = aot.build_parser()
    argv = ["--topology", "v6e-8", "--preset", "bart-base", "--workload", "generate", "train", "--mesh", "fsdp",
            "--batch-size", "64", "--scan-layers", "--num-beams", "4", "--do-sample", "--find-max-batch", "--json"]
    args = parser.parse_args(argv)
    child = parser.parse_args(aot_search.child_argv(args, parser, workload=["train"], batch_size=128,
                                                    no_step_cost=True))
    expected = {**vars(args), "workload": ["train"], "batch_size": 128, "no_step_cost": True, "find_max_batch": False}
    assert vars(child) == expected


@pytest.mark.parametrize("text, name, chips_count, bounds", [
    ("v5e:2x4", "v5e:2x4", 8, (2, 2, 1)),
    ("v5e-8", "v5e:2x4", 8, (2, 2, 1)),
    ("v6e-4", "v6e:2x2", 4, (2, 2, 1)),
    ("v5e-1", "v5e:1x1", 1, (1, 1, 1)),
    ("v5p-8", "v5:2x2x1", 4, (2, 2, 1)),
    ("v5p:2x2x2", "v5:2x2x2", 8, (2, 2, 1)),
    ("v4-32", "v4:2x2x4", 16, (2, 2, 1)),
    ("v5e-256", "v5e:16x16", 256, (2, 2, 1)),
])
def test_topology_names(text, name, chips_count, bounds):
    topology = chips.parse_topology(text)
    assert (topology.topology_name, topology.chips, topology.chips_per_host_bounds) == (name, chips_count, bounds)


def test_unknown_topology_and_mesh_are_errors(tiny_preset):
    with pytest.raises(ValueError, match="unknown TPU topology"):
        chips.parse_topology("v3-8")
    with pytest.raises(ValueError, match="preset"):
        aot.preset_directory("no-such-preset")
    assert aot.preset_directory("bart-large-cnn").endswith(os.path.join("configs", "bart-large-cnn"))
    assert aot.preset_directory(tiny_preset) == tiny_preset


def test_chip_table_is_complete():
    for chip in chips.CHIPS.values():
        assert chip.peak_flops > 1e14 and chip.hbm_bytes > 10**10 and chip.hbm_bandwidth > 5e11
        assert chip.source.startswith("https://")
