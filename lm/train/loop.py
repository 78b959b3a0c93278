"""The training loop: a jitted, sharded step over any ``grad_fn`` and optax optimizer.

``grad_fn(params, batch, ref_params) -> (loss, metrics, grads)`` is the whole objective
(plain, logits-SAM or SAM gradients of any DPO-family loss); this module only moves
state: it shards it over a ``("data", "fsdp")`` mesh, applies the optimizer, guards
against non-finite values, logs, evaluates and checkpoints. Nothing in the step syncs
with the host: metrics stay on device and are fetched every ``log_every`` steps.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.train import mesh as mesh_lib
from lm.train.checkpoint import Checkpointer, abstract_like
from lm.train.logging import MetricsLog, ProgressBar, plot_metrics, read_jsonl
from lm.train.mesh import ConfigError
from lm.train.state import TrainState, create_train_state

Batch = Mapping[str, np.ndarray]
GradFn = Callable[[Any, Any, Any], tuple[jax.Array, dict[str, jax.Array], Any]]
EvalFn = Callable[[Any, Any, Any], tuple[jax.Array, dict[str, jax.Array]]]


class NonFiniteError(RuntimeError):
    """Loss or gradients were NaN/inf; the update of that step was not applied."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long and how the loop runs (the objective and data live elsewhere).

    ``checkpoint_every = 0`` saves only at the end; ``eval_every = 0`` never evaluates
    during training (one eval still runs at the end when eval data is given).
    """

    steps: int
    batch_size: int
    seed: int = 0
    mesh: str | None = None
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    skip_nonfinite: bool = False
    progress: bool = True
    plots: bool = True


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    mesh: jax.sharding.Mesh
    last_metrics: dict[str, float]
    checkpoint_dir: str


def _all_finite(tree: Any) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def make_train_step(
    grad_fn: GradFn, tx: optax.GradientTransformation, *, skip_nonfinite: bool = False
) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """The un-jitted step ``(state, batch, ref_params) -> (state, metrics)``.

    A step whose loss or gradients are non-finite never changes params or optimizer
    state. With ``skip_nonfinite`` the batch is consumed and ``skipped`` counts it;
    otherwise ``halted_at`` records the step and the state freezes (every later step
    is a no-op) until the host, at its next sync, stops the run.
    """

    def step(state: TrainState, batch: Any, ref_params: Any):
        loss, metrics, grads = grad_fn(state.params, batch, ref_params)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng, _ = jax.random.split(state.rng)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
            new = state.replace(
                step=state.step + 1,
                params=keep(params, state.params),
                opt_state=keep(opt_state, state.opt_state),
                rng=rng,
                skipped=state.skipped + (~finite).astype(jnp.int32),
            )
        else:
            running = state.halted_at < 0
            advanced = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
            new = jax.tree_util.tree_map(lambda n, o: jnp.where(finite & running, n, o), advanced, state)
            new = new.replace(halted_at=jnp.where(running & ~finite, state.step, state.halted_at))
        out = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), skipped=new.skipped)
        return new, out

    return step


def window_means(window: list[Mapping[str, Any]], skipped_before: int) -> dict[str, float]:
    """The logged record of a window of steps: each metric's mean over the applied steps.

    ``window[i]`` is step i's fetched metrics, whose ``skipped`` is the running count of
    skipped steps, so step i was skipped iff its count exceeds step i-1's
    (``skipped_before`` is the count before the window). A skipped step's loss and
    metrics are non-finite, so averaging them in would poison the whole window; the
    record keeps the running ``skipped`` count and, when every step was skipped, no means.
    """
    counts = np.array([skipped_before] + [int(m["skipped"]) for m in window])
    applied = [m for m, new_skips in zip(window, np.diff(counts)) if new_skips == 0]
    keys = [key for key in window[-1] if key != "skipped"] if applied else []
    out = {key: float(np.mean([m[key] for m in applied])) for key in keys}
    out["skipped"] = float(counts[-1])
    return out


def eval_from_grad_fn(grad_fn: GradFn) -> EvalFn:
    """Loss and metrics of ``grad_fn`` (XLA drops the unused backward pass under jit)."""
    return lambda params, batch, ref_params: grad_fn(params, batch, ref_params)[:2]


def tokens_in(batch: Batch) -> int:
    """Tokens a batch holds: non-padding positions, or rows when there is no mask."""
    if "attention_mask" in batch:
        return int(np.asarray(batch["attention_mask"]).sum())
    return int(np.shape(next(iter(batch.values())))[0])


def _jit_with_ref(fn: Callable, ref_params: Any, in_shardings: tuple, **kwargs) -> Callable:
    """jit ``fn(*args, ref_params)``; a ``None`` reference is closed over, not passed."""
    if ref_params is None:
        jitted = jax.jit(lambda *args: fn(*args, None), in_shardings=in_shardings[:-1], **kwargs)
        return lambda *args: jitted(*args[:-1])
    return jax.jit(fn, in_shardings=in_shardings, **kwargs)


def train(
    grad_fn: GradFn,
    tx: optax.GradientTransformation,
    params: Any,
    batch_at: Callable[[int], Batch],
    config: TrainConfig,
    out_dir: str,
    *,
    ref_params: Any = None,
    eval_batches: Callable[[], Iterable[Batch]] | None = None,
    eval_fn: EvalFn | None = None,
    resume: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train for ``config.steps`` steps from scratch or, with ``resume``, from the latest
    checkpoint in ``out_dir/checkpoints``.

    Args:
      grad_fn: the objective, ``(params, batch, ref_params) -> (loss, metrics, grads)``.
      tx: the optimizer.
      params: initial parameters (host or device arrays); ignored when resuming.
      batch_at: ``k -> batch k``, a pure function of k (and the data seed), dicts of
        arrays with the pair axis first; this is what makes resume exact.
      config: see :class:`TrainConfig`.
      out_dir: run folder: ``metrics.jsonl``, ``checkpoints/``, PNG plots. In a
        multi-process job, one folder every process sees (a shared file system): each
        process writes its shards of a checkpoint there, process 0 everything else.
      ref_params: frozen reference parameters (FSDP-sharded like ``params``) or None.
      eval_batches: ``() -> iterable of batches`` of a held-out split.
      eval_fn: ``(params, batch, ref_params) -> (loss, metrics)``; default: ``grad_fn``'s.
      meta: JSON-able config echo stored with every checkpoint.

    Raises:
      ConfigError: before any compilation, for a mesh or batch size that cannot run.
      NonFiniteError: a non-finite loss/gradient (unless ``skip_nonfinite``).
      CheckpointError: the checkpoint to resume from cannot be restored.
    """
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_batch_size(config.batch_size, mesh.shape)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=config.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise ConfigError(f"{ckpt.directory} already holds checkpoints (step {latest}); pass --resume or a new --out")

    init = lambda p: create_train_state(p, tx, config.seed)
    abstract = jax.eval_shape(init, params)
    shardings = mesh_lib.state_shardings(abstract, mesh)
    if resume and latest is not None:
        state, saved = ckpt.restore(abstract_like(abstract, shardings))
        if saved.get("seed", config.seed) != config.seed:
            raise ConfigError(f"--seed {config.seed} differs from the checkpoint's seed {saved['seed']} in {ckpt.directory}")
    else:
        if resume:
            print(f"--resume: no checkpoint in {ckpt.directory}; starting from step 0", file=sys.stderr)
        state = jax.jit(init, out_shardings=shardings)(params)
    start, skipped = (int(x) for x in jax.device_get((state.step, state.skipped)))

    batch_sh = mesh_lib.batch_sharding(mesh)
    repl = mesh_lib.replicated(mesh)
    ref_sh = None if ref_params is None else mesh_lib.state_shardings(ref_params, mesh)
    if ref_params is not None:
        ref_params = jax.device_put(ref_params, ref_sh)
    step_fn = _jit_with_ref(
        make_train_step(grad_fn, tx, skip_nonfinite=config.skip_nonfinite),
        ref_params,
        (shardings, batch_sh, ref_sh),
        out_shardings=(shardings, repl),
        donate_argnums=0,
    )
    eval_step = _jit_with_ref(
        eval_fn or eval_from_grad_fn(grad_fn),
        ref_params,
        (shardings.params, batch_sh, ref_sh),
        out_shardings=repl,
    )

    # Every process trains; only process 0 writes the run folder's metrics and plots
    # (the folder is shared in a multi-host job, and appends from each would repeat lines).
    primary = jax.process_index() == 0
    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), keep_until=start) if primary else None
    bar = ProgressBar(config.steps) if config.progress and primary else None
    meta = dict(meta or {}, seed=config.seed)
    pending: list[dict[str, jax.Array]] = []
    tokens, last, saved_step = 0, {}, (start if resume and latest is not None else None)
    tick = time.perf_counter()

    def check_halted() -> None:
        halted = int(jax.device_get(state.halted_at))
        if halted >= 0:
            ckpt.wait()
            good = ckpt.latest_step()
            where = f"last good checkpoint: {ckpt.step_dir(good)}" if good is not None else "no checkpoint was written"
            raise NonFiniteError(
                halted, f"non-finite loss or gradients at step {halted}; the update was not applied ({where})"
            )

    def evaluate(step: int) -> None:
        check_halted()  # a halted run's params are frozen: its evals would repeat the last good one
        sums: dict[str, float] = {}
        count = 0
        for batch in eval_batches():
            loss, metrics = eval_step(state.params, mesh_lib.put_batch(batch, mesh), ref_params)
            for k, v in jax.device_get(dict(metrics, loss=loss)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
        if count and log:
            log.write(step, "eval", {k: v / count for k, v in sums.items()})

    try:
        for k in range(start, config.steps):
            batch = batch_at(k)
            tokens += tokens_in(batch)
            state, metrics = step_fn(state, mesh_lib.put_batch(batch, mesh), ref_params)
            pending.append(metrics)
            done = k + 1
            if done % config.log_every == 0 or done == config.steps:
                last = window_means(jax.device_get(pending), skipped)
                skipped = int(last["skipped"])
                check_halted()
                now = time.perf_counter()
                last["tokens_per_s"] = tokens / max(now - tick, 1e-9)
                if bar:
                    bar.update(done, last)
                if log:
                    log.write(done, "train", last)
                pending, tokens, tick = [], 0, now
            if config.checkpoint_every and done % config.checkpoint_every == 0:
                check_halted()
                saved_step = ckpt.save(state, meta)
            if eval_batches is not None and config.eval_every and done % config.eval_every == 0:
                evaluate(done)
        check_halted()
        end = int(jax.device_get(state.step))
        if saved_step != end:
            ckpt.save(state, meta)
        if eval_batches is not None and not (config.eval_every and end % config.eval_every == 0):
            evaluate(end)
    finally:
        if bar:
            bar.close()
        if log:
            log.close()
        ckpt.close()
    if config.plots and log:
        plot_metrics(read_jsonl(log.path), out_dir)
    return TrainResult(state=state, mesh=mesh, last_metrics=last, checkpoint_dir=ckpt.directory)
