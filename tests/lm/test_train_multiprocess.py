"""Two real processes of one ``jax.distributed`` job on this host (2 CPU devices each,
gloo collectives): they assemble, train and checkpoint what one process does."""

import os
import sys

import numpy as np
import pytest

from lm.train.checkpoint import restore_params
from lm.train.logging import read_jsonl
from train_helpers import ROOT, command, params, run_mlp, run_processes

BATCH_SCRIPT = os.path.join(ROOT, "tests", "lm", "multiprocess_batch.py")
FLAGS = ("--batch-size", "8", "--log-every", "1", "--checkpoint-every", "2")


def test_global_batch_rows_land_on_their_devices(tmp_path):
    done = run_processes(lambda flags: [sys.executable, BATCH_SCRIPT, *flags], tmp_path, timeout=90)
    for process in done:
        assert process.returncode == 0, process.stderr
        for spec in ("data=4", "data=2,fsdp=2", "fsdp=4"):
            assert f"BATCH OK {spec} alternating" in process.stdout


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    proc = run_mlp(out, *FLAGS, "--steps", "5")
    assert proc.returncode == 0, proc.stderr
    return out


def two_processes(out, *flags):
    os.makedirs(out / "logs")
    done = run_processes(lambda job: command(out, *FLAGS, *flags, *job), out / "logs", timeout=120)
    for i, process in enumerate(done):
        assert process.returncode == 0, f"process {i}: {process.stderr}"
    return done


def without_timing(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.mark.parametrize("mesh", ["fsdp=4", "data=2,fsdp=2"])
def test_two_processes_train_like_one(tmp_path, single, mesh):
    """fsdp=4 splits weights across the processes, data=2,fsdp=2 splits the batch."""
    two_processes(tmp_path, "--steps", "5", "--mesh", mesh)
    for name, value in params(single).items():
        np.testing.assert_allclose(params(tmp_path)[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # One writer: every step logged once, as one process logs it.
    rows, expected = read_jsonl(tmp_path / "metrics.jsonl"), read_jsonl(single / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in rows] == [(r["step"], r["split"]) for r in expected]
    for got, want in zip(without_timing(rows), without_timing(expected)):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "5"]


def test_two_process_checkpoint_restores_and_resumes_on_one_process(tmp_path, single):
    """The checkpoint of a 2-process fsdp=4 run names devices of both processes; one
    process with one device reads it and finishes the run as if it had never stopped."""
    two_processes(tmp_path, "--steps", "3", "--mesh", "fsdp=4")
    restored, step = restore_params(str(tmp_path / "checkpoints"))
    assert step == 3
    for name, value in params(tmp_path).items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)
    proc = run_mlp(tmp_path, *FLAGS, "--steps", "5", "--resume")
    assert proc.returncode == 0, proc.stderr
    for name, value in params(single).items():
        np.testing.assert_allclose(params(tmp_path)[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
