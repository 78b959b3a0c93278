"""A run SIGKILLed after a checkpoint and resumed ends exactly where an uninterrupted run does."""

import os
import signal
import subprocess
import time

import numpy as np

from lm.train.logging import read_jsonl
from train_helpers import command, env, params, run_mlp

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

