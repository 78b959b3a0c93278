"""Where a DPO step's time goes, by timing its parts alone: no profiler needed.

    parts = time_parts(cfg, options, tx, params, ref_params, batch, steps, step_ms)

Each part is the trainer's own code, compiled and timed on its own, as the bench's
pipelined step is (``steps`` calls dispatched back to back and waited for once,
:func:`pipelined_ms`: the device's time; waited for one by one, a part pays the host's
dispatch of every array it takes, about 6 ms of the optimizer's ~860 at gpt2-124m. A part
whose calls do not consume each other's results is waited for every few calls, so that the
results its queued calls hold stay under :data:`IN_FLIGHT_BYTES`; built by
:func:`part_calls`, from :func:`head_call` and :func:`optimizer_call` among others), so the
parts of one step are

  optimizer   global-norm clipping, AdamW and the finite-step bookkeeping:
              :func:`lm.train.make_train_step` with a gradient read from its input.
  reference   the frozen reference's forward, trunk and head
              (:func:`lm.objectives.reference_logps`); none with a precomputed reference.
  trunk       the policy trunk's forward and backward, to the final norm, with the
              step's remat (the gradient of ⟨h(θ), c⟩ for a fixed cotangent c).
  head        the policy head's forward and backward and the DPO loss from fixed final
              hidden states h: :func:`lm.objectives.make_model_grad_fn` with h and W as its
              only parameters, so logits-SAM's inner pass and perturbation are in it too.

and ``rest`` = the pipelined step − their sum: what only the whole step does (the trunk's backward
meeting the head's, buffers the parts pass between them, scheduling across the parts).
A part XLA runs faster inside the whole step than alone makes ``rest`` negative.
Logits-SAM changes only the head, so its rows time the head alone (its extra time next
to the head's: :func:`experiments.bench.add_overheads`); full SAM runs every part but
the optimizer and the reference twice, and its rows time none.
"""

from __future__ import annotations

import dataclasses
import functools
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
    reference: str = "frozen"


