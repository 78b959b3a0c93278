"""Sharded training on 8 forced host devices computes what one device computes."""

import numpy as np
import pytest

from lm.train.checkpoint import restore_params
from lm.train.logging import read_jsonl
from train_helpers import params, run_mlp
from train_mlp import init_params

FLAGS = ("--steps", "5", "--batch-size", "8", "--log-every", "5")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    proc = run_mlp(out, *FLAGS)
    assert proc.returncode == 0, proc.stderr
    return params(out)


@pytest.mark.parametrize(
    "mesh, specs",
    [
        ("data=2,fsdp=4", "{'b1': 'P()', 'w1': \"P(None, 'fsdp')\", 'w2': \"P('fsdp', None)\"}"),
        ("data=8", "{'b1': 'P()', 'w1': 'P()', 'w2': 'P()'}"),
    ],
)
def test_sharded_matches_single_device(tmp_path, single, mesh, specs):
    proc = run_mlp(tmp_path, *FLAGS, "--mesh", mesh, devices=8)
    assert proc.returncode == 0, proc.stderr
    # w1 (8, 16): 16 is the largest dim divisible by 4; w2 (16, 4): 16 again; b1 is 1-D.
    assert f"SPECS {specs}" in proc.stdout
    sharded, init = params(tmp_path), init_params(0)
    for name, value in single.items():
        assert np.abs(value - init[name]).max() > 1e-3, f"{name} did not train"
        np.testing.assert_allclose(sharded[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # The checkpoint names 8 devices; this process has one.
    restored, step = restore_params(str(tmp_path / "checkpoints"))
    assert step == 5
    for name, value in sharded.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_impossible_mesh_is_one_clear_line(tmp_path):
    proc = run_mlp(tmp_path, "--mesh", "data=3,fsdp=2", devices=8)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data=3 x fsdp=2 = 6 devices, but 8 are available" in lines[0]


def test_an_eval_batch_that_does_not_split_over_the_devices_is_evaluated_whole(tmp_path):
    """Eval batches of 8 and 3 rows on 8 devices: the 3 rows go to every device, and the
    eval row is the one device's."""
    eval_flags = (*FLAGS, "--eval-sizes", "8", "3")
    assert run_mlp(tmp_path / "one", *eval_flags).returncode == 0
    proc = run_mlp(tmp_path / "eight", *eval_flags, "--mesh", "data=2,fsdp=4", devices=8)
    assert proc.returncode == 0, proc.stderr
    (one,), (eight,) = ([r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if r["split"] == "eval"]
                        for name in ("one", "eight"))
    for key in ("loss", "rewards/accuracies"):
        assert eight[key] == pytest.approx(one[key], rel=1e-5), key
