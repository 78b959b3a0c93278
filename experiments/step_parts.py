"""Where a DPO step's time goes, by timing its parts alone: no profiler needed.

    parts = time_parts(cfg, mode, case, options, params, ref_params, batch, steps)

Each part is the trainer's own code, compiled and timed on its own (median of ``steps``
calls, ``block_until_ready`` after each), so the parts of one step are

  optimizer   global-norm clipping, AdamW and the finite-step bookkeeping:
              :func:`lm.train.make_train_step` with a gradient read from its input.
  reference   the frozen reference's forward, trunk and head
              (:func:`lm.objectives.reference_logps`).
  trunk       the policy trunk's forward and backward, to the final norm, with the
              step's remat (the gradient of ⟨h(θ), c⟩ for a fixed cotangent c).
  head        the policy head's forward and backward and the DPO loss from fixed final
              hidden states h: :func:`lm.objectives.make_model_grad_fn` with h and W as its
              only parameters, so logits-SAM's inner pass and perturbation are in it too.

and ``rest_ms`` = step − their sum: what only the whole step does (the trunk's backward
meeting the head's, buffers the parts pass between them, scheduling across the parts).
A part XLA runs faster inside the whole step than alone makes ``rest_ms`` negative.
Logits-SAM changes only the head, so its rows time the head alone (its extra time next
to the head's: :func:`experiments.bench.add_overheads`); full SAM runs every part but
the optimizer and the reference twice, and its rows time none.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lm import objectives
from lm.models import output_head
from lm.train import create_train_state, make_train_step

# The optimizer part last: it takes the parameters over (donated).
PARTS = {"adamw": ("reference", "trunk", "head", "optimizer"), "logits-sam": ("head",),
         "sam": ()}


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the step was built with (:func:`experiments.bench.build_step`)."""

    mode: str
    rho: float
    chunk_size: int | None
    head_dtype: str | None
    remat: bool


def median_ms(call: Callable[[], Any], steps: int, warmup: int = 1) -> float:
    """Median wall time of ``call()`` in ms, ``block_until_ready`` on each result."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_parts(cfg: Any, options: StepOptions, tx: optax.GradientTransformation,
               params: Any, ref_params: Any, batch: dict, steps: int, step_ms: float) -> dict:
    """Median ms of each of :data:`PARTS` [``options.mode``] and, with all four, ``rest_ms``
    (module docstring). ``params`` is consumed: the optimizer part donates a state built
    on it."""
    ids, attn, _ = objectives.flatten_pairs(batch)
    trunk = objectives.decoder_trunk(cfg, remat=options.remat)
    hidden = jax.eval_shape(lambda p: trunk(p, ids, attn), params)
    key = jax.random.PRNGKey(1)
    # Random values of the hidden states' shape and dtype: a head on zeros could run faster.
    h = (0.5 * jax.random.normal(key, hidden.shape, jnp.float32)).astype(hidden.dtype)
    out: dict[str, float] = {}
    for part in PARTS[options.mode]:
        if part == "optimizer":
            out[part] = _optimizer_ms(tx, params, steps)
        elif part == "reference":
            reference = objectives.make_reference_fn(cfg, chunk_size=options.chunk_size,
                                                     head_dtype=options.head_dtype)
            out[part] = median_ms(lambda: reference(ref_params, batch), steps)
        elif part == "trunk":
            trunk_grad = jax.jit(jax.grad(
                lambda p, c: jnp.vdot(trunk(p, ids, attn).astype(jnp.float32), c)))
            out[part] = median_ms(lambda: trunk_grad(params, h.astype(jnp.float32)), steps)
        else:
            out[part] = _head_ms(cfg, options, params, h, batch, steps)
    if len(out) == len(PARTS["adamw"]):
        out["rest_ms"] = step_ms - sum(out.values())
    return out


def _optimizer_ms(tx, params, steps: int) -> float:
    """The step's update alone: a gradient of the parameters' shapes (a scaled copy, so
    clipping and AdamW see ordinary values) taken as the ``batch``."""
    grads = jax.tree_util.tree_map(lambda p: 1e-3 * p, params)
    step = jax.jit(make_train_step(lambda p, g, _: (jnp.float32(0), {}, g), tx),
                   donate_argnums=0)
    state = create_train_state(params, tx, 0)

    def call():
        nonlocal state
        state, _ = step(state, grads, None)
        return state

    return median_ms(call, steps)


def _head_ms(cfg, options: StepOptions, params, h, batch, steps: int) -> float:
    """The policy head's fwd + bwd (and logits-SAM's inner pass) on fixed hidden states,
    with precomputed reference log-probs: the step's head work, nothing of the trunk."""
    head = output_head(cfg, params)
    grad_fn = objectives.make_model_grad_fn(
        lambda p, _ids, _attn: p["hidden"], lambda p: p["head"], mode=options.mode,
        rho=options.rho, chunk_size=options.chunk_size, reference="precomputed",
        head_dtype=options.head_dtype)
    pairs = batch["input_ids"].shape[0]
    batch = {**batch, "ref_logps": jnp.full((pairs, 2), -100.0, jnp.float32)}
    head_grad = jax.jit(grad_fn)
    return median_ms(lambda: head_grad({"hidden": h, "head": head}, batch, None), steps)
