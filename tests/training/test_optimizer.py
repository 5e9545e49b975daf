"""bart_jax.training.optimizer: weight decay and frozen parameters, learning rate schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bart_jax.training.optimizer import learning_rate_schedule, make_optimizer


def test_weight_decay_skips_biases_and_layer_norms_and_final_logits_bias_is_frozen():
    params = {"final_logits_bias": jnp.ones((1, 4)),
              "dense": {"weight": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "layer_norm": {"scale": jnp.ones(2)}}
    optimizer = make_optimizer(params, optax.constant_schedule(0.1), weight_decay=0.5)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_allclose(updates["dense"]["weight"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    for name, update in (("bias", updates["dense"]["bias"]), ("scale", updates["layer_norm"]["scale"])):
        np.testing.assert_array_equal(update, 0.0, err_msg=f"{name} must not be decayed")
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_array_equal(updates["final_logits_bias"], 0.0, err_msg="final_logits_bias must stay frozen")


def test_learning_rate_schedules():
    linear = learning_rate_schedule(1.0, 10, 2, "linear")
    assert [float(linear(step)) for step in (0, 1, 2, 6, 10)] == pytest.approx([0, 0.5, 1, 0.5, 0])
    cosine = learning_rate_schedule(1.0, 10, 2, "cosine")
    assert float(cosine(6)) == pytest.approx(0.5) and float(cosine(10)) == pytest.approx(0, abs=1e-7)
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        learning_rate_schedule(1.0, 10, 0, "polynomial")
