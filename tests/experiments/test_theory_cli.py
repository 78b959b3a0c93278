"""``python -m experiments.theory`` end to end, its bad input, and that its checks can fail."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dynamics import theory
from experiments import theory as cli

ROOT = Path(__file__).resolve().parents[2]


def _run(*flags):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "experiments.theory", *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_json_end_to_end_passes_every_check():
    proc = _run("--json", "--instances", "3", "--shapes", "3x4", "--seed", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["passed"] is True and doc["configs"] == [{"V": 3, "d": 4}]
    rows = doc["rows"]
    assert all(r["pass"] in (True, None) for r in rows)
    names = " ".join(r["check"] for r in rows)
    statements = ("Prop 3.1", "Prop 3.3", "Thm 3.2", "Cor 3.4", "Lemma 3.5", "Cor 3.6", "Cor A.5")
    assert all(s in names for s in statements)
    slopes = [r for r in rows if "slope" in r["check"]]
    assert len(slopes) == 5 and all(abs(r["measured"] - 2.0) <= 0.15 for r in slopes)


@pytest.mark.parametrize("flags,culprit", [
    (["--instances", "0"], "--instances"),
    (["--instances", "many"], "--instances"),
    (["--seed", "x"], "--seed"),
    (["--shapes", "1x4"], "--shapes"),
    (["--shapes", "3by4"], "--shapes"),
    (["--shapes", "2x3,2x3"], "argument --shapes: '2x3' is given twice"),
    (["--bogus"], "--bogus"),
])
def test_bad_flags_exit_nonzero_with_one_line(flags, culprit):
    proc = _run(*flags)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_loglog_slopes_recovers_exact_powers():
    s = np.geomspace(1e-1, 1e-4, 6)
    values = np.stack([3.0 * s**2, 0.5 * s**1.5])
    np.testing.assert_allclose(cli.loglog_slopes(s, values), [2.0, 1.5], atol=1e-12)


def test_slope_check_fails_when_the_sam_correction_is_dropped(monkeypatch):
    """The Thm 3.2 rows are not vacuous: a GD-only prediction for a SAM step fails them."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        gd_prediction = theory.predicted_step
        monkeypatch.setattr(theory, "predicted_step",
                            lambda phi, y, W, eta, rho: gd_prediction(phi, y, W, eta, 0.0))
        # A fresh jit of a fresh vmap wrapper has an empty cache: it traces the patch.
        monkeypatch.setattr(cli, "_sweep_batch", jax.jit(jax.vmap(cli._remainder_sweep)))
        data = {(3, 2): cli.sample_instances(jax.random.PRNGKey(0), 3, 3, 2)}
        rows = {r.check: r for r in cli.check_remainders(data)}
    finally:
        jax.config.update("jax_enable_x64", previous)
    assert rows["Thm 3.2: r_z log-log slope in η (worst shape's median)"].passed is False
    assert abs(rows["Thm 3.2: r_z log-log slope in η (worst shape's median)"].measured - 1.5) < 0.15
    assert rows["Thm 3.2, ρ=0: GD is exact in W (max ‖R_W‖)"].passed is True


def test_slope_check_fails_when_one_shape_alone_is_wrong(monkeypatch):
    """An error confined to one shape fails the rows though the pooled slopes look right:
    each shape's median is checked."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        prediction = theory.predicted_step
        monkeypatch.setattr(theory, "predicted_step", lambda phi, y, W, eta, rho: prediction(
            phi, y, W, eta, 0.0 if W.shape[0] == 3 else rho))
        monkeypatch.setattr(cli, "_sweep_batch", jax.jit(jax.vmap(cli._remainder_sweep)))
        key = jax.random.PRNGKey(0)
        data = {(3, 2): cli.sample_instances(key, 2, 3, 2),
                (5, 3): cli.sample_instances(key, 6, 5, 3)}
        rows = {r.check: r for r in cli.check_remainders(data)}
    finally:
        jax.config.update("jax_enable_x64", previous)
    row = rows["Thm 3.2: r_z log-log slope in η (worst shape's median)"]
    assert row.passed is False and "worst shape (3, 2)" in row.detail
