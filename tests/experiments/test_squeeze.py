"""experiments.squeeze end to end at a tiny size, and its one-line errors."""

import json
import subprocess
import sys

import pytest

from experiments import squeeze


def test_tiny_run_writes_plot_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    rc = squeeze.main(["--sft-steps", "3", "--steps", "3", "--pairs", "16", "--held-out", "8",
                       "--batch-size", "8", "--max-len", "16", "--out", str(out)])
    assert rc == 0
    assert (out / "fig1c_logps.png").stat().st_size > 0
    result = json.loads((out / "metrics.json").read_text())
    assert set(result["runs"]) == {"adamw", "logits-sam"}
    for name, run in result["runs"].items():
        assert len(run["history"]["logps/chosen"]) == 3
        assert len(run["history"]["logps/rejected"]) == 3
        assert 0.0 <= run["heldout"]["rewards/accuracies"] <= 1.0
    sam, adamw = result["runs"]["logits-sam"], result["runs"]["adamw"]
    assert sam["rho"] == pytest.approx(0.05) and adamw["rho"] == 0.0
    # Same SFT model, same first batch: the first logged (pre-update) metrics agree ...
    assert sam["history"]["logps/chosen"][0] == pytest.approx(adamw["history"]["logps/chosen"][0])
    # ... and the perturbation makes the runs differ afterwards.
    assert sam["history"]["logps/chosen"][-1] != adamw["history"]["logps/chosen"][-1]
    assert "logits-sam" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["--rho", "0"], "--rho"),
        (["--rho", "abc"], "--rho"),
        (["--steps", "0"], "--steps"),
        (["--lr", "-1"], "--lr"),
        (["--style", "medium"], "--style"),
        (["--model", "gpt9"], "--model"),
        (["--tokenizer", "t.json"], "--tokenizer"),
        (["--data", "/nonexistent/prefs.jsonl", "--model", "gpt2-tiny"], "--data"),
    ],
)
def test_bad_flags_give_one_line(argv, culprit, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.squeeze", *argv, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], proc.stderr
