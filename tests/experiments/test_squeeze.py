"""experiments.squeeze end to end at a tiny size, the matched-margin measure, and its one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import squeeze

HF = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
GPT2, TOKENIZER = str(HF / "gpt2"), str(HF / "tokenizer")  # the fixture checkpoint has no tokenizer.json
WEBGPT = str(HF.parent / "data" / "webgpt.jsonl")  # 4 rows: a tie and three prompts over 16 tokens
TINY = ["--sft-steps", "3", "--steps", "3", "--pairs", "16", "--held-out", "8",
        "--batch-size", "8", "--max-len", "16"]


def test_tiny_run_writes_plot_metrics_and_sweep(tmp_path, capsys, monkeypatch):
    # The full grid is the same loop; a radius already run (0, ±--rho) is reused, not recompiled.
    monkeypatch.setattr(squeeze, "SWEEP_RHOS", (0.0, 0.1))
    out = tmp_path / "run"
    assert squeeze.main([*TINY, "--rho", "0.1", "--sweep-rho", "--probe-every", "2", "--out", str(out)]) == 0
    assert (out / "fig1c_logps.png").stat().st_size > 0
    result = json.loads((out / "metrics.json").read_text())
    assert list(result["runs"]) == ["baseline", "logits-sam", "logits-sam-opposite", "sam"]
    assert [r["mode"] for r in result["runs"].values()] == ["plain", "logits-sam", "logits-sam", "sam"]
    for run in result["runs"].values():
        assert len(run["history"]["logps/chosen"]) == 3
        assert len(run["history"]["logps/rejected"]) == 3
        assert 0.0 <= run["heldout"]["rewards/accuracies"] <= 1.0
    base, lsam = result["runs"]["baseline"], result["runs"]["logits-sam"]
    assert lsam["rho"] == pytest.approx(0.1) and base["rho"] == 0.0
    assert result["runs"]["logits-sam-opposite"]["rho"] == pytest.approx(-0.1)
    # Same SFT model, same first batch: the first logged (pre-update) metrics agree ...
    for run in result["runs"].values():
        assert run["history"]["logps/chosen"][0] == pytest.approx(base["history"]["logps/chosen"][0])
    # ... and the perturbation makes the runs differ afterwards.
    assert lsam["history"]["logps/chosen"][-1] != base["history"]["logps/chosen"][-1]
    # The probe ran on the baseline at steps 0 and 2, before their updates.
    probes = base["history"]["probe"]
    assert [p["step"] for p in probes] == [0, 2] and "probe" not in lsam["history"]
    assert set(squeeze.PROBE_TERMS) <= set(probes[0]) and result["probe"]["probed_steps"] == 2
    # ρ = 0 and ρ = ±--rho in the sweep are the runs above.
    assert [s["rho"] for s in result["sweep_rho"]] == [-0.1, 0.0, 0.1]
    assert result["sweep_rho"][0] == result["summary"]["logits-sam-opposite"]
    assert result["sweep_rho"][1] == result["summary"]["baseline"]
    assert result["sweep_rho"][2] == result["summary"]["logits-sam"]
    printed = capsys.readouterr().out
    assert len(result["verdict"]) == 4 + 1 + 3 + 1 and all(line in printed for line in result["verdict"])
    assert "across_seeds" not in result and [s["seed"] for s in result["seeds"]] == [0]


# Words the committed tokenizer knows whole, so a 4-word question fits its 32-position GPT-2.
WORDS = "the cat sat on mat a preferred answer beats rejected logits sam flattens squeezing hello world jax".split()


def _checkpoint(tmp_path):
    """The tiny GPT-2 fixture in save_pretrained layout: config, weights and tokenizer.json."""
    ckpt = tmp_path / "gpt2"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(HF / "gpt2" / name, ckpt)
    shutil.copy(HF / "tokenizer" / "tokenizer.json", ckpt)
    return ckpt


def _webgpt(path, n, ties_every=5, per_question=1):
    """``n`` rows as openai/webgpt_comparisons has them (dict or plain-string question,
    scores summing to 0); every ``ties_every``-th is a tie, which must be dropped; each
    question is compared ``per_question`` times in a row."""
    rng = np.random.default_rng(0)
    words = lambda k: " ".join(rng.choice(WORDS, k))
    with open(path, "w") as f:
        for i in range(n):
            score = 0.0 if i % ties_every == 0 else float(rng.choice([-1.0, -0.5, 0.5, 1.0]))
            if i % per_question == 0:
                question = words(4) + "?"
            row = {"question": {"dataset": "eli5", "id": f"q{i}", "full_text": question} if i % 2 else question,
                   "quotes_0": {"title": [], "extract": []}, "answer_0": words(4), "tokens_0": [],
                   "score_0": score, "quotes_1": {"title": [], "extract": []}, "answer_1": words(5),
                   "tokens_1": [], "score_1": -score}
            f.write(json.dumps(row) + "\n")
    return path


CHECKPOINT_TINY = ["--sft-steps", "2", "--steps", "2", "--held-out", "4", "--batch-size", "4",
                   "--max-len", "32", "--max-prompt-len", "24"]


def test_checkpoint_and_webgpt_file_end_to_end(tmp_path, capsys):
    """The paper's setting (a HF GPT-2 directory, webgpt_comparisons rows) at a tiny size."""
    ckpt, data = _checkpoint(tmp_path), _webgpt(tmp_path / "webgpt.jsonl", 30)
    out = tmp_path / "run"
    argv = ["--model", str(ckpt), "--data", str(data), *CHECKPOINT_TINY, "--no-sam", "--no-opposite",
            "--probe-every", "2", "--out", str(out)]
    assert squeeze.main(argv) == 0
    assert (out / "fig1c_logps.png").stat().st_size > 0
    result = json.loads((out / "metrics.json").read_text())
    assert list(result["runs"]) == ["baseline", "logits-sam"]
    for run in result["runs"].values():
        assert len(run["history"]["logps/chosen"]) == 2 and np.isfinite(run["history"]["logps/chosen"]).all()
    # The tied head (GPT-2) goes through the probe too.
    assert [p["step"] for p in result["runs"]["baseline"]["history"]["probe"]] == [0]
    info = result["data"]
    assert info["tokenizer"] == str(ckpt / "tokenizer.json") and info["eos_id"] == 2  # the config's </s>
    assert info["records"] == "kept 24 records; dropped 6 (tie=6)"
    assert (info["train_pairs"], info["heldout_pairs"]) == (20, 4)
    assert "dropped 6 (tie=6)" in capsys.readouterr().err


