"""Data-parallel summarization on 8 simulated CPU devices gives what one device gives.

Run by tests/apps/test_summarize_devices.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is fixed at JAX start-up):

    python tests/apps/multidevice_summarize.py MODEL_DIR WORK_DIR

MODEL_DIR: a summarization model with a tokenizer. Prints "ok" when every check passes.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import sys

import jax
import numpy as np

from bart_jax import load_pretrained, parallel
from bart_jax.apps import cli
from bart_jax.apps.summarize import SummaryStats, iter_summaries

OPTIONS = dict(num_beams=3, num_return_sequences=2, max_length=16, min_length=3)


def main(model_dir: str, work_dir: str) -> None:
    assert jax.device_count() == 8, f"needs 8 devices, found {jax.device_count()}"
    work = pathlib.Path(work_dir)
    texts = [json.loads(line)["document"] for line in (work / "in.jsonl").read_text().splitlines()]

    one = load_pretrained(model_dir)
    mesh = parallel.preset_mesh("data")
    sharded = load_pretrained(model_dir, mesh=mesh)
    results = {}
    for name, model in (("one", one), ("data", sharded)):
        stats = SummaryStats()
        results[name] = dict(iter_summaries(model, texts, batch_size=4, max_source_length=40, stats=stats,
                                            details=True, **OPTIONS))
        print(name, sorted(stats.shapes), file=sys.stderr)
        if name == "data":  # batches of 4 are padded to the 8 batch shards
            assert {batch for batch, _ in stats.shapes} == {8}, stats.shapes
    for index in range(len(texts)):
        expected, got = results["one"][index], results["data"][index]
        assert got.texts == expected.texts and got.token_ids == expected.token_ids, (index, got, expected)
        np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-5, atol=1e-5)

    # The command: data parallel by default over the 8 devices, the same records as --mesh none.
    outputs = {}
    for mesh_name in ("auto", "none"):
        output = work / f"out-{mesh_name}.jsonl"
        error = io.StringIO()
        with contextlib.redirect_stderr(error):
            code = cli.main(["summarize", str(work / "in.jsonl"), "-o", str(output), "--model", model_dir, "--mesh",
                             mesh_name, "--no-progress", "--no-compilation-cache", "--num-beams", "2",
                             "--max-length", "12", "--batch-size", "4", "--max-source-length", "40"])
        assert code == 0, (mesh_name, error.getvalue())
        report = json.loads(error.getvalue().split("summary: ")[1].splitlines()[0])
        assert report["mesh"] == ({"data": 8, "fsdp": 1, "tensor": 1} if mesh_name == "auto" else None), report
        outputs[mesh_name] = [json.loads(line) for line in output.read_text().splitlines()]
    scores = {name: [record.pop("score") for record in records] for name, records in outputs.items()}
    assert outputs["auto"] == outputs["none"] and len(outputs["none"]) == len(texts)
    np.testing.assert_allclose(scores["auto"], scores["none"], rtol=1e-5, atol=1e-6)
    print("ok")


if __name__ == "__main__":
    main(*sys.argv[1:])
