"""A run SIGKILLed after a checkpoint and resumed ends exactly where an uninterrupted run does;
a resume refuses what cannot continue the run."""

import os
import signal
import subprocess
import time

import jax
import numpy as np
import optax
import pytest

from lm.train import CheckpointError, Checkpointer, ConfigError, TrainConfig, train
from lm.train.loop import CHECKPOINTS
from lm.train.logging import read_jsonl
from train_helpers import command, env, params, run_mlp
from train_mlp import grad_fn, init_params, make_batch_at

FLAGS = ("--steps", "8", "--checkpoint-every", "2", "--log-every", "1", "--eval-every", "4")


def test_killed_run_resumes_bitwise(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = run_mlp(whole, *FLAGS)
    assert proc.returncode == 0, proc.stderr

    child = subprocess.Popen(command(killed, *FLAGS, "--sleep", "0.4"), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (killed / "checkpoints" / "2").is_dir():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    child.stderr.close()
    assert not (killed / "params.npz").exists()
    assert not (killed / "checkpoints" / "8").exists()

    proc = run_mlp(killed, *FLAGS, "--resume")
    assert proc.returncode == 0, proc.stderr
    a, b = params(whole), params(killed)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)

    # The replayed steps are logged once, with the values of the uninterrupted run.
    rows_a, rows_b = read_jsonl(whole / "metrics.jsonl"), read_jsonl(killed / "metrics.jsonl")
    key = lambda r: (r["step"], r["split"])
    assert [key(r) for r in rows_b] == [key(r) for r in rows_a]
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]



# In-process runs that stop where a killed process would (an exception out of a batch or an
# eval), then resume: what a resume refuses, and that its metrics file is the whole run's.

TX = optax.adamw(1e-2)
HELD_OUT = make_batch_at(1, 8, set())


class Stopped(Exception):
    """The process died here."""


def run(out, steps, *, resume=False, stop_at=None, stop_in_eval=None, params=None, meta=None, paths=(), files=None,
        **kw):
    """``stop_at``: die before batch k; ``stop_in_eval``: die in the n-th eval (1-based)."""
    config = TrainConfig(steps=steps, batch_size=kw.pop("batch_size", 8), progress=False, plots=False, **kw)
    base, evals = make_batch_at(0, config.batch_size, set()), []

    def batch_at(k):
        if k == stop_at:
            raise Stopped
        return base(k)

    def eval_batches():
        evals.append(None)
        if len(evals) == stop_in_eval:
            raise Stopped
        return [HELD_OUT(i) for i in range(2)]

    return train(grad_fn, TX, init_params(0) if params is None else params, batch_at, config, str(out),
                 eval_batches=eval_batches, resume=resume, meta=meta, paths=paths, files=files)


def stopped(out, steps, **kw):
    with pytest.raises(Stopped):
        run(out, steps, **kw)


