"""Running BART over a device mesh with JAX's SPMD partitioner (`jax.jit` + `NamedSharding`).

One mesh with axes ("data", "fsdp", "tensor") (`mesh.py`); logical axis names on every parameter
and on the key activations and the KV cache, mapped to mesh axes by one rules table (`rules.py`);
placing arrays shard by shard (`placement.py`); jitted, sharded entry points (`jit.py`); several
processes (`distributed.py`).
"""

from bart_jax.model.partitioning import (CACHE_ANCESTORS, HIDDEN, INDIVISIBLE_CHOICES, KEYS, LOGITS, MLP_HIDDEN,
                                         PER_HEAD, TIME_MAJOR, activation_sharding, constrain, sharding_active)
from bart_jax.parallel.jit import (jit_decode_step, jit_forward, jit_generate, jit_init, jit_sharded, jit_train_step,
                                   with_activation_sharding)
from bart_jax.parallel.mesh import MESH_AXES, PRESETS, make_mesh, preset_mesh
from bart_jax.parallel.placement import (batch_axes, batch_sharding, batch_shards, cache_shardings, check_batch,
                                         per_device_bytes, put_sharded, replicated, shard_batch, shard_params,
                                         shard_pretrained)
from bart_jax.parallel.rules import (PARAM_AXES, RULES, Rules, logical_to_spec, param_logical_axes, path_name,
                                     tree_shardings, unmatched_leaves)

__all__ = [
    "CACHE_ANCESTORS", "HIDDEN", "INDIVISIBLE_CHOICES", "KEYS", "LOGITS", "MESH_AXES", "MLP_HIDDEN", "PARAM_AXES",
    "PER_HEAD", "PRESETS", "TIME_MAJOR", "RULES", "Rules", "activation_sharding", "batch_axes", "batch_sharding", "batch_shards",
    "cache_shardings", "check_batch", "constrain", "jit_decode_step", "jit_forward", "jit_generate", "jit_init",
    "jit_sharded", "jit_train_step", "logical_to_spec", "make_mesh", "param_logical_axes", "path_name",
    "per_device_bytes", "preset_mesh", "put_sharded", "replicated", "shard_batch", "shard_params",
    "shard_pretrained", "sharding_active", "tree_shardings", "unmatched_leaves", "with_activation_sharding",
]
