"""Fixtures shared across test folders, and one compilation cache for the whole run.

Many tests compile the same tiny programs (each builds its step afresh; the CLI tests run
them in subprocesses), so XLA's output is kept on disk for the run and reused wherever
the program, the XLA flags and the devices match (jax's persistent compilation cache).
The environment variables reach the test workers and the subprocesses too; the cache dies
with the run. On a GPU, workers allocate as they go instead of each claiming 75% of it.
"""

import json
import os
import shutil
import tempfile

import numpy as np
import pytest

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-test-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def pytest_sessionfinish(session):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def prefs(tmp_path):
    """12 arithmetic preference pairs as JSON lines: "a+b=" → chosen " a+b", rejected " a+b+3"."""
    rng = np.random.default_rng(0)
    path = tmp_path / "prefs.jsonl"
    with open(path, "w") as f:
        for _ in range(12):
            a, b = rng.integers(0, 50, size=2)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": f" {a + b}", "rejected": f" {a + b + 3}"}) + "\n")
    return path
