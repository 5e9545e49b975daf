"""`Linear`: PyTorch's weight layout, its parameters' shapes checked by name, under both kernel
policies."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax.model.linear import Linear


@pytest.mark.parametrize("name, shape", [("weight", (40, 25)), ("bias", (41,))])
@pytest.mark.parametrize("kernels", ["auto", "portable", "cpu"])
def test_given_parameter_of_another_shape_is_refused_by_name(name, shape, kernels):
    # Linear checks given parameters' shapes itself (bart_jax/model/parameters.py), not through flax.
    module = Linear(40, kernels=kernels)
    inputs = jnp.ones((2, 24))
    params = module.init(jax.random.PRNGKey(0), inputs)["params"]
    assert params["weight"].shape == (40, 24) and params["bias"].shape == (40,)
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, inputs)),
                               np.asarray(inputs @ params["weight"].T + params["bias"]), atol=1e-5)
    wrong = dict(params, **{name: jnp.zeros(shape)})
    with pytest.raises(ValueError, match=re.escape(f"parameter {name} has shape {shape}, expected")):
        module.apply({"params": wrong}, inputs)
