"""The programs `bart-jax aot` compiles: each workload as a function, its arguments as
`jax.ShapeDtypeStruct`s (nothing is allocated) and their shardings over the mesh.

encode     the encoder over [batch, source] tokens
forward    encoder and decoder with the LM head: [batch, target] logits
generate   `generate_static` (encode, project cross-attention keys/values, the search loop)
decode     one decoder step of generation over the static cache (for the per-token cost)
train      the train step of bart_jax.training: forward, backward, clipping and AdamW
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from bart_jax import parallel
from bart_jax.generation.config import GenerationConfig
from bart_jax.generation.generate import generate_static
from bart_jax.model.cache import cache_shapes
from bart_jax.model.quantization import quantize_params
from bart_jax.model.registry import init_inputs
from bart_jax.training.objectives import make_objective
from bart_jax.training.optimizer import learning_rate_schedule, make_optimizer, trainable_mask
from bart_jax.training.train_step import create_train_state, make_train_step

# A training schedule for the compiled step: its values are baked in, its cost is not.
_SCHEDULE = dict(peak=5e-5, total_steps=10_000, warmup_steps=500)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The batch of a workload: global rows, source and target tokens, micro-batches."""

    batch: int
    source_length: int
    target_length: int = 128
    accumulation_steps: int = 1


@dataclasses.dataclass
class Program:
    """A function, its abstract arguments, and (with a mesh) how they are split."""

    fn: Callable
    args: tuple
    in_shardings: Any = None
    out_shardings: Any = None
    donate_argnums: tuple = ()
    jitted: Optional[Callable] = None  # an entry point of bart_jax.parallel that lowers itself

    def lower_for_mesh(self, mesh: Mesh):
        """The program lowered for `mesh`'s devices (traced under its activation constraints)."""
        if self.jitted is not None:
            return self.jitted.lower(*self.args)
        kwargs = {"donate_argnums": self.donate_argnums}
        if self.in_shardings is not None:
            kwargs["in_shardings"] = self.in_shardings
        if self.out_shardings is not None:
            kwargs["out_shardings"] = self.out_shardings
        return parallel.jit_sharded(self.fn, mesh, **kwargs).lower(*self.args)

    def export(self, platforms: tuple[str, ...]):
        """The program exported (`jax.export`) for `platforms`, one device, no compilation."""
        return jax.export.export(jax.jit(self.fn, donate_argnums=self.donate_argnums), platforms=platforms)(*self.args)


