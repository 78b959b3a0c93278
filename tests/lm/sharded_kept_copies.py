"""Three logits-SAM steps of gpt2-tiny under bf16 compute, FSDP-sharded over 4 devices
(``lm.train.train``, run by ``test_train_state.py`` in a subprocess with 4 forced host
devices), with and without the kept bf16 copies of the multiplied matrices.

Prints one JSON line: the largest difference between the two runs' parameters (the same
program but for where the copies come from: bit for bit), whether every copy is sharded as
its parameter is, and how many copies the state holds.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lm import models, objectives, optim
from lm.train import TrainConfig, train

PAIRS, LENGTH, PROMPT = 4, 16, 6


def batch_at(k):
    rng = np.random.default_rng(k)
    loss_mask = np.zeros((PAIRS, 2, LENGTH), np.int32)
    loss_mask[..., PROMPT:] = 1
    return {"input_ids": rng.integers(0, 64, (PAIRS, 2, LENGTH)).astype(np.int32),
            "attention_mask": np.ones((PAIRS, 2, LENGTH), np.int32), "loss_mask": loss_mask}


def main(out):
    cfg = models.builtin_config("gpt2-tiny", dtype="bfloat16")
    params = models.init_params(cfg, jax.random.PRNGKey(0))
    grad_fn = objectives.make_grad_fn(cfg, mode="logits-sam", rho=0.05, chunk_size=8)
    tx = optim.make_optimizer(1e-2, total_steps=3, schedule="constant")
    config = TrainConfig(steps=3, batch_size=PAIRS, mesh="fsdp=4", progress=False, plots=False)
    ref = objectives.frozen_reference(cfg, params)
    runs = {}
    for name, multiply in (("kept", objectives.kept_multiply(cfg, "logits-sam")), ("cast", None)):
        runs[name] = train(grad_fn, tx, jax.tree_util.tree_map(jnp.copy, params), batch_at, config,
                           f"{out}/{name}", ref_params=ref, multiply=multiply).state
    kept, cast = runs["kept"], runs["cast"]
    diff = max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
               for a, b in zip(jax.tree_util.tree_leaves(kept.params), jax.tree_util.tree_leaves(cast.params)))
    pairs = [(c, p) for c, p in zip(jax.tree_util.tree_leaves(kept.multiplied, is_leaf=lambda x: x is None),
                                    jax.tree_util.tree_leaves(kept.params)) if c is not None]
    print(json.dumps({"devices": jax.device_count(), "kept_vs_cast": diff, "copies": len(pairs),
                      "sharded_alike": all(c.sharding == p.sharding for c, p in pairs),
                      "some_split": any(len(c.sharding.device_set) > 1 and not c.sharding.is_fully_replicated
                                        for c, _ in pairs)}))


if __name__ == "__main__":
    main(sys.argv[1])
