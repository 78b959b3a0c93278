"""Logits-SAM gradients of gpt2-tiny on one device and FSDP+data-sharded over 8 (run by
``test_objectives_sharded.py`` in a subprocess with 8 forced host devices).

Prints one JSON line: the largest gradient difference between the sharded and the
single-device computation, and between the single-device one and a per-shard-norm
variant (each half of the batch perturbed by its own ‖g‖), which is what a wrong,
shard-local norm would compute; then the same sharded check for ``head_dtype="split"``
and its difference from plain logits-SAM (float32: the same math); then bf16 with a kept
chunked head, whose perturbed pass reads its logits once (the relative difference of all
gradients, and the all-gathers its target scatter needs under data parallelism: none).
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


def relative_diff(a, b):
    flat = [np.ravel(np.asarray(x, np.float32)) for x in jax.tree_util.tree_leaves((a, b))]
    half = len(flat) // 2
    a, b = np.concatenate(flat[:half]), np.concatenate(flat[half:])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


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
    # bf16 with a kept chunked head (4 chunks of 4): the perturbed head's one-read pass.
    kept_cfg = models.builtin_config("gpt2-tiny", dtype="bfloat16")
    kept_fn = jax.jit(objectives.make_grad_fn(kept_cfg, mode="logits-sam", rho=0.05, chunk_size=4))
    kept_single = kept_fn(policy, batch, reference)[2]
    kept_sharded = kept_fn(shard(policy), mesh_lib.put_batch(batch, mesh), shard(reference))[2]
    data_mesh = mesh_lib.make_mesh("data=8")
    hlo = kept_fn.lower(policy, mesh_lib.put_batch(batch, data_mesh), reference).compile().as_text()
    gathers = [line for line in hlo.splitlines() if " all-gather(" in line and "scatter" in line]
    print(json.dumps({"devices": jax.device_count(), "sharded": max_diff(sharded, single),
                      "per_shard_norm": max_diff(per_shard, single),
                      "split_sharded": max_diff(split_sharded, split_single),
                      "split_vs_plain": max_diff(split_single, single),
                      "kept_sharded": relative_diff(kept_sharded, kept_single),
                      "kept_scatter_gathers": len(gathers)}))


if __name__ == "__main__":
    main()
