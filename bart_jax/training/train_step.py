"""Pure train and eval steps over explicit pytrees, jitted in one place.

`train_step(state, batch, dropout_rng) -> (state, metrics)` is a pure function of arrays:
the batch holds [accumulation_steps, micro_batch, ...] arrays; the micro-batches' gradients
of the loss *sums* are added up (lax.scan) and divided once by the total weight (tokens or
examples), so accumulating k micro-batches is the same update as one batch k times larger.
Dropout keys are `fold_in(fold_in(dropout_rng, step), micro_batch)`: a function of the step,
so a resumed run draws the same dropout masks as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from bart_jax import parallel
from bart_jax.training.objectives import Objective


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training: a pytree of arrays only."""

    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any
    opt_state: Any


def create_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation, trainable: Any,
                    schedule: optax.Schedule) -> Callable:
    """The train step for `objective`; `trainable` is a bool tree like params (False: frozen)."""

    def train_step(state: TrainState, batch: dict, dropout_rng: jax.Array) -> tuple[TrainState, dict]:
        step_rng = jax.random.fold_in(dropout_rng, state.step)
        # Differentiates the loss sum; the weight rides along as auxiliary output.
        loss_and_grad = jax.value_and_grad(lambda p, b, r: objective(p, b, r)[:2], has_aux=True)

        def accumulate(carry, inputs):
            grads_sum, loss_sum, weight_sum = carry
            index, micro_batch = inputs
            (loss, weight), grads = loss_and_grad(state.params, micro_batch, jax.random.fold_in(step_rng, index))
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, loss_sum + loss, weight_sum + weight), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_steps = jax.tree.leaves(batch)[0].shape[0]
        (grads, loss_sum, weight), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0), jnp.float32(0)), (jnp.arange(micro_steps), batch))
        scale = 1.0 / jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g, t: g * scale if t else jnp.zeros_like(g), grads, trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss = loss_sum / jnp.maximum(weight, 1.0)
        grad_norm = optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "num_targets": weight,
            # A non-finite loss or gradient makes the new params unusable: the loop stops on it.
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_eval_step(objective: Objective) -> Callable:
    """eval_step(params, batch) -> {"loss_sum", "weight", predictions...}; batch [batch, ...]."""

    def eval_step(params: Any, batch: dict) -> dict:
        loss_sum, weight, predictions = objective(params, batch, None)
        return {"loss_sum": loss_sum, "weight": weight, **predictions}

    return eval_step


def compile_train_step(train_step: Callable, params: Any, optimizer: optax.GradientTransformation,
                       mesh: Optional[Any] = None) -> tuple[Callable, TrainState]:
    """The jitted train step and the initial state (`create_train_state`) placed where it runs; the
    state's buffers are donated.

    The one place the step is compiled. Without a mesh: one device, and the state is committed
    to it as a restored checkpoint is, so that a fresh and a resumed run compile the same program.
    With a `jax.sharding.Mesh` (bart_jax.parallel): params and optimizer state are split by the
    sharding rules and the micro-batches over the batch axes; the parameters are placed shard by
    shard and the optimizer state is created already split, so neither is ever whole on one device.
    """
    def initial_state(params):
        return create_train_state(params, optimizer)

    if mesh is None:
        return jax.jit(train_step, donate_argnums=(0,)), jax.device_put(initial_state(params), jax.devices()[0])
    # BART's vocabulary (50265) splits over no mesh axis: such dimensions stay whole on every device.
    jitted = parallel.jit_train_step(train_step, mesh, jax.eval_shape(initial_state, params), batch_axis=1,
                                     indivisible="replicate")
    shardings = jitted.state_shardings
    placed = parallel.put_sharded(params, shardings.params)
    return jitted, jax.jit(initial_state, out_shardings=shardings)(placed)


def compile_eval_step(eval_step: Callable, params: Any, mesh: Optional[Any] = None) -> Callable:
    """The jitted eval step; with a mesh, `params` (placed by compile_train_step) stay where they
    are and the batch is split."""
    if mesh is None:
        return jax.jit(eval_step)
    param_shardings = jax.tree.map(lambda array: array.sharding, params)
    return parallel.jit_sharded(eval_step, mesh, in_shardings=(param_shardings, parallel.batch_sharding(mesh)),
                                out_shardings=parallel.replicated(mesh))
