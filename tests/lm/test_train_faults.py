"""Non-finite steps (stop or skip), checkpoint damage, misconfiguration: loud and lossless."""

import os
import shutil

import jax
import numpy as np
import optax
import pytest

from lm.train import CheckpointError, Checkpointer, ConfigError, NonFiniteError, TrainConfig, train
from lm.train.checkpoint import abstract_like, restore_params
from lm.train.logging import read_jsonl
from lm.train.mesh import make_mesh, state_shardings
from lm.train.state import create_train_state
from train_mlp import grad_fn, init_params, make_batch_at

TX = optax.adamw(1e-2)


def run(out, steps, *, nan_at=(), batch_at=None, resume=False, **kw):
    config = TrainConfig(steps=steps, batch_size=8, progress=False, plots=False, **kw)
    batch_at = batch_at or make_batch_at(0, 8, set(nan_at))
    return train(grad_fn, TX, init_params(0), batch_at, config, str(out), resume=resume)


def restore(directory):
    params = init_params(0)
    abstract = jax.eval_shape(lambda p: create_train_state(p, TX, 0), params)
    target = abstract_like(abstract, state_shardings(abstract, make_mesh()))
    ckpt = Checkpointer(directory)
    try:
        return ckpt.restore(target)
    finally:
        ckpt.close()


@pytest.mark.parametrize("log_every", [1, 10])
def test_nan_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, log_every):
    with pytest.raises(NonFiniteError) as err:
        run(tmp_path / "bad", 6, nan_at=[3], checkpoint_every=2, log_every=log_every)
    assert err.value.step == 3
    assert str(err.value).startswith("non-finite loss or gradients at step 3; the update was not applied")
    assert str(tmp_path / "bad" / "checkpoints" / "2") in str(err.value)

    state, meta = restore(str(tmp_path / "bad" / "checkpoints"))
    assert int(state.step) == 2 and meta["step"] == 2 and meta["seed"] == 0
    clean = run(tmp_path / "clean", 2)
    for name, value in jax.device_get(clean.state.params).items():
        np.testing.assert_array_equal(np.asarray(state.params[name]), value, err_msg=name)


def test_skip_mode_counts_skips_and_skipped_batches_leave_no_trace(tmp_path):
    result = run(tmp_path / "skip", 5, nan_at=[1, 3], skip_nonfinite=True, log_every=5)
    assert int(result.state.skipped) == 2 and int(result.state.step) == 5
    assert result.last_metrics["skipped"] == 2
    # Skipped steps change neither params nor Adam's state: the same as training on 0, 2, 4.
    base = make_batch_at(0, 8, set())
    only_good = run(tmp_path / "good", 3, batch_at=lambda k: base(2 * k))
    for name, value in jax.device_get(only_good.state.params).items():
        np.testing.assert_array_equal(np.asarray(result.state.params[name]), value, err_msg=name)


def test_skipped_steps_are_left_out_of_the_logged_means(tmp_path):
    run(tmp_path / "skip", 5, nan_at=[1, 3], skip_nonfinite=True, log_every=5)
    (row,) = read_jsonl(str(tmp_path / "skip" / "metrics.jsonl"))
    assert row["skipped"] == 2
    # Steps 0, 2, 4 see the same params and batches as a clean run on batches 0, 2, 4.
    base = make_batch_at(0, 8, set())
    run(tmp_path / "good", 3, batch_at=lambda k: base(2 * k), log_every=3)
    (good,) = read_jsonl(str(tmp_path / "good" / "metrics.jsonl"))
    for key in ("loss", "grad_norm", "rewards/accuracies"):
        np.testing.assert_allclose(row[key], good[key], rtol=1e-6, err_msg=key)

    run(tmp_path / "alone", 3, nan_at=[1], skip_nonfinite=True, log_every=1)
    rows = read_jsonl(str(tmp_path / "alone" / "metrics.jsonl"))
    assert [r["skipped"] for r in rows] == [0, 1, 1]
    assert "loss" not in rows[1] and np.isfinite(rows[2]["loss"])


