"""Logits-SAM gradients of gpt2-tiny on one device and FSDP+data-sharded over 8 (run by
``test_objectives_sharded.py`` in a subprocess with 8 forced host devices).

Prints one JSON line: the largest gradient difference between the sharded and the
single-device computation, and between the single-device one and a per-shard-norm
variant (each half of the batch perturbed by its own ‖g‖), which is what a wrong,
shard-local norm would compute; then the same sharded check for ``head_dtype="split"``
and its difference from plain logits-SAM (float32: the same math).
"""

import json

import jax
import numpy as np

from lm import models, objectives
from lm.train import mesh as mesh_lib

PAIRS, LENGTH, PROMPT = 8, 16, 6


def max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def main():
    cfg = models.builtin_config("gpt2-tiny")
    reference = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    noise = jax.random.PRNGKey(1)
    policy = jax.tree_util.tree_map(lambda p: p + 0.02 * jax.random.normal(noise, p.shape), reference)
    rng = np.random.default_rng(0)
    loss_mask = np.zeros((PAIRS, 2, LENGTH), np.int32)
    loss_mask[..., PROMPT:] = 1
    batch = {
        "input_ids": rng.integers(0, cfg.vocab_size, (PAIRS, 2, LENGTH)).astype(np.int32),
        "attention_mask": np.ones((PAIRS, 2, LENGTH), np.int32),
        "loss_mask": loss_mask,
    }
    grad_fn = jax.jit(objectives.make_grad_fn(cfg, mode="logits-sam", rho=0.05))
    single = grad_fn(policy, batch, reference)[2]

    mesh = mesh_lib.make_mesh("data=2,fsdp=4")
    shard = lambda tree: jax.device_put(tree, mesh_lib.state_shardings(tree, mesh))
    sharded = grad_fn(shard(policy), mesh_lib.put_batch(batch, mesh), shard(reference))[2]

    halves = [grad_fn(policy, {k: v[s] for k, v in batch.items()}, reference)[2]
              for s in (slice(0, PAIRS // 2), slice(PAIRS // 2, PAIRS))]
    per_shard = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *halves)
    split_fn = jax.jit(objectives.make_grad_fn(cfg, mode="logits-sam", rho=0.05, head_dtype="split"))
    split_single = split_fn(policy, batch, reference)[2]
    split_sharded = split_fn(shard(policy), mesh_lib.put_batch(batch, mesh), shard(reference))[2]
    print(json.dumps({"devices": jax.device_count(), "sharded": max_diff(sharded, single),
                      "per_shard_norm": max_diff(per_shard, single),
                      "split_sharded": max_diff(split_sharded, split_single),
                      "split_vs_plain": max_diff(split_single, single)}))


if __name__ == "__main__":
    main()
