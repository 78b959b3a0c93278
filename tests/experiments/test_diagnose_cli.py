"""``python -m experiments.diagnose``: the JSON a user gets, and one-line errors."""

import json

import numpy as np
import pytest

from experiments import diagnose


@pytest.fixture
def prefs(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"q{i}:", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_writes_products_and_traces(tmp_path, prefs, capsys):
    out = tmp_path / "diag.json"
    argv = ["--model", "gpt2-tiny", "--data", str(prefs), "--batch-size", "2", "--max-len", "16",
            "--probes", "2", "--hessians", "head,logits", "--out", str(out)]
    assert diagnose.main(argv) == 0
    result = json.loads(out.read_text())
    products = result["gradient_products"]
    inner, cos = np.array(products["inner"]), np.array(products["cosine"])
    norms = np.array(products["norm_chosen"]) * np.array(products["norm_rejected"])
    assert inner.shape == cos.shape == (2,)
    np.testing.assert_allclose(cos, inner / norms, rtol=1e-4)
    assert np.all(np.abs(cos) <= 1 + 1e-6)
    assert set(result["hessian_traces"]) == {"head", "logits"}
    assert all(np.isfinite(v["trace"]) for v in result["hessian_traces"].values())
    assert len(result["token_cosine"]) == 2
    effects = result["sam_step_effects"]
    assert {"sam/chosen", "sam/chosen/curvature", "sam/chosen/weight", "params/sam/rejected"} <= set(effects)
    assert all(np.isfinite(v) for v in effects.values())  # values: tests/lm/test_diagnostics.py
    assert diagnose.main([*argv, "--no-step-effects"]) == 0
    assert json.loads(out.read_text())["sam_step_effects"] == {}
    assert "gradient_products" in capsys.readouterr().out


def test_unusable_records_are_skipped_and_counted(tmp_path, capsys):
    """Only the first --batch-size usable pairs are diagnosed, so one over-long prompt (or
    a tie) elsewhere in the file is skipped and counted, not fatal."""
    path = tmp_path / "prefs.jsonl"
    prompts = ["q0:", "question1:", "q2:"]  # bytes: 10 > --max-prompt-len 8 (half of 16)
    path.write_text("".join(json.dumps({"prompt": q, "chosen": " yes", "rejected": " no"}) + "\n"
                            for q in prompts))
    out = tmp_path / "diag.json"
    argv = ["--model", "gpt2-tiny", "--data", str(path), "--batch-size", "2", "--max-len", "16",
            "--hessians", "", "--no-step-effects", "--out", str(out)]
    assert diagnose.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["pairs"] == [f"{path}:line 1", f"{path}:line 3"]
    assert result["data"] == {"file": str(path), "records": "kept 2 records; dropped 1 (prompt_too_long=1)"}
    assert f"--data {path}: kept 2 records; dropped 1 (prompt_too_long=1)" in capsys.readouterr().err
    assert diagnose.main([*argv, "--max-prompt-len", "10"]) == 0
    result = json.loads(out.read_text())
    assert result["pairs"] == [f"{path}:line 1", f"{path}:line 2"] and result["data"]["records"] == "kept 3 records"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hessians", "head,nope"], "argument --hessians: unknown 'nope'"),
        (["--batch-size", "9"], "3 usable pairs, fewer than --batch-size 9 (kept 3 records; --max-len 64, "
                                "--max-prompt-len 32)"),
        (["--max-len", "256"], "--max-len 256: over the model's 128 positions"),
        (["--max-len", "16", "--max-prompt-len", "16"], "argument --max-prompt-len: must be below --max-len 16"),
        (["--model", "no-such-model"], "--model 'no-such-model': not a directory nor a built-in model"),
    ],
)
def test_bad_input_is_one_line(tmp_path, prefs, capsys, flags, message):
    argv = ["--model", "gpt2-tiny", "--data", str(prefs), "--hessians", ""] + flags
    with pytest.raises(SystemExit) as exit_:
        diagnose.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert message in lines[0]
    # Errors raised in helpers shared with experiments.dpo still name this command.
    assert lines[0].startswith("python -m experiments.diagnose: error: "), lines
