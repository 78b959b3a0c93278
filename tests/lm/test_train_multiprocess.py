"""Two real processes of one ``jax.distributed`` job on this host (2 CPU devices each,
gloo collectives): they assemble, train and checkpoint what one process does."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from experiments import dpo
from lm import hf
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
    """The numeric fields of each metrics row but its throughput (the "split" name is
    compared apart: pytest.approx refuses strings)."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s" and not isinstance(v, str)} for r in rows]


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


def test_two_processes_agree_to_rerun_an_eval_cut_short(tmp_path):
    """Only process 0 reads the metrics file; a resume that finds the eval after the last
    checkpoint missing runs it on both processes (a collective: one alone would hang). The
    eval's last batch (3 rows) does not split over the 4 devices: each computes all of it."""
    flags = ("--steps", "4", "--mesh", "data=2,fsdp=2", "--eval-every", "2", "--eval-sizes", "8", "3")
    two_processes(tmp_path, *flags)
    metrics = tmp_path / "metrics.jsonl"
    whole = read_jsonl(metrics)
    assert whole[-1]["step"] == 4 and whole[-1]["split"] == "eval"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in whole[:-1]))  # stopped during that eval
    os.rename(tmp_path / "logs", tmp_path / "first-logs")
    two_processes(tmp_path, *flags, "--resume")
    assert read_jsonl(metrics) == whole


def test_a_refusal_on_process_0_stops_every_process(tmp_path):
    """Only process 0 reads the metrics file on resume; when it refuses it (a corrupt line),
    the other process must stop too, not wait in the first collective until it times out."""
    two_processes(tmp_path, "--steps", "2", "--mesh", "data=2,fsdp=2")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("garbage" + metrics.read_text())
    os.makedirs(tmp_path / "resume-logs")
    done = run_processes(lambda job: command(tmp_path, *FLAGS, "--steps", "4", "--mesh", "data=2,fsdp=2",
                                             "--resume", *job),
                         tmp_path / "resume-logs", timeout=60, kill_on_failure=False)
    assert [p.returncode for p in done] == [2, 2], [p.stderr for p in done]
    assert "metrics.jsonl:1: not a JSON line" in done[0].stderr
    assert "process 0 could not set up" in done[1].stderr


def test_a_refusal_on_any_process_stops_every_process(tmp_path):
    """Settings are compared on each process (paths resolve on each host's own files): when
    only process 1 refuses the checkpoint, process 0 must stop too, not wait for it."""
    two_processes(tmp_path, "--steps", "2", "--mesh", "data=2,fsdp=2", "--meta", '{"lr": 1}')
    os.makedirs(tmp_path / "resume-logs")

    def resume(job):
        lr = 2 if job[job.index("--process-id") + 1] == "1" else 1
        return command(tmp_path, *FLAGS, "--steps", "4", "--mesh", "data=2,fsdp=2", "--resume",
                       "--meta", f'{{"lr": {lr}}}', *job)

    done = run_processes(resume, tmp_path / "resume-logs", timeout=60, kill_on_failure=False)
    assert [p.returncode for p in done] == [2, 2], [p.stderr for p in done]
    assert "another process refused to resume" in done[0].stderr
    assert "--lr 2 (checkpoint: 1)" in done[1].stderr


DPO_FLAGS = [
    "--model", "gpt2-tiny", "--loss", "dpo", "--grad", "logits-sam", "--rho", "1e-2", "--lr", "1e-2",
    "--batch-size", "4", "--steps", "3", "--max-len", "16", "--max-prompt-len", "8", "--held-out", "0",
    "--log-every", "1", "--checkpoint-every", "2", "--no-progress",
]


@pytest.mark.slow
def test_two_process_dpo_run_matches_one_process(tmp_path, prefs):
    """``experiments.dpo`` with logits-SAM, weights FSDP-split across two processes: the
    exported policy, the metrics and the checkpoint are those of a one-device run."""
    two, one = tmp_path / "two", tmp_path / "one"
    os.makedirs(tmp_path / "logs")
    done = run_processes(
        lambda job: [sys.executable, "-m", "experiments.dpo", *DPO_FLAGS, "--data", str(prefs), "--mesh", "fsdp=4",
                     "--out", str(two), "--export-hf", str(tmp_path / "two-hf"), *job],
        tmp_path / "logs", timeout=300)
    for i, process in enumerate(done):
        assert process.returncode == 0, f"process {i}: {process.stderr}"
        assert "done: step 3" in process.stdout
    assert dpo.main([*DPO_FLAGS, "--data", str(prefs), "--out", str(one), "--export-hf", str(tmp_path / "one-hf")]) == 0

    rows, expected = read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in rows] == [(r["step"], r["split"]) for r in expected]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Step 1 starts from the same weights: its loss, log-probs and logits-SAM gradient norm
    # agree to float32 rounding; later steps inherit the weights' differences (below).
    first, *later = zip(without_timing(rows), without_timing(expected))
    assert first[0] == pytest.approx(first[1], rel=1e-5, abs=1e-6)
    for row, want_row in later:
        assert row == pytest.approx(want_row, rel=1e-4, abs=1e-5)
    # AdamW moves a weight by about lr whatever its gradient's size, so on gradients that
    # are float noise (the key biases, which softmax ignores) the sums' order shows at
    # ~1e-4; a row on the wrong device or a stale shard would be off by ~lr = 1e-2.
    _, got = hf.load_pretrained(tmp_path / "two-hf")
    _, want = hf.load_pretrained(tmp_path / "one-hf")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4), got, want)
    assert json.loads((two / "config.json").read_text())["devices"] == 4
    # The run folder is a model: its latest checkpoint (step 3) is the exported policy.
    restored = dpo.load_params(*dpo.resolve_model(str(two)), seed=0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, got)
