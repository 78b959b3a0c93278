"""The training loop: a jitted, sharded step over any ``grad_fn`` and optax optimizer.

``grad_fn(params, batch, ref_params) -> (loss, metrics, grads)`` is the whole objective
(plain, logits-SAM or SAM gradients of any DPO-family loss); this module only moves
state: it shards it over a ``("data", "fsdp")`` mesh, applies the optimizer, guards
against non-finite values, logs, evaluates and checkpoints. Nothing in the step syncs
with the host: metrics stay on device and are fetched every ``log_every`` steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Collection, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm import optim
from lm.train import mesh as mesh_lib
from lm.train.checkpoint import Checkpointer, abstract_like
from lm.train.logging import MetricsLog, ProgressBar, plot_metrics, read_jsonl, write_text_atomic
from lm.train.mesh import ConfigError
from lm.train.state import Multiply, TrainState, create_train_state, objective_params, with_multiplied

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

    ``mesh`` is a spec (``"data=2,fsdp=4"``; None: every device on ``data``) or the mesh
    a caller built from one to shard with it too (e.g. ``grad_fn``'s micro-batches).
    ``checkpoint_every = 0`` saves only at the end; ``eval_every = 0`` never evaluates
    during training (one eval still runs at the end when eval data is given).
    """

    steps: int
    batch_size: int
    seed: int = 0
    mesh: str | jax.sharding.Mesh | None = None
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    skip_nonfinite: bool = False
    progress: bool = True
    plots: bool = True

    def __post_init__(self):
        least = {"steps": 1, "batch_size": 1, "log_every": 1, "keep_checkpoints": 1,
                 "eval_every": 0, "checkpoint_every": 0}
        for field, low in least.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"TrainConfig.{field} must be an integer >= {low}, got {value!r}")


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    mesh: jax.sharding.Mesh
    last_metrics: dict[str, float]
    checkpoint_dir: str


def make_train_step(
    grad_fn: GradFn, tx: optax.GradientTransformation, *, skip_nonfinite: bool = False,
    multiply: Multiply | None = None,
) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """The un-jitted step ``(state, batch, ref_params) -> (state, metrics)``.

    A step whose loss or gradient norm is non-finite (a NaN or inf anywhere in the
    gradients, or a norm beyond the float range) never changes params or optimizer state.
    With ``skip_nonfinite`` the batch is consumed and ``skipped`` counts it; otherwise
    ``halted_at`` records the step and the state freezes (every later step is a no-op)
    until the host, at its next sync, stops the run.

    ``multiply`` (:func:`lm.objectives.kept_multiply`) keeps the parameters as the
    objective multiplies them in the state (:func:`lm.train.state.multiplied_copies`),
    written with each update, and hands them to ``grad_fn`` in place of ``params``; only
    for a ``grad_fn`` whose result is the same for both. The state must have been created
    with the same ``multiply``.
    """

    def step(state: TrainState, batch: Any, ref_params: Any):
        if (state.multiplied is None) != (multiply is None):
            # Copies handed to a grad_fn that differentiates the stored weights (SAM) would
            # change its gradients.
            raise ValueError("make_train_step: the state keeps copies of the multiplied "
                             "parameters where the step has no multiply, or the other way "
                             "round; create the state with the step's multiply "
                             "(lm.train.create_train_state)")
        loss, metrics, grads = grad_fn(objective_params(state), batch, ref_params)
        # A gradient in the compute dtype (lm.objectives.multiplied_params) is updated in the
        # parameters' dtype, as it would have been computed; an elementwise cast that XLA can
        # fuse into its readers (the norm, the update) rather than write out.
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.params)
        # One test covers every gradient: ‖g‖ is NaN or inf when any entry is (or when the
        # norm itself overflows, a blow-up too). It is the norm that clipping and the metrics
        # compute anyway; a per-leaf isfinite reduction also costs one more read of every
        # gradient, and made XLA compile a 2.65B step several times slower.
        grad_norm = optim.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
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
        new = with_multiplied(new, multiply)
        out = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=new.skipped)
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
    # float64 means: a window resumed from a checkpoint holds Python floats where an
    # uninterrupted one holds float32 arrays, and both must log the same numbers.
    out = {key: float(np.mean(np.asarray([m[key] for m in applied], np.float64))) for key in keys}
    out["skipped"] = float(counts[-1])
    return out


def eval_from_grad_fn(grad_fn: GradFn) -> EvalFn:
    """Loss and metrics of ``grad_fn`` (XLA drops the unused backward pass under jit)."""
    return lambda params, batch, ref_params: grad_fn(params, batch, ref_params)[:2]


