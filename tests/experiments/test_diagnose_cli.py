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


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hessians", "head,nope"], "argument --hessians: unknown 'nope'"),
        (["--batch-size", "9"], "fewer than --batch-size 9"),
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