def rows(out):
    """metrics.jsonl without its timing (the only field a resume may change)."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_jsonl(out / "metrics.jsonl")]


def test_resume_with_other_settings_is_refused_naming_them_and_writes_nothing(tmp_path):
    meta = {"lr": 0.01, "loss": "dpo", "data": ["a.jsonl"]}
    run(tmp_path, 2, meta=meta, files={"config.json": "first\n"})
    before = (tmp_path / "metrics.jsonl").read_text()
    other = {"lr": 0.001, "loss": "dpo", "data": ["b.jsonl"]}
    with pytest.raises(ConfigError) as err:
        run(tmp_path, 4, resume=True, meta=other, seed=1, files={"config.json": "second\n"})
    message = str(err.value)
    assert message.startswith(f"--resume: {tmp_path / 'checkpoints' / '2'} was written with other settings: ")
    for flag in ("--lr 0.001 (checkpoint: 0.01)", "--data b.jsonl (checkpoint: a.jsonl)", "--seed 1 (checkpoint: 0)"):
        assert flag in message
    assert "--loss" not in message and "\n" not in message
    assert (tmp_path / "config.json").read_text() == "first\n"
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_path_settings_resume_as_the_files_they_name(tmp_path, monkeypatch):
    """A path setting compares as the file it names: spelled otherwise, through a symlink or
    (recorded resolved) from another working directory it resumes; another file is refused,
    shown as typed and as the checkpoint holds it. A value naming no file (a built-in model)
    stays a name. A checkpoint that holds a path as typed (written before paths were
    recorded resolved) resumes with any path to that file from where it was typed."""
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "a.jsonl")
    (tmp_path / "sub").mkdir()
    a, new, old = os.path.realpath(tmp_path / "a.jsonl"), tmp_path / "new", tmp_path / "old"
    meta = lambda data, model="gpt2-tiny": {"data": [data], "model": model}
    monkeypatch.chdir(tmp_path)
    run(new, 2, meta=meta("a.jsonl"), paths=("data", "model"))
    run(old, 2, meta=meta("a.jsonl"))
    ckpt = Checkpointer(str(new / CHECKPOINTS))
    assert {k: ckpt.meta(2)[k] for k in ("data", "model")} == meta(a)
    ckpt.close()

    def resumes(out, data, model="gpt2-tiny"):
        return int(run(out, 2, resume=True, meta=meta(data, model), paths=("data", "model")).state.step) == 2

    def refusal(out, data, model="gpt2-tiny"):
        with pytest.raises(ConfigError) as err:
            resumes(out, data, model)
        return str(err.value)

    assert all(resumes(old, data) for data in ("./a.jsonl", "link.jsonl", a))
    assert "--data b.jsonl (checkpoint: a.jsonl); resume" in refusal(old, "b.jsonl")
    monkeypatch.chdir(tmp_path / "sub")
    assert all(resumes(new, data) for data in ("../a.jsonl", "../link.jsonl", a))
    assert f"--data ../b.jsonl (checkpoint: {a}); resume" in refusal(new, "../b.jsonl")
    assert "--model ../sub (checkpoint: gpt2-tiny); resume" in refusal(new, a, "../sub")


def test_resume_into_another_model_says_so_and_not_corrupt(tmp_path):
    run(tmp_path, 2)
    wider = {k: np.repeat(v, 2, axis=-1 if k != "w2" else 0) for k, v in init_params(0).items()}
    with pytest.raises(CheckpointError) as err:
        run(tmp_path, 4, resume=True, params=wider)
    message = str(err.value)
    assert "holds a different model or optimizer state than this run" in message
    assert "params/w1: (8, 16) float32 there, (8, 32) float32 here" in message
    assert "corrupt" not in message
    assert int(run(tmp_path, 4, resume=True).state.step) == 4  # the checkpoint was intact


def test_resume_below_the_checkpoint_step_is_refused(tmp_path):
    run(tmp_path, 4)
    with pytest.raises(ConfigError, match=r"^--steps 2 is below step 4 of the checkpoint in .*; resume with --steps 4 or more$"):
        run(tmp_path, 2, resume=True)


def test_steps_may_grow_where_the_settings_do_not_fix_them(tmp_path):
    """The settings a checkpoint lacks (here "beta": an older checkpoint) are not compared."""
    run(tmp_path / "grown", 2, meta={"lr": 0.01})
    grown = run(tmp_path / "grown", 4, resume=True, meta={"lr": 0.01, "beta": 0.1})
    whole = run(tmp_path / "whole", 4)
    for name, value in jax.device_get(whole.state.params).items():
        np.testing.assert_array_equal(np.asarray(grown.state.params[name]), value, err_msg=name)


def test_first_row_after_a_resume_averages_the_whole_window(tmp_path):
    flags = dict(log_every=4, checkpoint_every=2)
    run(tmp_path / "whole", 8, **flags)
    stopped(tmp_path / "resumed", 8, stop_at=3, **flags)  # after the checkpoint at 2, mid-window
    run(tmp_path / "resumed", 8, resume=True, **flags)
    assert rows(tmp_path / "resumed") == rows(tmp_path / "whole")


def test_skipped_steps_of_a_window_cut_by_a_checkpoint_stay_skipped(tmp_path):
    """The count of skips before the window is stored with it: a step skipped before the
    checkpoint is still left out of the row logged after the resume."""
    flags = dict(log_every=4, checkpoint_every=2, skip_nonfinite=True)
    nan_first = make_batch_at(0, 8, {0})
    config = TrainConfig(steps=4, batch_size=8, progress=False, plots=False, **flags)
    train(grad_fn, TX, init_params(0), nan_first, config, str(tmp_path / "whole"))

    def dies_at_3(k):
        if k == 3:
            raise Stopped
        return nan_first(k)

    with pytest.raises(Stopped):
        train(grad_fn, TX, init_params(0), dies_at_3, config, str(tmp_path / "resumed"))
    train(grad_fn, TX, init_params(0), nan_first, config, str(tmp_path / "resumed"), resume=True)
    assert rows(tmp_path / "resumed") == rows(tmp_path / "whole")
    assert rows(tmp_path / "whole")[0]["skipped"] == 1 and np.isfinite(rows(tmp_path / "whole")[0]["loss"])


def test_an_eval_cut_short_after_a_checkpoint_runs_again_on_resume(tmp_path):
    flags = dict(log_every=2, checkpoint_every=2, eval_every=2)
    run(tmp_path / "whole", 4, **flags)
    stopped(tmp_path / "resumed", 4, stop_in_eval=1, **flags)  # the eval at step 2
    assert (tmp_path / "resumed" / "checkpoints" / "2").is_dir()
    run(tmp_path / "resumed", 4, resume=True, **flags)
    assert rows(tmp_path / "resumed") == rows(tmp_path / "whole")


def test_resuming_a_finished_run_logs_its_final_eval_once(tmp_path):
    run(tmp_path, 4, log_every=2, checkpoint_every=2)
    logged = rows(tmp_path)
    assert [(r["step"], r["split"]) for r in logged] == [(2, "train"), (4, "train"), (4, "eval")]
    run(tmp_path, 4, log_every=2, checkpoint_every=2, resume=True)
    assert rows(tmp_path) == logged


def test_a_half_written_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    flags = dict(log_every=1, checkpoint_every=2)
    run(tmp_path / "whole", 4, **flags)
    stopped(tmp_path / "resumed", 4, stop_at=3, **flags)
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 4, "split": "tra')  # killed while writing a line
    run(tmp_path / "resumed", 4, resume=True, **flags)
    assert rows(tmp_path / "resumed") == rows(tmp_path / "whole")
    warning = capsys.readouterr().err
    assert f"warning: {metrics}:4: dropped an incomplete last line" in warning


def test_an_unreadable_metrics_line_before_the_last_is_refused(tmp_path):
    run(tmp_path, 2, log_every=1)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("garbage\n" + "".join(lines))
    with pytest.raises(ConfigError, match=rf"^{metrics}:1: not a JSON line .*fix or remove that line to resume$"):
        run(tmp_path, 4, log_every=1, resume=True)
    assert metrics.read_text() == "garbage\n" + "".join(lines)