def _ids(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def param_structs(module, quantize: Optional[str] = None) -> Any:
    """The module's parameters as ShapeDtypeStructs (stacked layers with scan_layers); with
    `quantize` ("int8", "int8-weights"), the weights as `load_pretrained(..., quantize=...)` holds them."""
    init_module = module.clone(kernels="portable")  # the same parameters under every policy, traced once
    inputs = init_inputs(module.config)
    params = jax.eval_shape(lambda: init_module.init(jax.random.PRNGKey(0), **inputs))["params"]
    return params if quantize is None else jax.eval_shape(lambda p: quantize_params(p, quantize), params)


def _param_shardings(params, mesh: Optional[Mesh]):
    # BART's vocabulary (50265 or 50264) splits over no mesh axis: such dimensions stay whole.
    return None if mesh is None else parallel.tree_shardings(params, mesh, indivisible="replicate")


def _rows(mesh: Optional[Mesh], batch_axis: int = 0):
    return None if mesh is None else parallel.batch_sharding(mesh, batch_axis=batch_axis)


def _checked(mesh: Optional[Mesh], batch: Any, batch_axis: int = 0) -> None:
    if mesh is not None:
        parallel.check_batch(batch, mesh, batch_axis=batch_axis)


def encode_program(module, shapes: Shapes, mesh: Optional[Mesh], quantize: Optional[str] = None) -> Program:
    params = param_structs(module, quantize)
    batch = {"input_ids": _ids(shapes.batch, shapes.source_length),
             "attention_mask": _ids(shapes.batch, shapes.source_length)}
    _checked(mesh, batch)

    def encode(params, batch):
        return module.apply({"params": params}, **batch, method="encode").last_hidden_state

    shardings = None if mesh is None else (_param_shardings(params, mesh), _rows(mesh))
    return Program(encode, (params, batch), shardings)


def forward_program(module, shapes: Shapes, mesh: Optional[Mesh], quantize: Optional[str] = None) -> Program:
    params = param_structs(module, quantize)
    batch = {"input_ids": _ids(shapes.batch, shapes.source_length),
             "attention_mask": _ids(shapes.batch, shapes.source_length),
             "decoder_input_ids": _ids(shapes.batch, shapes.target_length)}
    _checked(mesh, batch)

    def forward(params, batch):
        return module.apply({"params": params}, **batch).logits

    shardings = None if mesh is None else (_param_shardings(params, mesh), _rows(mesh))
    return Program(forward, (params, batch), shardings)


def _prng_key(config: GenerationConfig) -> Optional[jax.ShapeDtypeStruct]:
    return jax.ShapeDtypeStruct((2,), jnp.uint32) if config.do_sample else None


def generate_program(module, shapes: Shapes, mesh: Optional[Mesh], config: GenerationConfig,
                     quantize: Optional[str] = None) -> Program:
    """`generate_static` as `bart_jax.parallel.jit_generate` runs it; `config` resolved."""
    params = param_structs(module, quantize)
    input_ids, attention_mask = _ids(shapes.batch, shapes.source_length), _ids(shapes.batch, shapes.source_length)
    _checked(mesh, (input_ids, attention_mask))

    def generate(params, input_ids, attention_mask, prng_key):
        return generate_static(module, params, input_ids, attention_mask, config, prng_key)

    shardings = None
    if mesh is not None:
        rows = _rows(mesh)
        shardings = (_param_shardings(params, mesh), rows, rows, parallel.replicated(mesh))
    return Program(generate, (params, input_ids, attention_mask, _prng_key(config)), shardings)


def decode_step_program(module, shapes: Shapes, mesh: Optional[Mesh], config: GenerationConfig,
                        quantize: Optional[str] = None) -> Program:
    """One step of the generation loop's decoder (`decode_step`, as `jit_decode_step` runs it)
    over a cache of `config.max_length` positions: the model's part of each new token's cost."""
    params = param_structs(module, quantize)
    rows_per_input = config.num_beams if config.num_beams > 1 else config.num_return_sequences
    rows = shapes.batch * rows_per_input
    cache = cache_shapes(module.config, shapes.batch, config.max_length, rows_per_input, module.dtype, "portable")
    hidden = jax.ShapeDtypeStruct((shapes.batch, shapes.source_length, module.config.d_model), module.dtype)
    cross_key_values = jax.eval_shape(
        lambda p, h: module.apply({"params": p}, h, method="project_cross_key_values"), params, hidden)
    args = (params, _ids(rows, 1), cache, jax.ShapeDtypeStruct((), jnp.int32), cross_key_values,
            _ids(shapes.batch, shapes.source_length))
    _checked(mesh, (args[1], cache, cross_key_values, args[5]))

    def decode_step(params, decoder_input_ids, cache, cache_index, cross_key_values, encoder_attention_mask):
        return module.apply({"params": params}, decoder_input_ids, cache, cache_index, cross_key_values,
                            encoder_attention_mask, method="decode_step")

    if mesh is None:
        return Program(decode_step, args, donate_argnums=(2,))
    row_sharding = _rows(mesh)
    cache_sharding = parallel.cache_shardings(cache, mesh, layout="portable")
    in_shardings = (_param_shardings(params, mesh), row_sharding, cache_sharding, parallel.replicated(mesh),
                    parallel.cache_shardings(cross_key_values, mesh, layout="portable"), row_sharding)
    return Program(decode_step, args, in_shardings, (row_sharding, cache_sharding), donate_argnums=(2,))


def train_program(module, shapes: Shapes, mesh: Optional[Mesh], *, weight_decay: float = 0.01,
                  label_smoothing: float = 0.0) -> Program:
    """The seq2seq train step of bart_jax.training (`make_train_step` over `make_objective` and
    `make_optimizer`: AdamW, global-norm clipping), placed as `compile_train_step` places it:
    state split by the rules, micro-batches [accumulation_steps, batch, ...] over the batch axes."""
    params = param_structs(module)
    schedule = learning_rate_schedule(_SCHEDULE["peak"], _SCHEDULE["total_steps"], _SCHEDULE["warmup_steps"])
    optimizer = make_optimizer(params, schedule, weight_decay=weight_decay)
    train_step = make_train_step(make_objective(module, "seq2seq", label_smoothing), optimizer,
                                 trainable_mask(params), schedule)
    state = jax.eval_shape(lambda p: create_train_state(p, optimizer), params)
    steps, rows = shapes.accumulation_steps, shapes.batch
    batch = {"input_ids": _ids(steps, rows, shapes.source_length),
             "attention_mask": _ids(steps, rows, shapes.source_length),
             "labels": _ids(steps, rows, shapes.target_length),
             "example_mask": jax.ShapeDtypeStruct((steps, rows), jnp.float32)}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    _checked(mesh, batch, batch_axis=1)
    jitted = None
    if mesh is not None:
        jitted = parallel.jit_train_step(train_step, mesh, state, batch_axis=1, indivisible="replicate")
    return Program(train_step, (state, batch, rng), donate_argnums=(0,), jitted=jitted)


def build_program(workload: str, module, shapes: Shapes, mesh: Optional[Mesh],
                  generation_config: Optional[GenerationConfig] = None, quantize: Optional[str] = None) -> Program:
    """The program of `workload` ("encode", "forward", "generate", "decode" or "train"); `quantize`:
    int8 weights for the inference workloads (bart_jax/model/quantization.py)."""
    if quantize is not None and workload == "train":
        raise ValueError("--quantize is for inference: the train workload keeps float weights")
    if workload == "encode":
        return encode_program(module, shapes, mesh, quantize)
    if workload == "forward":
        return forward_program(module, shapes, mesh, quantize)
    if workload == "generate":
        return generate_program(module, shapes, mesh, generation_config, quantize)
    if workload == "decode":
        return decode_step_program(module, shapes, mesh, generation_config, quantize)
    if workload == "train":
        return train_program(module, shapes, mesh)
    raise ValueError(f"unknown workload {workload!r}; choose from encode, forward, generate, decode, train")
