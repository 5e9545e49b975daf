"""The decoder cache's layouts: the CPU one's chunks hold, and its writes land, where one flat
buffer would; the portable one is that buffer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax.config import BartConfig
from bart_jax.model.cache import cache_layout, cache_shapes, init_cache
from bart_jax.model.kernels.cache import chunk_bounds, layer_shapes, write_cpu, write_portable
from bart_jax.model.kernels.cache_attention import CACHE_ATTENTION


@pytest.mark.parametrize("max_length", [1, 15, 16, 40, 142, 1024])
def test_chunks_cover_every_position_once(max_length):
    bounds = chunk_bounds(max_length)
    assert bounds[0][0] == 0 and bounds[-1][1] == max_length, bounds
    assert all(end == start for (_, end), (start, _) in zip(bounds, bounds[1:])), bounds
    assert all(end > start for start, end in bounds), bounds


def test_cpu_cache_shapes_split_slots_by_chunk():
    config = BartConfig(vocab_size=50, d_model=16, decoder_attention_heads=4, decoder_layers=2)
    shapes = cache_shapes(config, batch=3, max_length=40, beams=2, kernels="cpu")
    for layer in shapes["layers"]:
        assert [key.shape for key in layer["key"]] == [(3, 4, 4, (end - start) * 2) for start, end in chunk_bounds(40)]
        assert [value.shape for value in layer["value"]] == [(3, 4, (end - start) * 2, 4)
                                                             for start, end in chunk_bounds(40)]
    assert shapes["ancestors"].shape == (3, 2, 40)


@pytest.mark.parametrize("positions_per_call", [1, 3])
def test_cpu_writes_equal_one_flat_buffer(positions_per_call):
    """Every call writes t positions x beams slots at `position * beams`; the chunks, put end to
    end, equal one buffer written the same way (a block of several positions may straddle chunks)."""
    batch, heads, head_dim, beams, max_length = 2, 3, 4, 2, 40
    bounds = chunk_bounds(max_length)
    assert len(bounds) > 2
    layer = {"key": tuple(jnp.zeros((batch, heads, head_dim, (end - start) * beams)) for start, end in bounds),
             "value": tuple(jnp.zeros((batch, heads, (end - start) * beams, head_dim)) for start, end in bounds)}
    flat_key = np.zeros((batch, heads, head_dim, max_length * beams), np.float32)
    flat_value = np.zeros((batch, heads, max_length * beams, head_dim), np.float32)
    write = jax.jit(write_cpu, static_argnums=4)
    rng = np.random.default_rng(positions_per_call)
    slots = positions_per_call * beams
    for position in range(0, max_length - positions_per_call + 1, positions_per_call):
        key = rng.standard_normal((batch, heads, head_dim, slots)).astype(np.float32)
        value = rng.standard_normal((batch, heads, slots, head_dim)).astype(np.float32)
        layer = write(layer, jnp.asarray(key), jnp.asarray(value), jnp.int32(position), beams)
        flat_key[..., position * beams: position * beams + slots] = key
        flat_value[:, :, position * beams: position * beams + slots] = value
        np.testing.assert_array_equal(np.concatenate(layer["key"], axis=-1), flat_key,
                                      err_msg=f"keys after writing position {position}")
        np.testing.assert_array_equal(np.concatenate(layer["value"], axis=2), flat_value,
                                      err_msg=f"values after writing position {position}")


def test_portable_cache_is_one_time_major_buffer():
    config = BartConfig(vocab_size=50, d_model=16, decoder_attention_heads=4, decoder_layers=2)
    shapes = cache_shapes(config, batch=3, max_length=40, beams=2, dtype=jnp.bfloat16, kernels="portable")
    for layer in shapes["layers"]:
        assert layer["key"].shape == layer["value"].shape == (3, 80, 4, 4), layer
        assert layer["key"].dtype == jnp.bfloat16, "the portable cache keeps bfloat16 as it is"
    assert cache_layout(init_cache(config, 3, 40, 2, kernels="portable")) == "portable"
    assert cache_layout(init_cache(config, 3, 40, 2, kernels="cpu")) == "cpu"


@pytest.mark.parametrize("positions_per_call", [1, 3])
def test_portable_writes_land_at_position_times_beams(positions_per_call):
    batch, heads, head_dim, beams, max_length = 2, 3, 4, 2, 12
    layer = {name: jnp.zeros((batch, max_length * beams, heads, head_dim)) for name in ("key", "value")}
    expected = np.zeros((batch, max_length * beams, heads, head_dim), np.float32)
    write = jax.jit(write_portable, static_argnums=4)
    rng = np.random.default_rng(positions_per_call)
    slots = positions_per_call * beams
    for position in range(0, max_length - positions_per_call + 1, positions_per_call):
        block = rng.standard_normal((batch, slots, heads, head_dim)).astype(np.float32)
        layer = write(layer, jnp.asarray(block), jnp.asarray(-block), jnp.int32(position), beams)
        expected[:, position * beams: position * beams + slots] = block
        np.testing.assert_array_equal(np.asarray(layer["key"]), expected, err_msg=f"keys after position {position}")
        np.testing.assert_array_equal(np.asarray(layer["value"]), -expected,
                                      err_msg=f"values after position {position}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("queries_per_call", [1, 3])
def test_cpu_cache_attention_equals_its_portable_twin(dtype, queries_per_call):
    """Both layouts, written with the same steps and read through the same (reordered) ancestry,
    give the same attention outputs and per-position weights at every step."""
    batch, beams, heads, head_dim, max_length = 2, 3, 2, 4, 40
    rows = batch * beams
    dtype = jnp.dtype(dtype)
    caches = {layout: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                             layer_shapes(batch, heads, head_dim, max_length, beams, dtype, layout))
              for layout in ("cpu", "portable")}
    rng = np.random.default_rng(queries_per_call)
    ancestors = np.broadcast_to(np.arange(beams)[None, :, None], (batch, beams, max_length)).copy()
    mask = np.ones((rows, 1, queries_per_call, max_length), bool)
    mask[0, :, :, 2] = False  # a padded decoder position of one row
    attend = {layout: jax.jit(CACHE_ATTENTION[layout], static_argnums=(7,)) for layout in caches}
    tolerance = 1e-5 if dtype == jnp.float32 else 3e-2
    for start in range(0, max_length - queries_per_call + 1, queries_per_call):
        if start:  # beam search moved some hypotheses: row r continues row source[r] of its input
            source = rng.integers(0, beams, (batch, beams))
            ancestors = np.take_along_axis(ancestors, source[:, :, None], axis=1)
        ancestors[:, :, start:start + queries_per_call] = np.arange(beams)[None, :, None]
        queries = jnp.asarray(rng.standard_normal((batch, beams * queries_per_call, heads, head_dim)) * 0.5, dtype)
        key, value = (jnp.asarray(rng.standard_normal((rows, queries_per_call, heads, head_dim)), dtype)
                      for _ in range(2))
        results = {}
        for layout in caches:
            output, weights, caches[layout] = attend[layout](queries, key, value, caches[layout], jnp.int32(start),
                                                             jnp.asarray(ancestors), jnp.asarray(mask), dtype)
            results[layout] = (np.asarray(output), np.asarray(weights))
        for name, ours, twin in zip(("output", "weights"), results["cpu"], results["portable"]):
            np.testing.assert_allclose(ours, twin, atol=tolerance, rtol=tolerance,
                                       err_msg=f"{name} at positions {start}..{start + queries_per_call - 1}")
