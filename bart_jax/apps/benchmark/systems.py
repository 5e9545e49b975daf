"""The systems the benchmark compares: bart_jax (fp32, bf16, int8), transformers (eager,
torch.compile) and CTranslate2 (fp32, int8), each behind one `run(workload, batch)` call, and
the workloads' shapes, options and model flops.

`bart_jax_int8` is `load_pretrained(..., quantize="int8")` with the default layers: int8 weights
and inputs quantized per row, float32 elsewhere (bart_jax/model/quantization.py), as
CTranslate2's int8 compute type; `bart_jax_int8_bf16` the same with bfloat16 elsewhere (activations,
attention, caches), as CTranslate2's int8_bfloat16. They run inference only (no W4)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax.generation.generate import generate_static, resolve_generation_config
from bart_jax.pretrained import load_pretrained

SHAPES = {
    "bart-base": "bart-base",
    "bart-large-cnn": "bart-large-cnn",
}
TINY_SHAPE = dict(vocab_size=50265, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)
BEAM_OPTIONS = dict(num_beams=4, length_penalty=2.0, no_repeat_ngram_size=3, early_stopping=True,
                    forced_bos_token_id=0, forced_eos_token_id=2)
SYSTEMS = ("bart_jax", "bart_jax_bf16", "bart_jax_int8", "bart_jax_int8_bf16", "transformers", "torch_compile",
           "ctranslate2", "ctranslate2_int8")
WORKLOADS = ("W1", "W2", "W3", "W4")
# Systems that can run each workload.
SUPPORTS = {
    "bart_jax": WORKLOADS, "bart_jax_bf16": ("W1", "W2", "W3", "W4"), "bart_jax_int8": ("W1", "W2", "W3"),
    "bart_jax_int8_bf16": ("W1", "W2", "W3"),
    "transformers": WORKLOADS,
    "torch_compile": WORKLOADS, "ctranslate2": ("W1", "W2", "W3"), "ctranslate2_int8": ("W1", "W2", "W3"),
}


@dataclasses.dataclass(frozen=True)
class Setup:
    model_dir: str
    batch: int
    source_length: int
    target: int
    greedy_target: int
    train_target: int
    seed: int
    threads: int


# --- FLOP counts (multiply-adds x 2) ------------------------------------------------------
def model_flops(config: dict, workload: str, setup: Setup) -> float:
    """Matmul FLOPs of a workload from the config (attention scores included, softmax not)."""
    d, vocab = config["d_model"], config["vocab_size"]
    layer_enc = 4 * d * d + 2 * d * config["encoder_ffn_dim"]
    layer_dec_self = 4 * d * d + 2 * d * config["decoder_ffn_dim"] + 2 * d * d  # + cross q/out projections
    cross_kv = 2 * d * d
    batch, source = setup.batch, setup.source_length
    encoder = 2 * batch * source * (config["encoder_layers"] * layer_enc) + 2 * 2 * batch * source * source * d * \
        config["encoder_layers"]
    if workload == "W3":
        return encoder
    if workload == "W4":
        target = setup.train_target
        decoder = 2 * batch * target * config["decoder_layers"] * layer_dec_self
        decoder += 2 * batch * source * config["decoder_layers"] * cross_kv
        decoder += 2 * 2 * batch * target * (target + source) * d * config["decoder_layers"]
        lm_head = 2 * batch * target * d * vocab
        return 3 * (encoder + decoder + lm_head)  # backward ~ 2x forward
    rows = batch * (BEAM_OPTIONS["num_beams"] if workload == "W1" else 1)
    steps = setup.target if workload == "W1" else setup.greedy_target
    per_step = 2 * rows * (config["decoder_layers"] * layer_dec_self + d * vocab)
    attention = sum(2 * 2 * rows * (step + 1 + source) * d * config["decoder_layers"] for step in range(steps))
    cross_projection = 2 * batch * source * config["decoder_layers"] * cross_kv
    return encoder + cross_projection + steps * per_step + attention


def matmul_peak_gflops(size: int = 1536, repeats: int = 5) -> float:
    """This machine's fp32 matmul throughput (numpy/BLAS, all threads), GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best / 1e9


