"""`load_pretrained` reads, quantizes and places one tensor at a time: the float checkpoint is never
held whole on the host beside the loaded model (bart_jax/checkpoints/reader.py, the `transform`
of checkpoints/conversion.py).

Host allocations are measured with tracemalloc, which numpy reports its buffers to (the reader's
buffers, safetensors' and torch's copies); buffers XLA allocates for device arrays are not
counted. What a load keeps (on CPU, float weights the device aliases) is the traced memory after
it; what it held besides at its peak is the peak less that.
"""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest
from hf_reference import hf_model, save_hf_model

from bart_jax import load_pretrained
from bart_jax.model import quantization

# Many tensors of similar size, so that one tensor (the largest: a 512-row embedding or fc1) is a
# small part of the whole (about 9 MB of float32).
SIZES = dict(vocab_size=512, d_model=128, encoder_layers=4, decoder_layers=4, encoder_ffn_dim=512,
             decoder_ffn_dim=512, max_position_embeddings=128)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = hf_model("BartForConditionalGeneration", seed=5, **SIZES)
    directory = save_hf_model(model, tmp_path_factory.mktemp("memory") / "model")
    tensors = {key: value.detach().numpy() for key, value in model.state_dict().items()}
    return directory, sum(array.nbytes for array in tensors.values()), max(array.nbytes for array in tensors.values())


def held_besides_the_model(load) -> tuple[int, object]:
    """(bytes traced at the peak of `load()` beyond what it keeps afterwards, its result)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = load()
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - kept, result


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_loading_holds_one_tensor_at_a_time(checkpoint, quantize):
    directory, total, largest = checkpoint
    load_pretrained(directory, quantize=quantize)  # compiles the quantization programs first
    held, model = held_besides_the_model(lambda: load_pretrained(directory, quantize=quantize))
    # Reading the checkpoint whole would hold all of it (`total`) at once, twice over while parsing it.
    assert held < total / 4, (
        f"load_pretrained(quantize={quantize!r}) held {held / 2**20:.2f} MiB on the host besides the model at "
        f"its peak; the checkpoint is {total / 2**20:.2f} MiB of float32, its largest tensor "
        f"{largest / 2**20:.2f} MiB: tensors are not read, converted and placed one at a time"
    )
    quantized = quantization.quantization_of(model.params)
    assert (quantized or {}).get("quantize") == quantize


def test_converted_directory_quantizes_as_it_reads(checkpoint, tmp_path):
    directory, total, largest = checkpoint
    load_pretrained(directory).save_pretrained(tmp_path / "converted")
    reference = load_pretrained(directory, quantize="int8")
    load_pretrained(tmp_path / "converted", quantize="int8")
    held, model = held_besides_the_model(lambda: load_pretrained(tmp_path / "converted", quantize="int8"))
    assert held < total / 4, (
        f"load_pretrained(converted float directory, quantize='int8') held {held / 2**20:.2f} MiB besides "
        f"the model at its peak; the checkpoint is {total / 2**20:.2f} MiB, its largest tensor "
        f"{largest / 2**20:.2f} MiB"
    )
    fc1 = ("model", "decoder", "layers_3", "fc1", "weight")
    leaf = model.params
    expected = reference.params
    for name in fc1:
        leaf, expected = leaf[name], expected[name]
    np.testing.assert_array_equal(np.asarray(leaf.array.qvalue), np.asarray(expected.array.qvalue))
