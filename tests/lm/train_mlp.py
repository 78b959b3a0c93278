"""A tiny self-contained run of ``lm.train.train`` for subprocess tests.

A 2-layer MLP regresses synthetic targets; batch k is a pure function of (seed, k), so
runs are resumable. Prints ``STEP-DONE k`` after each host step when ``--sleep`` > 0 (so
a test can kill it mid-run) and writes the final params to ``--out/params.npz`` (process 0
of a ``--coordinator`` job).
Exit codes: 0 ok, 2 configuration error, 3 non-finite, 4 checkpoint error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.train import CheckpointError, ConfigError, NonFiniteError, TrainConfig, train
from lm.train.mesh import maybe_initialize_distributed, to_host

D_IN, D_HID, D_OUT = 8, 16, 4


def init_params(seed: int) -> dict:
    # numpy, not jax.random: eager jax ops each compile, which dominates a tiny run.
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.normal(size=(D_IN, D_HID)) / np.sqrt(D_IN)).astype(np.float32),
        "b1": np.zeros((D_HID,), np.float32),
        "w2": (rng.normal(size=(D_HID, D_OUT)) / np.sqrt(D_HID)).astype(np.float32),
    }


def grad_fn(params, batch, ref_params):
    def loss_fn(p):
        pred = jnp.tanh(batch["x"] @ p["w1"] + p["b1"]) @ p["w2"]
        loss = jnp.mean(jnp.square(pred - batch["y"]))
        return loss, {"rewards/accuracies": jnp.mean((pred > 0) == (batch["y"] > 0))}

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, metrics, grads


def make_batch_at(seed: int, batch_size: int, nan_at: set[int]):
    def batch_at(k: int) -> dict:
        rng = np.random.default_rng([seed, k])
        x = rng.normal(size=(batch_size, 2, D_IN)).astype(np.float32)
        y = np.sin(x[..., :D_OUT]).astype(np.float32)
        if k in nan_at:
            x[0, 0, 0] = np.nan
        return {"x": x, "y": y}

    return batch_at


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mesh", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--eval-sizes", type=int, nargs="+", help="rows of each eval batch (default: 2 x --batch-size)")
    ap.add_argument("--nan-at", type=int, nargs="*", default=[])
    ap.add_argument("--skip-nonfinite", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--meta", default="{}", help="train()'s meta, as JSON")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--coordinator")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    args = ap.parse_args()
    maybe_initialize_distributed(
        coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)

    base = make_batch_at(0, args.batch_size, set(args.nan_at))

    def batch_at(k):
        if args.sleep:
            time.sleep(args.sleep)
            print(f"STEP-DONE {k}", flush=True)
        return base(k)

    eval_sizes = args.eval_sizes or [args.batch_size] * 2
    heldout = [make_batch_at(1, rows, set())(i) for i, rows in enumerate(eval_sizes)]
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        mesh=args.mesh,
        log_every=args.log_every,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        skip_nonfinite=args.skip_nonfinite,
        progress=False,
        plots=False,
    )
    tx = optax.adamw(1e-2)
    try:
        result = train(
            grad_fn, tx, init_params(0), batch_at, config, args.out,
            eval_batches=lambda: heldout, resume=args.resume, meta=json.loads(args.meta),
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 4
    params = to_host(result.state.params)
    specs = {k: str(v.sharding.spec) for k, v in result.state.params.items()}
    if jax.process_index() == 0:
        np.savez(os.path.join(args.out, "params.npz"), **params)
    print("SPECS", specs, "SKIPPED", int(result.state.skipped), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