# --- the shared inputs --------------------------------------------------------------------
def source_ids(setup: Setup, vocab_size: int, batch: int | None = None) -> np.ndarray:
    """[batch (default setup.batch), source_length] random ids from <s> to </s>; a smaller
    batch holds the first rows of a larger one."""
    rng = np.random.default_rng(setup.seed)
    ids = rng.integers(4, vocab_size, size=(batch or setup.batch, setup.source_length))
    ids[:, 0], ids[:, -1] = 0, 2
    return ids.astype(np.int64)


def target_ids(setup: Setup, vocab_size: int) -> np.ndarray:
    rng = np.random.default_rng(setup.seed + 1)
    return rng.integers(4, vocab_size, size=(setup.batch, setup.train_target)).astype(np.int64)


def generation_options(workload: str, setup: Setup) -> dict:
    if workload == "W1":
        return dict(BEAM_OPTIONS, max_length=setup.target, min_length=setup.target)
    return dict(num_beams=1, max_length=setup.greedy_target, min_length=setup.greedy_target)


# --- systems ------------------------------------------------------------------------------
class BartJaxSystem:
    def __init__(self, setup: Setup, dtype: str, quantize: str | None = None, training: bool = False):
        self.jax, self.jnp = jax, jnp
        compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        # Training keeps float32 master weights (mixed precision); inference keeps the weights it
        # multiplies in the compute dtype (load_pretrained's default).
        self.model = load_pretrained(setup.model_dir, dtype=compute, param_dtype=jnp.float32 if training else None,
                                     quantize=quantize)
        self.setup = setup
        self.input_ids = jnp.asarray(source_ids(setup, self.model.config.vocab_size), jnp.int32)
        self.mask = jnp.ones_like(self.input_ids)
        self.labels = jnp.asarray(target_ids(setup, self.model.config.vocab_size), jnp.int32)
        self._generate_static, self._resolve = generate_static, resolve_generation_config
        module = self.model.module
        self._encode = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask, method="encode")
                               .last_hidden_state)
        self.train_state = None

    def _train_step(self):
        """The jitted AdamW step; its parameter copy and optimizer state are made on first use,
        so that they do not count in the peak memory of the other workloads."""
        if self.train_state is None:
            import optax

            jax, jnp, module = self.jax, self.jnp, self.model.module
            optimizer = optax.adamw(1e-4)

            def train_step(params, opt_state, ids, mask, labels):
                def loss_fn(p):
                    return module.apply({"params": p}, ids, mask, labels=labels).loss

                loss, grads = jax.value_and_grad(loss_fn)(params)
                updates, opt_state = optimizer.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            params = jax.tree_util.tree_map(jnp.array, self.model.params)
            self.train_state = (jax.jit(train_step, donate_argnums=(0, 1)), params, optimizer.init(params))
        return self.train_state

    def run(self, workload: str, batch: int | None = None):
        """(result, generated ids or None) of `workload` on `batch` rows (default setup.batch)."""
        jax = self.jax
        if batch not in (None, self.setup.batch):  # a latency row (generation only)
            input_ids = jnp.asarray(source_ids(self.setup, self.model.config.vocab_size, batch), jnp.int32)
            return None, self._generate(workload, input_ids, jnp.ones_like(input_ids))
        if workload == "W3":
            return jax.block_until_ready(self._encode(self.model.params, self.input_ids, self.mask)), None
        if workload == "W4":
            step, params, opt_state = self._train_step()
            params, opt_state, loss = step(params, opt_state, self.input_ids, self.mask, self.labels)
            self.train_state = (step, params, opt_state)
            return jax.block_until_ready(loss), None
        return None, self._generate(workload, self.input_ids, self.mask)

    def _generate(self, workload: str, input_ids, mask) -> np.ndarray:
        config = self._resolve(self.model.module, self.model.generation_config,
                               **generation_options(workload, self.setup))
        output = self._generate_static(self.model.module, self.model.params, input_ids, mask, config, None)
        return np.asarray(output.sequences)


