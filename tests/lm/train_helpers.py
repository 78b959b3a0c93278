"""Run ``tests/lm/train_mlp.py`` in a subprocess (optionally with forced host devices)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "lm", "train_mlp.py")


def env(devices: int = 1) -> dict[str, str]:
    out = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    out["JAX_PLATFORMS"] = "cpu"
    return out


def command(out_dir, *flags: str) -> list[str]:
    return [sys.executable, SCRIPT, "--out", str(out_dir), *flags]


def run_mlp(out_dir, *flags: str, devices: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(command(out_dir, *flags), env=env(devices), capture_output=True, text=True, timeout=120)


def params(out_dir) -> dict[str, np.ndarray]:
    with np.load(os.path.join(str(out_dir), "params.npz")) as f:
        return {k: f[k] for k in f.files}