def call_seconds(call: Callable[[], Any], steps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of each of ``steps`` calls ``call()`` after ``warmup`` untimed ones,
    ``block_until_ready`` on each result (the bench times its whole step the same way)."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return times


#: Results held at once by a part's queued calls (module docstring): a call that does not
#: consume the one before keeps its results until it has run, so those calls are waited
#: for in groups whose results stay under this (the trunk's gradients at 2.65B, 5.3 GB, are
#: waited for one by one).
IN_FLIGHT_BYTES = 2 << 30


def pipelined_seconds(call: Callable[[], Any], steps: int, group: int | None = None) -> float:
    """Wall seconds a call takes when ``steps`` calls are dispatched back to back and only
    the last result is waited for (each call consumes the one before: a train step on its
    donated state), as the trainer runs its steps between syncs; with ``group``, every
    ``group``-th result is waited for too."""
    t0 = time.perf_counter()
    for i in range(steps):
        out = call()
        if group and (i + 1) % group == 0:
            jax.block_until_ready(out)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def pipelined_ms(call: Callable[[], Any], steps: int, warmup: int = 1,
                 chained: bool = False) -> float:
    """:func:`pipelined_seconds` in ms, after ``warmup`` (≥ 1) calls waited for one by one
    (the first compiles). Unless ``chained`` (each call consumes the last one's donated
    results, so they are never held twice), in groups whose results stay under
    :data:`IN_FLIGHT_BYTES`."""
    if warmup < 1:
        raise ValueError(f"pipelined_ms: warmup must be at least 1 (the call that compiles), "
                         f"got {warmup}")
    for _ in range(warmup):
        results = jax.block_until_ready(call())
    size = sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(results))
    del results
    group = None if chained else max(1, IN_FLIGHT_BYTES // max(1, size))
    return 1e3 * pipelined_seconds(call, steps, group)


def part_names(options: StepOptions) -> tuple[str, ...]:
    """The parts a step of ``options`` has that its row times (module docstring)."""
    return tuple(part for part in PARTS[options.mode]
                 if part != "reference" or options.reference == "frozen")


def part_calls(cfg: Any, options: StepOptions, tx: optax.GradientTransformation,
               params: Any, ref_params: Any, batch: dict) -> dict[str, Callable[[], Any]]:
    """Each of :func:`part_names` as a call of no arguments that runs it once (jitted; the
    first call compiles). The optimizer's donates a state built on ``params``, so it is
    the last to run: after it, ``params`` are gone."""
    ids, attn, _ = objectives.flatten_pairs(batch)
    trunk = objectives.decoder_trunk(cfg, remat=options.remat)
    hidden = jax.eval_shape(lambda p: trunk(p, ids, attn), params)
    # Random values of the hidden states' shape: a head on zeros could run faster.
    noise = 0.5 * jax.random.normal(jax.random.PRNGKey(1), hidden.shape, jnp.float32)
    h = noise.astype(hidden.dtype)
    calls: dict[str, Callable[[], Any]] = {}
    for part in part_names(options):
        if part == "reference":
            reference = objectives.make_reference_fn(cfg, chunk_size=options.chunk_size,
                                                     head_dtype=options.head_dtype)
            calls[part] = lambda: reference(ref_params, batch)
        elif part == "trunk":
            # Differentiated as the step does: with respect to the matrices it multiplies,
            # which the step keeps from its last update (lm.objectives.kept_multiply).
            multiplied = jax.jit(functools.partial(objectives.multiplied_params, cfg))(params)
            trunk_grad = jax.jit(jax.grad(
                lambda q, c: jnp.vdot(trunk(q, ids, attn).astype(jnp.float32), c)))
            calls[part] = lambda: trunk_grad(multiplied, noise)
        elif part == "head":
            calls[part] = head_call(cfg, options, params, h, batch)
        else:
            calls[part] = optimizer_call(cfg, tx, params)
    return calls


def time_parts(cfg: Any, options: StepOptions, tx: optax.GradientTransformation,
               params: Any, ref_params: Any, batch: dict, steps: int, step_ms: float) -> dict:
    """Pipelined ms of each part (:func:`part_calls`, :func:`pipelined_ms`) and, with every
    part of an adamw step, ``rest``, ``step_ms`` (the pipelined step's) less their sum
    (module docstring). ``params`` is consumed."""
    out = {part: pipelined_ms(call, steps, chained=part == "optimizer")
           for part, call in part_calls(cfg, options, tx, params, ref_params, batch).items()}
    if options.mode == "adamw":
        out["rest"] = step_ms - sum(out.values())
    return out


def optimizer_call(cfg, tx, params) -> Callable[[], Any]:
    """The step's update alone: a gradient of the parameters' shapes and of the dtypes the
    step's gradient has (:func:`lm.objectives.multiplied_params`; a scaled copy, so
    clipping and AdamW see ordinary values) taken as the ``batch``, and the copies of the
    multiplied matrices an adamw step writes with it; returns the state."""
    grads = objectives.multiplied_params(cfg, jax.tree_util.tree_map(lambda p: 1e-3 * p, params))
    multiply = objectives.kept_multiply(cfg, "adamw")
    step = jax.jit(make_train_step(lambda p, g, _: (jnp.float32(0), {}, g), tx,
                                   multiply=multiply), donate_argnums=0)
    state = create_train_state(params, tx, 0, multiply)

    def call():
        nonlocal state
        state, _ = step(state, grads, None)
        return state

    return call


def head_call(cfg, options: StepOptions, params, h, batch) -> Callable[[], Any]:
    """The policy head's fwd + bwd (and logits-SAM's inner pass) on fixed hidden states,
    with precomputed reference log-probs: the step's head work, nothing of the trunk.
    Returns ``(loss, metrics, grads)`` with grads ``{"hidden", "head"}``."""
    grad_fn = objectives.make_model_grad_fn(
        lambda p, _ids, _attn: p["hidden"], lambda p: p["head"], mode=options.mode,
        rho=options.rho, chunk_size=options.chunk_size, reference="precomputed",
        head_dtype=options.head_dtype)
    pairs = batch["input_ids"].shape[0]
    batch = {**batch, "ref_logps": batch.get("ref_logps",
                                             jnp.full((pairs, 2), -100.0, jnp.float32))}
    head_grad = jax.jit(grad_fn)
    inputs = {"hidden": h, "head": output_head(cfg, params)}
    return lambda: head_grad(inputs, batch, None)
