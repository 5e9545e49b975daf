"""bart_jax.training.train_step: accumulated micro-batches make the update of one larger batch,
and the frozen final_logits_bias gets none."""

from __future__ import annotations

import jax
import numpy as np
import optax
from hf_reference import seq2seq_training_batch, tiny_flax_model

from bart_jax.training import objectives
from bart_jax.training.optimizer import trainable_mask
from bart_jax.training.train_step import create_train_state, make_train_step


def test_gradient_accumulation_is_one_larger_batch():
    module, params = tiny_flax_model("BartForConditionalGeneration", dropout=0.0)
    schedule = optax.constant_schedule(1.0)
    # Plain SGD: the new params differ from the old by exactly the gradient (Adam would amplify
    # float rounding in near-zero gradients).
    optimizer = optax.sgd(schedule)
    step = jax.jit(make_train_step(objectives.make_objective(module, "seq2seq"), optimizer, trainable_mask(params),
                                   schedule))
    batch = seq2seq_training_batch(module.config.vocab_size)
    whole = {name: value[None] for name, value in batch.items()}
    halves = {name: value.reshape(2, 2, *value.shape[1:]) for name, value in batch.items()}
    key = jax.random.PRNGKey(0)
    one, metrics_one = step(create_train_state(params, optimizer), whole, key)
    two, metrics_two = step(create_train_state(params, optimizer), halves, key)
    np.testing.assert_allclose(metrics_one["loss"], metrics_two["loss"], rtol=1e-6)
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(one.params), jax.tree.leaves(one.params),
                          jax.tree.leaves(two.params)):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=jax.tree_util.keystr(path[0]))
    assert int(one.step) == int(two.step) == 1
    np.testing.assert_array_equal(one.params["final_logits_bias"], params["final_logits_bias"],
                                  err_msg="the frozen final_logits_bias got a gradient")
