"""Run ``tests/lm/train_mlp.py`` in a subprocess (optionally with forced host devices),
or any script as the processes of one ``jax.distributed`` job on this host."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from typing import Callable

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


@dataclasses.dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(command: Callable[[list[str]], list[str]], log_dir, *, processes: int = 2,
                  devices: int = 2, timeout: float = 120,
                  kill_on_failure: bool = True) -> list[Finished]:
    """Run ``command(flags)`` once per process of a ``jax.distributed`` job with a
    coordinator on localhost (``flags``: ``--coordinator``, ``--num-processes``,
    ``--process-id``), each process with ``devices`` CPU devices.

    A process that dies leaves the others blocked in a collective until JAX's heartbeat
    gives up (minutes), so the first failure (unless ``kill_on_failure`` is False: to
    see whether the others stop by themselves), or ``timeout`` seconds, kills them all.
    Output goes to files in ``log_dir``: pipes nobody reads while polling could fill up.
    """
    coordinator = f"127.0.0.1:{free_port()}"
    logs, procs = [], []
    try:
        for i in range(processes):
            out, err = (open(os.path.join(str(log_dir), f"process{i}.{s}"), "w+") for s in ("out", "err"))
            logs.append((out, err))
            flags = ["--coordinator", coordinator, "--num-processes", str(processes), "--process-id", str(i)]
            # CPU collectives across processes: gloo (jax 0.10's default, pinned in case it changes).
            job_env = dict(env(devices), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
            procs.append(subprocess.Popen(command(flags), env=job_env, stdout=out, stderr=err, text=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or (kill_on_failure and any(p.poll() for p in procs)):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    finished = []
    for p, (out, err) in zip(procs, logs):
        out.seek(0), err.seek(0)
        finished.append(Finished(p.returncode, out.read(), err.read()))
        out.close(), err.close()
    return finished
