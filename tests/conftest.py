"""Fixtures shared across test folders."""

import json

import numpy as np
import pytest


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