def tokens_in(batch: Batch) -> int:
    """Tokens a batch holds: non-padding positions, or rows when there is no mask."""
    if "attention_mask" in batch:
        return int(np.asarray(batch["attention_mask"]).sum())
    return mesh_lib.rows_in(batch)


def eval_means(metrics_of: Callable[[Batch], Mapping[str, Any]], batches: Iterable[Batch]) -> dict[str, float]:
    """Each metric's mean over every row (pair) of ``batches``; ``{}`` when there are none.

    ``metrics_of(batch)`` holds each metric's mean m_b over the n_b rows of batch b (the
    leading dimension of its arrays, :func:`lm.train.mesh.rows_in`), so the mean over all
    rows is Σ_b w_b m_b / Σ_b w_b with w_b ∝ n_b: a smaller last batch counts for what it
    holds. The sums are float64, in batch order, with w_b = n_b / n_1 (relative to the
    first batch): batches of equal size weigh exactly 1, so they give the plain mean of
    the batch means bit for bit.
    """
    rows, metrics = [], []
    for batch in batches:
        rows.append(mesh_lib.rows_in(batch))
        if not rows[-1]:
            raise ValueError("an eval batch has no rows (its metrics would be means of nothing)")
        metrics.append(metrics_of(batch))
    sums: dict[str, float] = {}
    total = 0.0
    # One fetch after every batch is dispatched: a fetch per batch would wait for each.
    for n, values in zip(rows, jax.device_get(metrics)):
        weight = n / rows[0]
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + weight * float(value)
        total += weight
    return {key: value / total for key, value in sums.items()}


def _stop_together(refusal: Exception | None, elsewhere: str) -> None:
    """Raise on every process when any process holds a ``refusal``: its own there, a
    ConfigError saying ``elsewhere`` on the others, which would otherwise wait in the
    first collective until it times out (a collective: all must call it)."""
    if not mesh_lib.on_every_process(refusal is None):
        raise refusal or ConfigError(elsewhere)


def _jit_with_ref(fn: Callable, ref_params: Any, in_shardings: tuple, **kwargs) -> Callable:
    """jit ``fn(*args, ref_params)``; a ``None`` reference is closed over, not passed."""
    if ref_params is None:
        jitted = jax.jit(lambda *args: fn(*args, None), in_shardings=in_shardings[:-1], **kwargs)
        return lambda *args: jitted(*args[:-1])
    return jax.jit(fn, in_shardings=in_shardings, **kwargs)


CHECKPOINTS = "checkpoints"  # the run folder's sub-folder of Orbax checkpoints
METRICS = "metrics.jsonl"    # the run folder's metrics log


def check_run_paths(out_dir: str) -> None:
    """Refuse a run folder whose parts are the wrong kind of file (``ConfigError`` naming
    it): ``out_dir`` or ``checkpoints`` a file (Orbax retried creating the folder for about
    five minutes before a traceback), ``metrics.jsonl`` a folder. Creates nothing."""
    expected = ((out_dir, True, "files"), (os.path.join(out_dir, CHECKPOINTS), True, "checkpoints"),
                (os.path.join(out_dir, METRICS), False, "metrics"))
    for path, folder, what in expected:
        if os.path.lexists(path) and os.path.isdir(path) != folder:  # a dangling link too
            kind = "not a folder" if folder else "a folder"
            raise ConfigError(f"{path} exists and is {kind}, where the run keeps its {what}; "
                              "move it away or choose another --out")