def test_checkpoint_setup_tokenizes_with_its_tokenizer_and_holds_out_unseen_questions(tmp_path):
    from tokenizers import Tokenizer

    from lm import data

    ckpt, path = _checkpoint(tmp_path), _webgpt(tmp_path / "webgpt.jsonl", 30, per_question=3)
    setup = squeeze.file_setup(squeeze.parse_args(["--model", str(ckpt), "--data", str(path), *CHECKPOINT_TINY]))
    assert setup.cfg.tie_word_embeddings and setup.cfg.max_position_embeddings == 32
    train, held = setup.train.pairs, setup.heldout.pairs
    assert not set(train.source) & set(held.source)
    content = lambda p: {(tuple(a), tuple(b), tuple(c)) for a, b, c in zip(p.prompt, p.chosen, p.rejected)}
    assert not content(train) & content(held)
    prompts = lambda p: {tuple(x) for x in p.prompt}
    assert not prompts(train) & prompts(held)  # split by question, not by comparison
    assert len(held) >= 4 and len(prompts(train)) + len(prompts(held)) == 10
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    records = {r.source: r for r in data.read_records(str(path), on_error="skip")[0]}
    for pairs in (train, held):
        r = records[pairs.source[0]]
        assert list(pairs.prompt[0]) == tok.encode(r.prompt).ids
        assert list(pairs.chosen[0]) == tok.encode(r.chosen).ids + [2]  # + EOS


