"""``python -m experiments.toy`` end to end, and its one-line errors for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import toy as toy_cli

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "experiments.toy", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_figure1_end_to_end(tmp_path):
    proc = _run("--steps", "50", "--dim", "50", "--out", "tmp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "tmp"
    for name in ("fig1a_modal.png", "fig1b_residuals.png", "metrics.json"):
        assert (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"config", "y_minus", "y_star", "runs"}
    assert metrics["config"]["dim"] == 50 and metrics["config"]["steps"] == 50
    assert (metrics["y_minus"], metrics["y_star"]) == (1, 0)
    assert set(metrics["runs"]) == {
        "GD", "SAM rho=+0.01 (opposite sign to lr)", "SAM rho=-0.01 (same sign as lr)",
    }
    for run in metrics["runs"].values():
        assert set(run) == {"rho", "lr", "probs", "modal"}
        assert run["lr"] < 0 and isinstance(run["rho"], float)
        assert len(run["probs"]) == 51 and all(len(p) == 3 for p in run["probs"])
        assert len(run["modal"]) == 51 and all(len(e) == 2 for e in run["modal"])
    # Each run's radius is the one its label names.
    assert {label: run["rho"] for label, run in metrics["runs"].items()} == {
        "GD": 0.0, "SAM rho=+0.01 (opposite sign to lr)": 0.01,
        "SAM rho=-0.01 (same sign as lr)": -0.01,
    }
    end = {label: run["probs"][-1][0] for label, run in metrics["runs"].items()}
    assert end["SAM rho=-0.01 (same sign as lr)"] < end["GD"] < end["SAM rho=+0.01 (opposite sign to lr)"]
    assert "GD" in proc.stdout and "p[y*]" in proc.stdout


def test_sweep_writes_phase_diagram_and_timings(tmp_path, capsys):
    args = ["--sweep", "--grid", "3", "--steps", "5", "--dim", "20", "--repeats", "1"]
    assert toy_cli.main([*args, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sweep_phase.png").stat().st_size > 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert len(result["etas"]) == len(result["rhos"]) == 3 and 0.0 in result["rhos"]
    assert len(result["end_probs"]) == 3 and len(result["end_probs"][0][0]) == 3
    assert all(row[1] == 0.0 for row in result["delta_log_p_y_star"])  # GD column
    t = result["timing"]
    assert t["jax_run_s"] > 0 and t["numpy_run_s"] > 0 and t["speedup"] == t["numpy_run_s"] / t["jax_run_s"]
    assert result["max_abs_diff_vs_numpy_float64"] < 1e-4
    assert "speedup" in capsys.readouterr().out


def test_bad_input_in_a_real_process_is_one_line(tmp_path):
    proc = _run("--classes", "1", "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--classes" in proc.stderr


def _bad(argv, capsys, culprit):
    with pytest.raises(SystemExit) as exc:
        toy_cli.main(argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err and culprit in err, err


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["--classes", "1"], "--classes"),
        (["--dim", "0"], "--dim"),
        (["--rho", "abc"], "--rho"),
        (["--rho", "nan"], "--rho"),
        (["--lr", "0"], "--lr"),
        (["--steps", "-3"], "--steps"),
        (["--sweep", "--grid", "4"], "--grid"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_flags(argv, capsys, culprit):
    _bad(argv, capsys, culprit)


def test_out_under_a_regular_file(tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    _bad(["--out", str(afile / "sub")], capsys, "--out")
    _bad(["--out", str(afile)], capsys, "--out")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_out_read_only_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _bad(["--out", str(ro)], capsys, "--out")
    finally:
        ro.chmod(0o700)


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        toy_cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--rho", "--lr", "--steps", "--sft-epochs", "--dim", "--classes", "--seed", "--out", "--sweep"):
        assert flag in text


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_out_on_a_read_only_file_system(capsys):
    """/proc refuses new directories even to root: the unwritable case every user can test."""
    _bad(["--out", "/proc/squeeze-toy-out"], capsys, "--out")