def run_meta(config: TrainConfig, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """``meta`` as JSON reads it back, with the seed and batch size, which fix the batches."""
    return json.loads(json.dumps(dict(meta or {}, seed=config.seed, batch_size=config.batch_size)))


def resolved(meta: Mapping[str, Any], paths: Collection[str]) -> dict[str, Any]:
    """``meta`` with the values of its ``paths`` settings as the files they name (what every
    checkpoint records): each string that names a file or directory becomes its
    ``os.path.realpath``, so another spelling, working directory or symlink of the same
    file compares equal; other values (None, a built-in model's name) stay as they are."""
    def real(value: Any) -> Any:
        if isinstance(value, list):
            return [real(v) for v in value]
        return os.path.realpath(value) if isinstance(value, str) and os.path.exists(value) else value

    return {key: real(value) if key in paths else value for key, value in meta.items()}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "unset" if value is None else str(value)


def resume_conflicts(saved: Mapping[str, Any], meta: Mapping[str, Any], paths: Collection[str] = ()) -> list[str]:
    """``--flag value (checkpoint: other)`` for each key of ``meta`` that the checkpoint's
    record ``saved`` holds with another value, both shown as given. ``paths`` settings compare
    as the files they name (:func:`resolved`), also where ``saved`` holds them as typed (a
    checkpoint written before they were recorded resolved). Keys ``saved`` does not hold are
    not compared: checkpoints written before a setting was recorded stay resumable."""
    ours, theirs = resolved(meta, paths), resolved(saved, paths)
    return [f"{_flag(key)} {_shown(value)} (checkpoint: {_shown(saved[key])})"
            for key, value in meta.items() if key in saved and theirs[key] != ours[key]]


def resume_step(ckpt: Checkpointer, config: TrainConfig, *, resume: bool,
                meta: Mapping[str, Any], paths: Collection[str] = ()) -> int | None:
    """The step of the checkpoint to resume from, or None to start at step 0.

    Refuses (``ConfigError``, one line naming the flags) what the checkpoints' records
    alone show cannot continue: checkpoints without ``resume``, a checkpoint written with
    other settings (``meta``, from :func:`run_meta`, its ``paths`` as files: see
    :func:`resume_conflicts`), or ``config.steps`` below its step.
    """
    latest = ckpt.latest_step()
    if latest is None:
        return None
    if not resume:
        raise ConfigError(f"{ckpt.directory} already holds checkpoints (step {latest}); pass --resume or a new --out")
    conflicts = resume_conflicts(ckpt.meta(latest), meta, paths)
    if conflicts:
        raise ConfigError(f"--resume: {ckpt.step_dir(latest)} was written with other settings: "
                          f"{', '.join(conflicts)}; resume with the checkpoint's, or train in a new --out")
    if config.steps < latest:
        raise ConfigError(f"--steps {config.steps} is below step {latest} of the checkpoint in "
                          f"{ckpt.directory}; resume with --steps {latest} or more")
    return latest


def check_run_folder(out_dir: str, config: TrainConfig, *, resume: bool,
                     meta: Mapping[str, Any] | None = None, paths: Collection[str] = ()) -> None:
    """Refuse what :func:`train` would refuse from the run folder's checkpoint records, before
    a caller loads a model and data for nothing (``ConfigError``; see :func:`resume_step`).
    Creates nothing."""
    check_run_paths(out_dir)
    directory = os.path.join(out_dir, CHECKPOINTS)
    if not os.path.isdir(directory):
        return
    ckpt = Checkpointer(directory)
    try:
        resume_step(ckpt, config, resume=resume, meta=run_meta(config, meta), paths=paths)
    finally:
        ckpt.close()


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
    paths: Collection[str] = (),
    files: Mapping[str, str] | None = None,
    multiply: Multiply | None = None,
) -> TrainResult:
    """Train for ``config.steps`` steps from scratch or, with ``resume``, from the latest
    checkpoint in ``out_dir/checkpoints``.

    A resumed run ends where an uninterrupted one would, metrics file included: steps
    after the checkpoint are replayed and logged once; the first row after it averages
    the whole logging window (its steps before the checkpoint are stored with it); an
    eval due at the checkpoint's step whose row is missing (the run stopped during it)
    runs again, and one that was logged is not repeated.

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
      eval_batches: ``() -> iterable of batches`` of a held-out split, of any sizes (a
        smaller last batch costs one more compilation; one whose rows do not split over
        the mesh's devices is evaluated whole on each). Each logged eval metric is its
        mean over every row (pair) of them: each batch's metrics, means over its rows,
        weighted by its rows, the leading dimension of its arrays (:func:`eval_means`).
      eval_fn: ``(params, batch, ref_params) -> (loss, metrics)``; default: ``grad_fn``'s.
        It must take eval batches of every size given (a smaller last one): pass one when
        ``grad_fn`` cannot (``lm.optim.accumulate_gradients`` splits batches).
      resume: continue from the latest checkpoint (from step 0 when there is none).
      meta: JSON-able settings that decide the run's trajectory, keyed by flag name
        (``"lr"`` for ``--lr``); every checkpoint stores them with the seed and batch
        size, and a resume whose settings differ from the checkpoint's is refused.
      paths: the keys of ``meta`` whose values are file or directory paths (a string or
        a list of them): checkpoints record them resolved, and a resume compares them as
        the files they name, not as typed (:func:`resolved`).
      files: ``name -> text`` written by process 0 into ``out_dir``, each atomically,
        once every refusal has passed (so a refused call leaves the folder as it was).
      multiply: what the step keeps of the parameters as ``grad_fn`` multiplies them
        (:func:`make_train_step`; :func:`lm.objectives.kept_multiply`), or None.

    Raises:
      ConfigError: before any compilation, for a mesh or batch size that cannot run, or a
        run folder that cannot be continued with these settings (:func:`resume_step`).
      NonFiniteError: a non-finite loss/gradient (unless ``skip_nonfinite``).
      CheckpointError: the checkpoint to resume from cannot be restored into this run's
        state (damaged, or another model's or optimizer's).
    """
    mesh = config.mesh if isinstance(config.mesh, jax.sharding.Mesh) else mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_batch_size(config.batch_size, mesh.shape)
    check_run_paths(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(out_dir, CHECKPOINTS), keep=config.keep_checkpoints)
    meta = run_meta(config, meta)
    try:
        resume_from, refusal = resume_step(ckpt, config, resume=resume, meta=meta, paths=paths), None
    except ConfigError as err:
        resume_from, refusal = None, err
    # Each process resolves the path settings on its own host, so any one may refuse.
    _stop_together(refusal, "another process refused to resume from the checkpoint (see its "
                            "error); stopping")
    meta = resolved(meta, paths)

    init = lambda p: create_train_state(p, tx, config.seed, multiply)
    abstract = jax.eval_shape(init, params)
    shardings = mesh_lib.state_shardings(abstract, mesh)
    saved: dict[str, Any] = {}
    if resume_from is not None:
        state, saved = ckpt.restore(abstract_like(abstract, shardings), resume_from)
        if multiply is not None:
            state = jax.jit(lambda s: with_multiplied(s, multiply), out_shardings=shardings,
                            donate_argnums=0)(state)
    else:
        if resume:
            print(f"--resume: no checkpoint in {ckpt.directory}; starting from step 0", file=sys.stderr)
        state = jax.jit(init, out_shardings=shardings)(params)
    start = int(jax.device_get(state.step))

    # Every process trains; only process 0 writes the run folder's metrics and plots
    # (the folder is shared in a multi-host job, and appends from each would repeat lines).
    primary = jax.process_index() == 0
    log, refusal = None, None
    if primary:
        try:
            log = MetricsLog(os.path.join(out_dir, METRICS), keep_until=start)
            for name, text in (files or {}).items():
                write_text_atomic(os.path.join(out_dir, name), text)
        except (ConfigError, OSError) as err:
            refusal = err
    _stop_together(refusal, f"process 0 could not set up {out_dir} (see its error); stopping")

    batch_sh = mesh_lib.batch_sharding(mesh)
    repl = mesh_lib.replicated(mesh)
    ref_sh = None if ref_params is None else mesh_lib.state_shardings(ref_params, mesh)
    if ref_params is not None:
        ref_params = jax.device_put(ref_params, ref_sh)
    step_fn = _jit_with_ref(
        make_train_step(grad_fn, tx, skip_nonfinite=config.skip_nonfinite, multiply=multiply),
        ref_params,
        (shardings, batch_sh, ref_sh),
        out_shardings=(shardings, repl),
        donate_argnums=0,
    )
    eval_step = _jit_with_ref(  # the batch comes placed by put_batch: split, or whole on each device
        eval_fn or eval_from_grad_fn(grad_fn),
        ref_params,
        (shardings.params, None, ref_sh),
        out_shardings=repl,
    )

    bar = ProgressBar(config.steps) if config.progress and primary else None
    # The logging window in progress: the steps since the last train row, and the skip
    # count before them (a checkpoint taken mid-window stores both).
    window = saved.get("window") or {"metrics": [], "skipped_before": int(jax.device_get(state.skipped))}
    pending: list[Mapping[str, Any]] = list(window["metrics"])
    skipped = int(window["skipped_before"])
    tokens, last = 0, {}
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

    def save() -> None:
        check_halted()
        record = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
        ckpt.save(state, dict(meta, window={"metrics": record, "skipped_before": skipped}))

    def eval_due(step: int) -> bool:
        periodic = config.eval_every > 0 and step % config.eval_every == 0
        return eval_batches is not None and step > 0 and (periodic or step == config.steps)

    def evaluate(step: int) -> None:
        check_halted()  # a halted run's params are frozen: its evals would repeat the last good one

        def metrics_of(batch: Batch) -> dict[str, jax.Array]:
            placed = mesh_lib.put_batch(batch, mesh, replicate_uneven=True)
            loss, metrics = eval_step(state.params, placed, ref_params)
            return dict(metrics, loss=loss)

        means = eval_means(metrics_of, eval_batches())
        if means and log:
            log.write(step, "eval", means)

    try:
        # The eval that followed the checkpoint may not have finished; every process
        # must take the same decision, since evaluating is a collective.
        if resume_from is not None and eval_due(start):
            if mesh_lib.from_primary(log is not None and not log.has(start, "eval")):
                evaluate(start)
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
            if done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0):
                save()
            if eval_due(done):
                evaluate(done)
    finally:
        if bar:
            bar.close()
        if log:
            log.close()
        ckpt.close()
    if config.plots and log:
        plot_metrics(read_jsonl(log.path), out_dir)
    return TrainResult(state=state, mesh=mesh, last_metrics=last, checkpoint_dir=ckpt.directory)