class TorchSystem:
    def __init__(self, setup: Setup, compiled: bool):
        import torch
        import transformers

        torch.set_num_threads(setup.threads)
        self.torch, self.setup = torch, setup
        self.model = transformers.BartForConditionalGeneration.from_pretrained(setup.model_dir).eval()
        vocab = self.model.config.vocab_size
        self.input_ids = torch.as_tensor(source_ids(setup, vocab))
        self.mask = torch.ones_like(self.input_ids)
        self.labels = torch.as_tensor(target_ids(setup, vocab))
        self.training = None
        self.encoder = self.model.get_encoder()
        self.compiled = compiled
        if compiled:
            self.encoder = torch.compile(self.encoder)
            self.model.forward = torch.compile(self.model.forward, dynamic=True)

    def _training(self):
        """(forward, optimizer) of a training copy, made on first use (see BartJaxSystem._train_step)."""
        if self.training is None:
            import transformers

            model = transformers.BartForConditionalGeneration.from_pretrained(self.setup.model_dir).train()
            model.config.dropout = 0.0
            forward = self.torch.compile(model.forward) if self.compiled else model.forward
            self.training = (forward, self.torch.optim.AdamW(model.parameters(), lr=1e-4))
        return self.training

    def run(self, workload: str, batch: int | None = None):
        torch = self.torch
        input_ids, mask = self.input_ids, self.mask
        if batch not in (None, self.setup.batch):
            input_ids = torch.as_tensor(source_ids(self.setup, self.model.config.vocab_size, batch))
            mask = torch.ones_like(input_ids)
        if workload == "W3":
            with torch.no_grad():
                return self.encoder(input_ids=self.input_ids, attention_mask=self.mask).last_hidden_state, None
        if workload == "W4":
            forward, optimizer = self._training()
            optimizer.zero_grad()
            loss = forward(input_ids=self.input_ids, attention_mask=self.mask, labels=self.labels).loss
            loss.backward()
            optimizer.step()
            return loss, None
        with torch.no_grad():
            ids = self.model.generate(input_ids, attention_mask=mask, **generation_options(workload, self.setup))
        return None, ids.numpy()


class CTranslate2System:
    def __init__(self, setup: Setup, compute_type: str):
        import ctranslate2

        directory = os.path.join(setup.model_dir, "ctranslate2")
        self.translator = ctranslate2.Translator(directory, device="cpu", compute_type=compute_type,
                                                 intra_threads=setup.threads)
        with open(os.path.join(directory, "shared_vocabulary.json"), encoding="utf-8") as f:
            self.vocabulary = json.load(f)
        self.setup = setup
        self.tokens = self._tokens(setup.batch)

    def _tokens(self, batch: int) -> list[list[str]]:
        return [[self.vocabulary[i] for i in row] for row in source_ids(self.setup, len(self.vocabulary), batch)]

    def run(self, workload: str, batch: int | None = None):
        tokens = self.tokens if batch in (None, self.setup.batch) else self._tokens(batch)
        if workload == "W3":
            # CTranslate2 exposes no encoder-only call for seq2seq models: encoder + one greedy step.
            return self.translator.translate_batch(tokens, beam_size=1, max_decoding_length=1), None
        options = generation_options(workload, self.setup)
        results = self.translator.translate_batch(
            tokens, beam_size=options["num_beams"], max_decoding_length=options["max_length"] - 1,
            min_decoding_length=options["min_length"] - 1, length_penalty=options.get("length_penalty", 1.0),
            no_repeat_ngram_size=options.get("no_repeat_ngram_size", 0), return_end_token=True,
        )
        index = {token: i for i, token in enumerate(self.vocabulary)}
        rows = [[2] + [index[token] for token in result.hypotheses[0]] for result in results]
        width = max(len(row) for row in rows)
        return None, np.array([row + [1] * (width - len(row)) for row in rows])


def make_system(name: str, setup: Setup, training: bool = False):
    """The system `name` on `setup`'s model; `training`: for the training workload (W4)."""
    if name == "bart_jax":
        return BartJaxSystem(setup, "float32", training=training)
    if name == "bart_jax_bf16":
        return BartJaxSystem(setup, "bfloat16", training=training)
    if name in ("bart_jax_int8", "bart_jax_int8_bf16"):
        return BartJaxSystem(setup, "bfloat16" if name.endswith("bf16") else "float32", quantize="int8")
    if name in ("transformers", "torch_compile"):
        return TorchSystem(setup, compiled=name == "torch_compile")
    return CTranslate2System(setup, "int8" if name == "ctranslate2_int8" else "float32")