def test_too_few_questions_for_held_out_is_one_line(tmp_path, capsys):
    """Three questions cannot give 20 held-out pairs and leave any for training."""
    path = _webgpt(tmp_path / "webgpt.jsonl", 30, per_question=10)
    argv = ["--model", str(_checkpoint(tmp_path)), "--data", str(path), *CHECKPOINT_TINY, "--held-out", "20"]
    with pytest.raises(SystemExit):
        squeeze.file_setup(squeeze.parse_args(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (f"python -m experiments.squeeze: error: --held-out 20: held_out=20 of 24 items in 3 "
                         f"groups (prompts) leaves an empty split (--data {path})")


def test_synthetic_heldout_prompts_are_unseen_in_training():
    """At the defaults (512 train, 128 held-out pairs) seed 0's held-out draw repeats 9
    training prompts; they are replaced, deterministically."""
    args = squeeze.parse_args(["--seed", "0"])
    prompts = lambda pairs: {tuple(p) for p in pairs.prompt}
    setup = squeeze.synthetic_setup(args)
    train, held = setup.train.pairs, setup.heldout.pairs
    assert (len(train), len(held)) == (512, 128) and not prompts(train) & prompts(held)
    again = squeeze.synthetic_setup(args).heldout.pairs
    assert [p.tolist() for p in again.prompt] == [p.tolist() for p in held.prompt]
    from lm import synthetic

    every = {r["prompt"] for r in synthetic.sentiment_records(4, seed=1)}
    assert squeeze.unseen_records(4, "long", 1, every, draws=1) == []  # the draws ran out


def test_synthetic_truncation_is_reported(capsys):
    """Responses cut at a small --max-len are counted on stderr and in metrics.json's data."""
    setup = squeeze.synthetic_setup(squeeze.parse_args(TINY))
    records = setup.data["records"]
    assert records.startswith("kept 24 records; truncated ") and records.endswith(" responses")
    assert f"synthetic long task: {records} (--max-len 16)" in capsys.readouterr().err


def test_seeds_are_paired_with_their_own_baseline(tmp_path, capsys):
    out = tmp_path / "seeds"
    argv = [*TINY, "--no-sam", "--no-opposite", "--probe-every", "0", "--seed", "3", "--seeds", "2"]
    assert squeeze.main([*argv, "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert [s["seed"] for s in result["seeds"]] == [3, 4] and result["seed"] == 3
    agg = result["across_seeds"]["logits-sam"]
    want = [s["summary"]["logits-sam"]["heldout_logps_chosen_change"]
            - s["summary"]["baseline"]["heldout_logps_chosen_change"] for s in result["seeds"]]
    assert agg["end"]["values"] == pytest.approx(want)
    assert agg["end"]["mean"] == pytest.approx(np.mean(want))
    assert agg["end"]["stderr"] == pytest.approx(np.std(want, ddof=1) / np.sqrt(2))
    assert agg["end"]["mitigates"] == sum(w > 0 for w in want)
    assert "over 2 seeds" in capsys.readouterr().out


def test_a_baseline_that_never_reaches_the_matched_margin_gives_no_comparison():
    base = _summary(None, -1.0, 1.0)
    assert "no like-for-like comparison" in squeeze.verdict("x", _summary(0.5, -1.0, 1.0), base)
    results = [{"summary": {"baseline": base, "x": {**_summary(0.5, -0.5, 1.0), "rho": 0.1}}}]
    agg = squeeze.across_seeds(results)["x"]
    assert agg["matched_margin"]["values"] == [] and agg["end"]["values"] == [0.5]


def test_a_baseline_margin_that_is_not_positive_gives_no_comparison():
    """Half a final margin <= 0 is "reached" by every run at step 0 with no change: no
    like-for-like comparison, and the seed is left out of the matched-margin statistics."""
    def run(chosen):
        return {"mode": "plain", "rho": 0.0,
                "history": {"rewards/margins": [0.0, -0.1, -0.2], "logps/chosen": chosen,
                            "logps/rejected": [-2.0, -2.0, -2.0]},
                "heldout": {"logps/chosen": -1.5, "logps/rejected": -2.5, "rewards/margins": -0.1,
                            "rewards/accuracies": 0.4}}

    sft = {"logps/chosen": -1.0, "logps/rejected": -2.0}
    base = squeeze.summary(run([-1.0, -2.0, -3.0]), sft, target_margin=-0.05)
    x = {**squeeze.summary(run([-1.0, -1.5, -2.0]), sft, target_margin=-0.05), "rho": 0.1}
    assert base["matched_margin_chosen_change"] is x["matched_margin_chosen_change"] is None
    assert "the baseline's final train margin is not positive, so no like-for-like comparison" in squeeze.verdict(
        "x", x, base)
    lines = squeeze.report({"summary": {"baseline": base, "x": x}})
    assert "none (the baseline's train margin is not positive)" in lines[1]
    # Not "the margin grows to -0.100": the baseline learned nothing (SGD at too small a rate).
    assert lines[2] == ("baseline: did not learn the preference (held-out margin -0.100, accuracy "
                        "0.400): nothing to squeeze or mitigate; raise --lr or --steps")
    agg = squeeze.across_seeds([{"summary": {"baseline": base, "x": x}}])
    assert agg["x"]["matched_margin"]["values"] == [] and agg["x"]["end"]["values"] == [0.0]
    assert "train at equal margin no seed to compare" in squeeze.across_seeds_lines(agg, 1)[1]


def test_every_heldout_pair_is_evaluated_and_weighted_by_pair():
    """10 held-out pairs in batches of 4: the last batch (2 pairs) is evaluated, and the
    metrics are means over pairs, not over batches."""
    import argparse

    from lm.data import TokenizedPairs

    n = 10
    arange = lambda k: np.arange(k, dtype=np.int32) + 3
    pairs = TokenizedPairs([arange(1 + i % 3) for i in range(n)], [arange(1 + i % 5) for i in range(n)],
                           [arange(2) for _ in range(n)], [f"mem:{i}" for i in range(n)])
    args = argparse.Namespace(max_len=16, batch_size=4, seed=0, held_out=n)
    _, held = squeeze._loaders(args, pairs, pairs, 0, "--pairs 10")
    tokens = lambda batch: batch["attention_mask"][:, 0].sum(-1)  # prompt + chosen, per pair
    seen = [held.batch(k) for k in range(len(held))]
    assert [len(b["index"]) for b in seen] == [4, 4, 2]
    fake_eval = lambda params, batch, ref: (None, {"tokens": tokens(batch).mean()})
    got = squeeze.evaluate(fake_eval, None, None, held)["tokens"]
    assert got == pytest.approx(np.mean([len(p) + len(c) for p, c in zip(pairs.prompt, pairs.chosen)]))


def test_probe_summary_counts_signs_and_the_weight_to_curvature_ratio():
    records = [{"sam/chosen": 1.0, "params/sam/chosen": -1.0, "sam/chosen/curvature": 0.5,
                "sam/chosen/self": 0.1, "sam/chosen/weight": 0.5},
               {"sam/chosen": -2.0, "params/sam/chosen": 3.0, "sam/chosen/curvature": 1.0,
                "sam/chosen/self": -0.1, "sam/chosen/weight": -3.0}]
    s = squeeze.probe_summary(records)
    assert s["probed_steps"] == 2
    assert s["raises_chosen"] == {"sam/chosen": 1, "params/sam/chosen": 1,
                                  "sam/chosen/curvature": 2, "sam/chosen/self": 1}
    assert s["median_weight_over_curvature"] == pytest.approx(2.0)  # median of 1 and 3
    assert "2 steps" in squeeze.probe_line(s)


def test_sgd_is_plain_gradient_descent():
    import jax.numpy as jnp

    tx = squeeze.make_tx("sgd", 0.5, steps=10)
    params, grads = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([4.0, 0.5])}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-2.0, -0.25])



def test_no_sft_steps_is_a_no_op():
    """--sft-steps 0 starts DPO from the checkpoint itself: no step, so no batch or gradient is needed."""
    params = {"w": np.ones(2, np.float32)}
    out, history = squeeze.run_loop(None, squeeze.make_tx("adamw", 1e-3, 0), params, None, 0)
    assert history == {} and out["w"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("head, tied", [("untied", False), ("tied", True)])
def test_head_flag_sets_the_tie(head, tied):
    args = squeeze.parse_args([*TINY, "--head", head])
    cfg = squeeze.synthetic_setup(args).cfg
    assert cfg.tie_word_embeddings is tied
    assert squeeze.parse_args(TINY).head == "tied"  # GPT-2's, the paper's model


def test_smoothed_is_a_trailing_mean():
    x = [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]
    got = squeeze.smoothed(x, window=3)
    want = [np.mean(x[max(0, i - 2):i + 1]) for i in range(len(x))]
    np.testing.assert_allclose(got, want)


def test_chosen_change_at_matched_margin():
    run = {"history": {"rewards/margins": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
                       "logps/chosen": [-1.0, -1.0, -2.0, -3.0, -4.0, -5.0]}}
    margin = squeeze.smoothed(run["history"]["rewards/margins"])
    chosen = squeeze.smoothed(run["history"]["logps/chosen"])
    step = int(np.flatnonzero(margin >= 0.3)[0])
    assert squeeze.chosen_change_at_margin(run, 0.3) == (step, pytest.approx(chosen[step] - chosen[0]))
    assert squeeze.chosen_change_at_margin(run, 5.0) == (None, None)


def _summary(at, end, margin):
    """The fields of :func:`squeeze.summary` that :func:`squeeze.verdict` reads."""
    return {"matched_margin": 1.0, "matched_margin_chosen_change": at,
            "heldout_logps_chosen_change": end, "heldout_margin": margin}


@pytest.mark.parametrize("at, word", [(-1.0, "MITIGATES"), (-5.0, "WORSENS"), (-3.05, "does not change"),
                                      (None, "never reached")])
def test_verdict_compares_at_equal_margin(at, word):
    base = _summary(-3.0, -6.0, 3.0)
    # A slower run that ends higher is not called a mitigation unless it is higher at equal margin.
    assert word in squeeze.verdict("x", _summary(at, -1.0, 1.0), base)


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["--rho", "0"], "--rho"),
        (["--rho", "abc"], "--rho"),
        (["--steps", "0"], "--steps"),
        (["--lr", "-1"], "--lr"),
        (["--style", "medium"], "--style"),
        (["--optimizer", "lion"], "--optimizer"),
        (["--head", "shared"], "--head"),
        (["--head", "tied", "--model", "."], "--head"),
        (["--model", "gpt9"], "--model"),
        (["--tokenizer", "t.json"], "--tokenizer"),
        (["--data", "/nonexistent/prefs.jsonl", "--model", "gpt2-tiny"], "--data"),
        (["--head", "tied", "--model", GPT2], "--head: only for a built-in --model"),
        (["--max-len", "16", "--max-prompt-len", "16"], "--max-prompt-len"),
        (["--max-len", "12"], "--max-len 12, --max-prompt-len 6: too small for the synthetic task "
                              "(synthetic train:0: field 'prompt': prompt is 7 tokens, over max_prompt_len=6)"),
        (["--pairs", "4"], "--pairs 4: 4 pairs cannot fill one batch of 16 (--batch-size 16)"),
        (["--model", GPT2, "--data", WEBGPT, "--max-len", "64"], "--max-len 64: over the model's 32 positions"),
        (["--model", GPT2, "--data", WEBGPT], "has no tokenizer.json; pass --tokenizer"),
        (["--model", GPT2, "--tokenizer", TOKENIZER, "--data", WEBGPT, "--held-out", "1"],
         "0 usable pairs, need more than --held-out 1 (kept 0 records; dropped 4 (prompt_too_long=3, tie=1)"),
        (["--model", GPT2, "--tokenizer", TOKENIZER, "--data", str(HF / "gpt2" / "config.json")],
         "config.json: no usable record (all 34 dropped; see the report)"),  # not JSON lines
    ],
)
def test_bad_flags_give_one_line(argv, culprit, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.squeeze", *argv, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], proc.stderr


def test_rho_is_signed():
    """Both sign conventions are first-class: a negative radius parses (only 0 is refused)."""
    assert squeeze.parse_args(["--rho", "-0.1"]).rho == -0.1
    assert squeeze.parse_args(["--rho", "-1e-2"]).rho == -0.01  # exponent: not read as a flag


def test_chunked_logits_and_remat_train_and_evaluate_like_the_plain_step(tmp_path, monkeypatch):
    """--chunk-size bounds the vocabulary logits held at once and --remat the activations;
    the runs are the same."""
    from lm import losses, objectives

    seen = set()
    token_logps, decoder_hidden = losses.token_logps, objectives._decoder_hidden

    def recording_logps(*args, chunk_size=None, **kwargs):
        seen.add(("chunk_size", chunk_size))
        return token_logps(*args, chunk_size=chunk_size, **kwargs)

    def recording_hidden(cfg, remat, *args):
        seen.add(("remat", remat))
        return decoder_hidden(cfg, remat, *args)

    monkeypatch.setattr(losses, "token_logps", recording_logps)
    monkeypatch.setattr(objectives, "_decoder_hidden", recording_hidden)
    argv = [*TINY, "--no-sam", "--no-opposite", "--probe-every", "0"]
    results = []
    for extra in ([], ["--chunk-size", "5", "--remat"]):
        out = tmp_path / f"run{len(extra)}"
        assert squeeze.main([*argv, *extra, "--out", str(out)]) == 0
        results.append(json.loads((out / "metrics.json").read_text()))
    full, chunked = results
    assert {("chunk_size", 5), ("remat", True)} <= seen  # the DPO and eval steps were traced so
    for name in ("baseline", "logits-sam"):
        for key in ("logps/chosen", "rewards/margins", "loss"):
            np.testing.assert_allclose(chunked["runs"][name]["history"][key],
                                       full["runs"][name]["history"][key], rtol=1e-4, atol=1e-5)
        for key, value in full["runs"][name]["heldout"].items():
            assert chunked["runs"][name]["heldout"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    np.testing.assert_allclose(chunked["sft"]["history"]["loss"], full["sft"]["history"]["loss"], rtol=1e-5)
