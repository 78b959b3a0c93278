"""Gradient accumulation over a batch sharded on 2 devices (run by ``test_optim.py`` in a
subprocess with 2 forced host devices).

Prints one JSON line: whether the compiled accumulated step all-gathers (with and without
the micro-batch sharding constraint), its largest gradient difference from the whole
batch's gradient, and whether consecutive micro-batches (the split this replaces) do
all-gather here, which shows that the check can fail.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from lm import optim
from lm.train import mesh as mesh_lib

PAIRS, K = 16, 2


def grad_fn(params, batch, ref_params=None):
    def loss_fn(w):
        return jnp.mean(jnp.tanh(batch["x"] @ w) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, {}, grads


def consecutive(params, batch):
    """The accumulation as it was: micro-batch j = pairs [j B/k, (j + 1) B/k)."""
    micro = jax.tree_util.tree_map(lambda x: x.reshape(K, PAIRS // K, *x.shape[1:]), batch)
    body = lambda total, mb: (total + grad_fn(params, mb)[2], None)
    return jax.lax.scan(body, jnp.zeros_like(params), micro)[0] / K


def main():
    mesh = mesh_lib.make_mesh()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(PAIRS, 2, 64)).astype(np.float32)
    w = (rng.normal(size=(64, 64)) / 8).astype(np.float32)
    batch = mesh_lib.put_batch({"x": x}, mesh)
    in_shardings = (mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh))
    whole = grad_fn(w, {"x": x})[2]

    def compiled(fn):
        jitted = jax.jit(fn, in_shardings=in_shardings)
        return jitted, jitted.lower(w, batch).compile().as_text()

    result = {"devices": jax.device_count()}
    for name, sharding in (("constrained", mesh_lib.batch_sharding(mesh)), ("unconstrained", None)):
        accumulated = optim.accumulate_gradients(grad_fn, K, batch_sharding=sharding)
        fn, hlo = compiled(lambda p, b: accumulated(p, b)[2])
        result[f"{name}_all_gathers"] = "all-gather" in hlo
        result[f"{name}_vs_whole"] = float(np.abs(np.asarray(fn(w, batch)) - np.asarray(whole)).max())
    result["consecutive_all_gathers"] = "all-gather" in compiled(consecutive)[1]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