def test_corrupt_checkpoint_is_named_on_resume(tmp_path):
    run(tmp_path, 4, checkpoint_every=2)
    damaged = tmp_path / "checkpoints" / "4"
    for root, _, files in os.walk(damaged / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(CheckpointError) as err:
        run(tmp_path, 6, checkpoint_every=2, resume=True)
    assert str(err.value).startswith(f"checkpoint folder {damaged} is corrupt or incomplete")
    with pytest.raises(CheckpointError) as err:
        restore_params(str(tmp_path / "checkpoints"))
    assert str(err.value).startswith(f"checkpoint folder {damaged} is corrupt or incomplete")


def test_partial_checkpoint_folder_is_named_on_resume(tmp_path):
    run(tmp_path, 2)
    partial = tmp_path / "checkpoints" / "2"
    shutil.rmtree(partial / "state")
    with pytest.raises(CheckpointError) as err:
        run(tmp_path, 4, resume=True)
    assert str(partial) in str(err.value)
    with pytest.raises(CheckpointError) as err:
        restore_params(str(tmp_path / "checkpoints"))
    assert str(partial) in str(err.value)


def test_resume_of_a_finished_run_is_a_no_op(tmp_path):
    first = jax.device_get(run(tmp_path, 2).state.params)
    again = run(tmp_path, 2, resume=True)
    assert int(again.state.step) == 2
    for name, value in jax.device_get(again.state.params).items():
        np.testing.assert_array_equal(value, first[name], err_msg=name)


def test_existing_checkpoints_need_resume(tmp_path):
    run(tmp_path, 2)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run(tmp_path, 4)


@pytest.mark.parametrize("part, make", [
    ("", lambda p: p.write_text("not a folder")),
    ("checkpoints", lambda p: p.write_text("not a folder")),
    ("metrics.jsonl", lambda p: p.mkdir()),
    ("checkpoints", lambda p: p.symlink_to(p.parent / "gone")),  # a dangling link
])
def test_a_run_folder_part_of_the_wrong_kind_is_named(tmp_path, part, make):
    """A file where the run folder or its checkpoints go (Orbax retried for minutes), a
    folder where its metrics go (a traceback): one ConfigError naming the path, nothing
    created."""
    out = tmp_path / "run"
    if part:
        out.mkdir()
    make(out / part if part else out)
    before = sorted(os.listdir(out)) if out.is_dir() else None
    with pytest.raises(ConfigError, match=f"{out / part if part else out} exists and is"):
        run(out, 2)
    assert (sorted(os.listdir(out)) if out.is_dir() else None) == before


def test_a_run_folders_parameters_are_read_without_its_optimizer_state(tmp_path, monkeypatch):
    """``restore_params`` asks Orbax for the parameters and the step alone (AdamW's moments
    are twice the parameters' bytes), and gets the trained parameters."""
    import orbax.checkpoint as ocp

    result = run(tmp_path, 2)
    asked = []
    restore = ocp.PyTreeCheckpointer.restore

    def spy(self, directory, *a, args=None, **kw):
        asked.append((sorted(args.item), args.partial_restore))
        return restore(self, directory, *a, args=args, **kw)

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", spy)
    params, step = restore_params(str(tmp_path / "checkpoints"))
    assert step == 2 and asked == [(["params", "step"], True)]
    for name, value in jax.device_get(result.state.params).items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)


def test_bad_mesh_fails_before_tracing(tmp_path):
    def untraceable(*args):
        raise AssertionError("grad_fn was traced")

    config = TrainConfig(steps=2, batch_size=8, mesh="data=3", progress=False)
    with pytest.raises(ConfigError, match="data=3 x fsdp=1 = 3 devices"):
        train(untraceable, TX, init_params(0), make_batch_at(0, 8, set()), config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_no_eval_runs_after_a_halt(tmp_path):
    """The halt at step 3 is found at the eval of step 4 (before the next metrics fetch):
    the frozen params are not evaluated as if they were steps 4, 6, 8."""
    held_out = make_batch_at(1, 8, set())
    config = TrainConfig(steps=8, batch_size=8, log_every=8, eval_every=2, progress=False, plots=False)
    with pytest.raises(NonFiniteError) as err:
        train(grad_fn, TX, init_params(0), make_batch_at(0, 8, {3}), config, str(tmp_path),
              eval_batches=lambda: [held_out(i) for i in range(2)])
    assert err.value.step == 3
    assert [(r["step"], r["split"]) for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [(2, "eval")]


@pytest.mark.parametrize("bad, halts", [(np.inf, True), (np.nan, True), (1e20, True),
                                        (1e3, False)])
def test_one_non_finite_gradient_entry_stops_the_step_under_a_finite_loss(bad, halts):
    """The loss is finite; one entry of one gradient leaf is not (or is so large that the
    norm overflows float32: a blow-up too). The step keeps params and optimizer state."""
    from lm.train.loop import make_train_step

    params = {"a": np.ones((3, 4), np.float32), "b": np.zeros(5, np.float32)}

    def grad_fn(params, batch, ref):
        grads = jax.tree_util.tree_map(jax.numpy.ones_like, params)
        grads["a"] = grads["a"].at[1, 2].set(bad)
        return jax.numpy.float32(0.5), {}, grads

    state = create_train_state(params, TX, 0)
    new, metrics = jax.jit(make_train_step(grad_fn, TX))(state, {}, None)
    assert int(new.halted_at) == (0 if halts else -1)
    changed = not np.array_equal(new.params["b"], params["b"])
    assert changed != halts


@pytest.mark.parametrize("field, value", [("keep_checkpoints", 0), ("log_every", 0),
                                          ("checkpoint_every", -1), ("eval_every", -2),
                                          ("steps", 0), ("batch_size", 2.5)])
def test_train_config_refuses_what_would_lose_the_run_or_crash_later(field, value):
    """keep_checkpoints=0 kept no checkpoint, log_every=0 divided by zero after the first
    step, negative cadences acted as positive or as none: each is refused, naming it."""
    with pytest.raises(ConfigError, match=rf"TrainConfig\.{field} must be an integer >= "):
        TrainConfig(**{"steps": 4, "batch_size": 8, field: value})
