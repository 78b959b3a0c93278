"""experiments.bench: the CLI at the tiny default shape, its FLOP counts, bad flags.

No timing assertions: only that every number is produced, and that the rows' counts say
what experiments.flops's formulas say (tests/experiments/test_flops.py checks both).
"""

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

from experiments import bench, step_profile
from lm import models

MODES = ("adamw", "logits-sam", "sam")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu.json"
    bench.main(["--steps", "2", "--warmup", "0", "--isolate", "never", "--profile",
                "--breakdown", "--out", str(out)])
    with open(out) as f:
        return json.load(f)


def test_cli_writes_every_mode_with_the_expected_keys(result):
    for key in ("date", "jax_version", "device_kind", "platform", "conventions", "targets",
                "gpu_command", "flags", "rows"):
        assert key in result
    assert result["jax_version"] == jax.__version__
    assert result["xla_flags"] == os.environ.get("XLA_FLAGS", "")
    assert result["compilation_cache"] == os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    assert [r["mode"] for r in result["rows"]] == list(MODES)
    for r in result["rows"]:
        assert r["status"] == "ok", r
        assert r["shape"] == "gpt2-tiny" and r["timed_steps"] == 2
        assert r["attention"] == "xla"  # no GPU here
        for key in ("compile_s", "step_ms", "step_ms_min", "step_ms_max", "tokens_per_s",
                    "model_flops_per_s", "matmul_flops_per_step", "pipelined_step_ms",
                    "pipelined_tokens_per_s"):
            assert np.isfinite(r[key]) and r[key] > 0, key
        assert r["mfu"] is None and r["hfu"] is None  # no peak for a CPU without --peak-flops
        assert r["pipelined_mfu"] is None
        assert r["pipelined_tokens_per_s"] == pytest.approx(
            r["tokens_per_step"] / r["pipelined_step_ms"] * 1e3)
        assert set(r["phase_s"]) == {"init", "steps", "profile"} | (
            {"parts"} if r["mode"] != "sam" else set())
        assert r["phase_s"]["steps"] >= (r["timed_steps"] * r["step_ms_min"]
                                         + r["timed_steps"] * r["pipelined_step_ms"]) * 1e-3
        assert r["wall_s"] > r["compile_s"] + sum(r["phase_s"].values())
        mem = r["memory"]
        assert mem["estimate_bytes"] == (mem["argument_bytes"] + mem["output_bytes"]
                                         + mem["temp_bytes"] - mem["alias_bytes"])
        assert mem["alias_bytes"] > 0  # the train state is donated
    by_mode = {r["mode"]: r for r in result["rows"]}
    for mode in ("logits-sam", "sam"):
        assert "time_overhead_vs_adamw" in by_mode[mode]
        assert "pipelined_overhead_vs_adamw" in by_mode[mode]
        assert "memory_ratio_vs_adamw" in by_mode[mode]
    assert "flop_bound" in by_mode["logits-sam"]
    # --breakdown: adamw's four parts and the rest; logits-SAM's head next to adamw's.
    parts = by_mode["adamw"]["parts_ms"]
    assert list(parts) == ["reference", "trunk", "head", "optimizer", "rest"]
    # Against the step as the parts are timed: pipelined.
    assert parts["rest"] == pytest.approx(by_mode["adamw"]["pipelined_step_ms"] - sum(
        ms for name, ms in parts.items() if name != "rest"))
    lsam = by_mode["logits-sam"]
    assert list(lsam["parts_ms"]) == ["head"]
    assert lsam["head_extra_ms_vs_adamw"] == pytest.approx(
        lsam["parts_ms"]["head"] - parts["head"])
    assert lsam["step_extra_ms_vs_adamw"] == pytest.approx(
        lsam["pipelined_step_ms"] - by_mode["adamw"]["pipelined_step_ms"])
    assert "parts_ms" not in by_mode["sam"]
    # Issue 6's goals that a CPU run at gpt2-tiny can be held to: logits-SAM's, its time
    # by the pipelined steps.
    assert {c["goal"] for c in result["goals"]} == {
        "time overhead above its FLOP bound (pipelined)", "memory over adamw's"}


def test_profile_reads_the_cpu_trace_of_every_mode(result):
    """A real trace (XLA:CPU's thunks) matched to the compiled HLO: the matmuls and other
    fusions are found, and the longest ops carry their JAX source and line of Python."""
    for r in result["rows"]:
        profile = r["profile"]
        assert profile["steps"] == bench.PROFILE_STEPS and profile["wall_ms"] > 0
        assert 0 < profile["busy"] <= 1
        assert profile["ms"]["matmul"] > 0 and profile["ms"]["fusion"] > 0, profile["ms"]
        assert profile["device_to_host"] is None  # counted on GPUs only
        tops = [op["ms"] for op in profile["top"]]
        assert tops == sorted(tops, reverse=True)
        assert 10 < len(tops) <= step_profile.TOP
        assert any("Decoder" in op["source"] for op in profile["top"])
        # Summed per line of Python: the model's lines, named relative to the checkout; a
        # line's time holds each of its ops' (the longest op's line at least that op's).
        by_line = {entry["location"]: entry["ms"] for entry in profile["by_location"]}
        assert any(line.startswith("lm/models/layers.py:") for line in by_line), by_line
        longest = next(op for op in profile["top"] if op["location"])  # a copy may have none
        assert by_line[longest["location"]] >= longest["ms"]
        line_ms = list(by_line.values())
        assert line_ms == sorted(line_ms, reverse=True)


def test_each_finished_row_is_written_and_shown_before_the_next_starts(tmp_path, monkeypatch,
                                                                       capsys):
    """A time limit that cuts off the second mode keeps the first one's row, reason included."""
    out = tmp_path / "partial.json"

    def run_case(case, mode, args):
        if mode != "adamw":
            raise KeyboardInterrupt  # what `timeout` does to the run, near enough
        return {**dataclasses.asdict(case), "mode": mode, "status": "skipped",
                "reason": "needs 90.1 GiB > 78.0 GiB available"}

    monkeypatch.setattr(bench, "run_case", run_case)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--modes", "adamw,logits-sam", "--isolate", "never", "--out", str(out)])
    assert [r["mode"] for r in json.loads(out.read_text())["rows"]] == ["adamw"]
    assert "needs 90.1 GiB > 78.0 GiB available" in capsys.readouterr().err


def test_only_the_split_heads_mode_needs_a_batchable_cudnn_backward(monkeypatch):
    """``--head-dtype split`` vmaps the trunk's backward under logits-SAM alone, so on jax
    0.10 the other modes keep cuDNN's attention."""
    vmapped = []

    def attention_for(requested, cfg, *, vmapped_backward=False, device=None):
        assert device is jax.devices()[0]  # no --target: this host's
        vmapped.append(vmapped_backward)
        return "cudnn"

    monkeypatch.setattr(models, "attention_for", attention_for)
    args = bench.parse_args(["--head-dtype", "split", "--dtype", "bfloat16"])
    for mode in MODES:
        assert bench.model_config("gpt2-tiny", args, mode).attention_impl == "cudnn"
    assert vmapped == [mode == "logits-sam" for mode in MODES]


@pytest.mark.parametrize("remat, remat_on, policy", [
    ("none", False, None), ("block", True, None),
    ("dots_with_no_batch_dims_saveable", True, "dots_with_no_batch_dims_saveable")])
def test_remat_reaches_the_step_with_its_policy(monkeypatch, remat, remat_on, policy):
    """What each --remat builds (a policy's effect on the saved residuals is tested in
    tests/lm/test_models.py)."""
    built = []

    def make_grad_fn(cfg, **kwargs):
        built.append((kwargs["remat"], cfg.remat_policy))
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.objectives, "make_grad_fn", make_grad_fn)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--modes", "adamw", "--isolate", "never", "--remat", remat])
    assert built == [(remat_on, policy)]


def test_auto_attention_falls_back_to_xla_where_cudnn_does_not_compile(tmp_path, monkeypatch,
                                                                      capsys):
    """A cuDNN that passes jax's version check but cannot take the step (here: a CPU, which
    has no lowering for it) costs the row its cuDNN speed-up, not the row; it says why."""
    if jax.default_backend() != "cpu":
        pytest.skip("a CPU stands in for a GPU whose cuDNN cannot take the step")
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    if not hasattr(fused, "check_cudnn_version"):
        pytest.skip("this jax asks cuDNN's version elsewhere")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(models, "attention_for", lambda *a, **k: "cudnn")
    out = tmp_path / "fallback.json"
    bench.main(["--modes", "adamw", "--isolate", "never", "--steps", "1", "--warmup", "0",
                "--dtype", "bfloat16", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and row["attention"] == "xla", row
    assert row["attention_fallback"].startswith("cuDNN's attention did not compile: ")
    assert f"XLA's attention: {row['attention_fallback']}" in capsys.readouterr().err
    # --attention cudnn asks for cuDNN alone: no fallback.
    with pytest.raises(Exception, match="dot_product_attention"):
        bench.main(["--modes", "adamw", "--isolate", "never", "--compile-only",
                    "--dtype", "bfloat16", "--attention", "cudnn", "--out", str(out)])


def test_a_profiler_that_fails_costs_the_profile_not_the_timed_row(tmp_path, monkeypatch, capsys):
    def profile_steps(*args, **kwargs):
        raise step_profile.ProfileError("the profiler wrote no trace")

    monkeypatch.setattr(step_profile, "profile_steps", profile_steps)
    out = tmp_path / "noprofile.json"
    bench.main(["--modes", "adamw", "--isolate", "never", "--steps", "1", "--warmup", "0",
                "--profile", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and row["step_ms"] > 0
    assert row["profile"] == {"error": "ProfileError: the profiler wrote no trace"}
    assert "gpt2-tiny/adamw: no profile: ProfileError" in capsys.readouterr().err


def test_overheads_compare_rows_that_ran_the_same_attention():
    def row(mode, attention, step_ms):
        return {"shape": "gpt2-124m", "pairs": 8, "seq": 512, "prompt": 128, "remat": "none",
                "mode": mode, "attention": attention, "status": "ok", "step_ms": step_ms,
                "memory": {"estimate_bytes": 100}, "model_flops_per_step": 1.0,
                "matmul_flops_per_step": step_ms / 10}

    rows = [row("adamw", "cudnn", 10.0), row("logits-sam", "cudnn", 11.0), row("sam", "xla", 30.0)]
    bench.add_overheads(rows)
    assert rows[1]["time_overhead_vs_adamw"] == pytest.approx(0.1)
    assert rows[1]["counted_extra_flops_vs_adamw"] == pytest.approx(0.1)
    assert "time_overhead_vs_adamw" not in rows[2]  # no adamw row with XLA's attention


def test_a_repeated_adamw_row_bounds_the_overhead_between_processes():
    """``--modes adamw,logits-sam,adamw``: logits-SAM's time against the mean of the two
    adamw rows, and against the slowest and the fastest."""
    def row(mode, step_ms):
        return {"shape": "gpt2-2.65b", "pairs": 2, "seq": 512, "prompt": 128, "remat": "none",
                "mode": mode, "attention": "cudnn", "status": "ok", "step_ms": step_ms,
                "memory": {"estimate_bytes": 100}, "model_flops_per_step": 1.0}

    rows = [row("adamw", 100.0), row("logits-sam", 105.0), row("adamw", 110.0)]
    bench.add_overheads(rows[:2])
    assert rows[1]["time_overhead_vs_adamw"] == pytest.approx(0.05)
    assert "time_overhead_vs_adamw_range" not in rows[1]
    bench.add_overheads(rows)
    assert rows[1]["time_overhead_vs_adamw"] == pytest.approx(0.0)
    assert rows[1]["time_overhead_vs_adamw_range"] == pytest.approx([105 / 110 - 1, 0.05])
    assert "(-4.5%..+5.0%)" in bench.format_table(rows)


def test_the_pipelined_overhead_is_held_to_the_goals_before_the_waited_one():
    """The steps waited for one by one add the same host wait to both modes, which dilutes
    the ratio: logits-SAM's goals take the pipelined overhead where both rows have one."""
    def row(mode, step_ms, pipelined_ms=None):
        return {"shape": "gpt2-124m", "pairs": 8, "seq": 512, "prompt": 128, "remat": "none",
                "mode": mode, "attention": "cudnn", "status": "ok", "step_ms": step_ms,
                "memory": {"estimate_bytes": 100}, "model_flops_per_step": 1.0,
                "flop_bound": 0.1163,
                **({} if pipelined_ms is None else {"pipelined_step_ms": pipelined_ms})}

    rows = [row("adamw", 27.3, 24.7), row("logits-sam", 30.5, 27.9), row("adamw", 27.0, 24.9)]
    bench.add_overheads(rows)
    sam = rows[1]
    assert sam["time_overhead_vs_adamw"] == pytest.approx(30.5 / 27.15 - 1)
    assert sam["pipelined_overhead_vs_adamw"] == pytest.approx(27.9 / 24.8 - 1)
    assert sam["pipelined_overhead_vs_adamw_range"] == pytest.approx([27.9 / 24.9 - 1, 27.9 / 24.7 - 1])
    (goal,) = [g for g in bench.goal_checks(rows) if "bound" in g["goal"]]
    assert goal["goal"].endswith("(pipelined)") and goal["value"] == pytest.approx(27.9 / 24.8 - 1.1163)
    assert "pipelined +12.5%" in bench.format_table(rows)
    rows = [row("adamw", 27.3, 24.7), row("logits-sam", 30.5)]  # an older file's row
    bench.add_overheads(rows)
    assert "pipelined_overhead_vs_adamw" not in rows[1]
    (goal,) = [g for g in bench.goal_checks(rows) if "bound" in g["goal"]]
    assert goal["goal"] == "time overhead above its FLOP bound"


def test_interleaved_rounds_alternate_their_order():
    assert bench.interleaving(["adamw", "logits-sam", "adamw"], 3) == [
        "adamw", "logits-sam", "logits-sam", "adamw", "adamw", "logits-sam"]
    assert bench.interleaving(["sam"], 2) == ["sam", "sam"]


def test_every_timed_interleaved_block_follows_steps_of_its_own_mode():
    blocks = bench.settled_blocks(["adamw", "logits-sam", "adamw"], 2, steps=20, settle=3)
    assert blocks == [("adamw", 3, False), ("adamw", 20, True),
                      ("logits-sam", 3, False), ("logits-sam", 20, True),
                      ("logits-sam", 3, False), ("logits-sam", 20, True),
                      ("adamw", 3, False), ("adamw", 20, True)]
    assert [m for m, _, timed in blocks if timed] == bench.interleaving(["adamw", "logits-sam"], 2)
    assert bench.settled_blocks(["adamw"], 1, steps=5, settle=0) == [("adamw", 5, True)]


def test_interleaved_times_go_to_their_cases_rows():
    def row(mode, seq=512, status="ok"):
        return {"shape": "gpt2-2.65b", "pairs": 2, "seq": seq, "prompt": 128, "remat": "none",
                "mode": mode, "status": status}

    rows = [row("adamw"), row("logits-sam"), row("adamw"), row("sam", status="skipped"),
            row("adamw", seq=256)]
    result = {"rounds": 2, "steps_per_round": 10,
              "step_ms": {"adamw": 100.0, "logits-sam": 102.0},
              "round_ms": {"adamw": [99.0, 101.0], "logits-sam": [102.0, 101.0]}}
    bench.add_interleaved(rows, bench.Case("gpt2-2.65b", 2, 512, 128, "none"), result)
    assert rows[0]["interleaved_step_ms"] == rows[2]["interleaved_step_ms"] == 100.0
    assert rows[0]["interleaved_round_ms"] == [99.0, 101.0]
    assert rows[1]["interleaved_overhead_vs_adamw"] == pytest.approx(0.02)
    assert rows[1]["interleaved_overhead_range"] == pytest.approx([0.0, 102 / 99 - 1])
    assert not any("interleaved" in k for r in rows[3:] for k in r)
    bench.add_interleaved(rows[4:], bench.Case("gpt2-2.65b", 2, 256, 128, "none"),
                          {"error": "RuntimeError: out of memory"})
    assert rows[4]["interleaved_error"] == "RuntimeError: out of memory"


def test_only_the_modes_that_ran_are_interleaved_with_the_attention_they_ran():
    args = bench.parse_args(["--modes", "adamw,logits-sam,sam,adamw", "--interleave", "2",
                             "--attention", "auto"])
    case = bench.cases(args)[0]

    def row(mode, status="ok", **kw):
        return {**dataclasses.asdict(case), "mode": mode, "status": status, **kw}

    paired = bench.interleaved_args([row("adamw"), row("logits-sam"), row("sam", "skipped"),
                                     row("adamw")], case, args)
    assert paired.modes == ["adamw", "logits-sam"] and paired.attention == "auto"
    assert args.modes == ["adamw", "logits-sam", "sam", "adamw"]  # the run's own flags stay
    fell_back = [row("adamw", attention_fallback="cuDNN's attention did not compile"),
                 row("logits-sam")]
    assert bench.interleaved_args(fell_back, case, args).attention == "xla"
    # Nothing to compare: adamw did not run, or ran alone.
    assert bench.interleaved_args([row("adamw", "skipped"), row("logits-sam")], case, args) is None
    assert bench.interleaved_args([row("adamw"), row("sam", "failed")], case, args) is None
    assert bench.interleaved_args([row("adamw"), row("logits-sam")], case,
                                  bench.parse_args(["--modes", "adamw,logits-sam"])) is None


def test_rows_that_did_not_fit_are_not_interleaved(monkeypatch):
    """A case whose rows were skipped (here: every one needs more than the device has) is
    not built and run again for the interleaved timing."""
    monkeypatch.setattr(bench, "device_memory_limit", lambda device: 1000)
    monkeypatch.setattr(bench, "time_interleaved",
                        lambda *a: pytest.fail("interleaved a case whose rows were skipped"))
    result = bench.main(["--modes", "adamw,logits-sam", "--steps", "2", "--warmup", "0",
                         "--interleave", "2", "--isolate", "never"])
    assert [r["status"] for r in result["rows"]] == ["skipped", "skipped"]


@pytest.mark.parametrize("isolate", ["never", "always"])
def test_interleaved_timing_of_a_cases_modes_in_one_process(tmp_path, monkeypatch, isolate):
    """``--interleave``: every mode timed again in one process (a child where rows are
    isolated), each timed block after an untimed one of its mode, logits-SAM's overhead
    from those medians, and its goals held to it."""
    blocks = []
    timed = bench.step_parts.pipelined_seconds

    def recorded(call, steps, *rest):
        blocks.append(steps)
        return timed(call, steps, *rest)

    monkeypatch.setattr(bench.step_parts, "pipelined_seconds", recorded)
    out = tmp_path / "interleaved.json"
    bench.main(["--modes", "adamw,logits-sam", "--steps", "2", "--warmup", "0",
                "--interleave", "2", "--isolate", isolate, "--out", str(out)])
    result = json.loads(out.read_text())
    adamw, sam = result["rows"]
    if isolate == "never":  # the rows' pipelined steps, each mode's warm-up, settled blocks
        assert blocks[-10:] == [1, 1] + [1, 2] * 4
    assert adamw["interleaved_step_ms"] > 0 and sam["interleaved_step_ms"] > 0
    assert len(adamw["interleaved_round_ms"]) == len(sam["interleaved_round_ms"]) == 2
    assert sam["interleaved_overhead_vs_adamw"] == pytest.approx(
        sam["interleaved_step_ms"] / adamw["interleaved_step_ms"] - 1)
    low, high = sam["interleaved_overhead_range"]
    assert low <= high
    goals = {g["goal"] for g in result["goals"] if g["row"] == "gpt2-tiny/logits-sam"}
    assert "time overhead above its FLOP bound (interleaved)" in goals


def test_goal_checks_hold_each_row_to_its_goals():
    def row(shape, mode, pairs, **kw):
        return {"shape": shape, "mode": mode, "pairs": pairs, "seq": 512, "prompt": 128,
                "remat": "none", "attention": "cudnn", "status": "ok", "vocab": 50257,
                "model_flops_per_step": 1.0, "matmul_flops_per_step": 1.0, **kw}

    gb = 1e9
    rows = [row("gpt2-124m", "adamw", 8, step_ms=25.0, tokens_per_s=310e3, mfu=0.3,
                pipelined_tokens_per_s=320e3, pipelined_mfu=0.31,
                memory={"estimate_bytes": 6 * gb, "peak_bytes_in_use": 6.5 * gb}),
            row("gpt2-124m", "logits-sam", 8, step_ms=30.0, tokens_per_s=270e3, mfu=0.25,
                flop_bound=0.174, memory={"estimate_bytes": 6 * gb, "peak_bytes_in_use": 6.6 * gb}),
            row("gpt2-2.65b", "adamw", 2, step_ms=120.0, tokens_per_s=17e3, mfu=0.36,
                pipelined_tokens_per_s=18.8e3, pipelined_mfu=0.401,
                memory={"estimate_bytes": 50 * gb, "peak_bytes_in_use": 55 * gb}),
            # Not TRL's step: only logits-SAM's goals would apply.
            row("gpt2-124m", "adamw", 4, step_ms=15.0, tokens_per_s=270e3, mfu=0.3,
                memory={"estimate_bytes": 3 * gb}),
            row("gpt2-124m", "adamw", 8, step_ms=25.0, tokens_per_s=330e3, mfu=0.3,
                vocab=50304, memory={"estimate_bytes": 6 * gb}),
            row("gpt2-124m", "adamw", 8, step_ms=25.0, tokens_per_s=330e3, mfu=0.3,
                reference="precomputed", memory={"estimate_bytes": 6 * gb}),
            row("gpt2-2.65b", "adamw", 2, step_ms=110.0, tokens_per_s=18e3, mfu=0.41,
                mu_dtype="bfloat16", memory={"estimate_bytes": 50 * gb})]
    bench.add_overheads(rows)
    checks = {(c["row"], c["goal"]): (c["value"], c["met"]) for c in bench.goal_checks(rows)}
    assert checks == {
        ("gpt2-124m/adamw", "tokens/s over TRL's"): (pytest.approx(310 / 102), True),
        ("gpt2-124m/adamw", "tokens/s over TRL's (pipelined)"): (pytest.approx(320 / 102), True),
        ("gpt2-124m/adamw", "peak GB (TRL's)"): (pytest.approx(6.5), True),
        ("gpt2-124m/logits-sam", "time overhead above its FLOP bound"): (pytest.approx(0.026), False),
        ("gpt2-124m/logits-sam", "memory over adamw's"): (pytest.approx(6.6 / 6.5), True),
        ("gpt2-2.65b/adamw", "MFU"): (0.36, False),
        ("gpt2-2.65b/adamw", "MFU (pipelined)"): (0.401, True),
        ("gpt2-2.65b/adamw", "peak GB (TRL's)"): (pytest.approx(55.0), False),
    }


def test_a_run_cut_off_keeps_the_overheads_of_the_rows_it_finished(monkeypatch, tmp_path):
    def run_case(case, mode, args):
        if mode == "sam":
            raise KeyboardInterrupt  # the session's time limit
        return {**dataclasses.asdict(case), "mode": mode, "attention": "xla", "status": "ok",
                "step_ms": {"adamw": 10.0, "logits-sam": 12.0}[mode],
                "memory": {"estimate_bytes": 100}, "model_flops_per_step": 1.0,
                "matmul_flops_per_step": 1.0}

    monkeypatch.setattr(bench, "run_case", run_case)
    out = tmp_path / "cut.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--isolate", "never", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["adamw", "logits-sam"]
    assert rows[1]["time_overhead_vs_adamw"] == pytest.approx(0.2)


def test_only_an_error_of_cudnns_attention_falls_back(monkeypatch):
    """Any other failure of the first compile is the row's own, not a reason to drop cuDNN."""
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000, raising=False)
    monkeypatch.setattr(models, "attention_for", lambda *a, **k: "cudnn")

    class Unlowerable:
        def trace(self, *args):
            raise ValueError("an unrelated failure")

    build_step = bench.build_step

    def cudnn_step_fails(cfg, *args):  # XLA's attention alone would compile
        step, tx = build_step(cfg, *args)
        return (Unlowerable() if cfg.attention_impl == "cudnn" else step), tx

    monkeypatch.setattr(bench, "build_step", cudnn_step_fails)
    with pytest.raises(ValueError, match="an unrelated failure"):
        bench.main(["--modes", "adamw", "--isolate", "never", "--compile-only", "--dtype", "bfloat16"])
    assert models.is_cudnn_attention_error(RuntimeError("cuDNN is not detected."))
    assert models.is_cudnn_attention_error(NotImplementedError(
        "MLIR translation rule for primitive 'dot_product_attention_fwd' not found for platform cpu"))
    assert not models.is_cudnn_attention_error(RuntimeError("RESOURCE_EXHAUSTED: Out of memory"))


def test_flop_counts_of_every_mode(result):
    """The rows' matmul counts (experiments.flops, checked there against XLA's cost
    analysis): adamw's is model_flops plus attention; logits-SAM's extra work is exactly its
    bound; full SAM repeats the policy forward and backward, (6 + 6 + 2) / 8 of the work."""
    by_mode = {r["mode"]: r for r in result["rows"]}
    adamw, lsam, sam = by_mode["adamw"], by_mode["logits-sam"], by_mode["sam"]
    assert 1.0 < adamw["matmul_flops_per_step"] / adamw["model_flops_per_step"] < 1.2
    assert lsam["counted_extra_flops_vs_adamw"] == pytest.approx(lsam["flop_bound"], rel=1e-12)
    assert sam["matmul_flops_per_step"] / adamw["matmul_flops_per_step"] == pytest.approx(
        14 / 8, rel=0.05)


def test_peak_flops_table():
    class Dev:
        def __init__(self, kind):
            self.device_kind = kind

    assert bench.peak_flops(Dev("NVIDIA H100 80GB HBM3"), None) == 989.4e12
    assert bench.peak_flops(Dev("NVIDIA H200"), None) == 989.4e12
    assert bench.peak_flops(Dev("NVIDIA H100 PCIe"), None) == 756.5e12
    assert bench.peak_flops(Dev("NVIDIA A100-SXM4-80GB"), None) == 312e12
    assert bench.peak_flops(Dev("cpu"), None) is None
    assert bench.peak_flops(Dev("cpu"), 1e12) == 1e12


def test_child_process_flags_round_trip(monkeypatch):
    monkeypatch.setattr(bench, "compile_device", lambda target: jax.devices()[0])
    flags = ["--dtype", "bfloat16", "--chunk-size", "32", "--reference", "precomputed",
             "--rho", "0.001", "--peak-flops", "2e12", "--compile-only", "--steps", "5",
             "--vocab", "50304", "--mu-dtype", "bfloat16", "--interleave", "5",
             "--target", "benchmarks/targets/h100.txtpb"]
    args = bench.parse_args(flags)
    case = bench.cases(args)[0]
    child = bench.parse_args(["--shapes", case.shape, "--modes", "sam",
                              *bench._shared_flags(args)])
    for key, value in vars(args).items():
        if key not in ("modes", "isolate"):
            assert getattr(child, key) == value, key


@pytest.mark.slow
def test_compile_only_in_a_child_process_with_precomputed_reference(tmp_path):
    out = tmp_path / "compiled.json"
    bench.main(["--compile-only", "--isolate", "always", "--reference", "precomputed",
                "--modes", "logits-sam", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "compiled", row
    assert row["model_flops_per_step"] == 6 * 141056 * 256
    assert row["memory"]["estimate_bytes"] > 0 and "step_ms" not in row


def test_an_isolated_rows_progress_reaches_the_parent_as_it_comes(tmp_path, capfd):
    """The child's progress lines pass through (a run cut off by a time limit shows how far
    it got), and its row is shown once, by the parent, with the whole row's wall time."""
    out = tmp_path / "isolated.json"
    bench.main(["--compile-only", "--isolate", "always", "--modes", "adamw", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    err = capfd.readouterr().err
    assert err.count("gpt2-tiny/adamw: compiled in") == 1
    assert sum(line.startswith("gpt2-tiny  adamw") for line in err.splitlines()) == 1
    assert row["status"] == "compiled" and row["wall_s"] > row["compile_s"] > 0


def test_a_crashed_childs_reason_is_its_exception_not_its_teardown_noise():
    lines = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
             "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory",
             "I0000 00:00:1.0 1 tfrt_cpu_pjrt_client.cc:1] TfrtCpuClient destroyed."]
    assert bench._child_error(lines) == lines[2]
    assert bench._child_error(["bench: error: --seq 2048 exceeds gpt2-tiny's 128 positions",
                               "W0000 teardown"]).startswith("bench: error: --seq")
    assert bench._child_error(["Killed"]) == "Killed" and bench._child_error([]) == ""
    assert bench._child_error([*lines[:3], "Exception ignored in: <function Client.__del__>",
                               "Traceback (most recent call last):"]) == lines[2]


def test_vocab_replaces_the_shapes_vocabulary(tmp_path):
    """``--vocab`` changes the head and the embedding, and what is counted from them."""
    rows = {}
    for vocab in (None, 640):
        out = tmp_path / f"{vocab}.json"
        flags = ["--compile-only", "--isolate", "never", "--modes", "logits-sam",
                 "--out", str(out)] + ([] if vocab is None else ["--vocab", str(vocab)])
        bench.main(flags)
        (rows[vocab],) = json.loads(out.read_text())["rows"]
    base, padded = rows[None], rows[640]
    assert padded["vocab"] == 640 and base["vocab"] != 640
    # gpt2-tiny ties its head to the embedding: one [V, d] matrix.
    assert padded["n_params"] - base["n_params"] == (640 - base["vocab"]) * base["width"]
    assert padded["flop_bound"] > base["flop_bound"]


def test_random_batch_masks_the_prompt():
    batch = bench.random_batch(jax.random.PRNGKey(0), 3, 10, 4, 50, "precomputed")
    for key in ("input_ids", "attention_mask", "loss_mask"):
        assert batch[key].shape == (3, 2, 10) and batch[key].dtype == np.int32
    assert np.all(np.asarray(batch["loss_mask"])[..., :4] == 0)
    assert np.all(np.asarray(batch["loss_mask"])[..., 4:] == 1)
    assert batch["ref_logps"].shape == (3, 2)
    assert "ref_logps" not in bench.random_batch(jax.random.PRNGKey(0), 3, 10, 4, 50, "frozen")



@pytest.mark.parametrize("shape", ["gpt2-tiny", "llama-tiny", "pythia-tiny"])
def test_random_params_draw_what_the_models_init_draws(shape, monkeypatch):
    cfg = models.builtin_config(shape)
    init = models.init_params(cfg, jax.random.PRNGKey(0))
    drawn = bench.random_params(cfg, jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(drawn) == jax.tree_util.tree_structure(init)
    matrices = []
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(init),
                            jax.tree_util.tree_leaves(drawn)):
        name = jax.tree_util.keystr(path)
        assert (b.shape, b.dtype) == (a.shape, a.dtype), name
        if a.ndim < 2:
            np.testing.assert_array_equal(b, a, err_msg=name)
        else:
            std = 0.01 if "pos_embed" in name else 0.02
            assert np.std(a) == pytest.approx(std, rel=0.15), name
            assert np.std(b) == pytest.approx(0.02, rel=0.15), name
            matrices.append(np.asarray(b).ravel())
    # Every matrix its own draw: the layers' same-shaped kernels differ.
    firsts = [m[:8].tobytes() for m in matrices]
    assert len(set(firsts)) == len(firsts)
    # The bench's states start from these, never from the model's jitted init.
    monkeypatch.setattr(bench.models, "init_params", lambda *a: pytest.fail("init_params"))
    args = bench.parse_args(["--shapes", shape])
    tx = bench.build_step(cfg, "adamw", args, "none")[1]
    state, _ = bench.initial_state(cfg, "adamw", tx, jax.random.PRNGKey(0), args)
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(drawn)):
        np.testing.assert_array_equal(a, b)
    again = bench.random_params(cfg, jax.random.PRNGKey(0))
    other = bench.random_params(cfg, jax.random.PRNGKey(1))
    for a, b, c in zip(*map(jax.tree_util.tree_leaves, (drawn, again, other))):
        np.testing.assert_array_equal(a, b)
        assert a.ndim < 2 or not np.array_equal(a, c)


@pytest.mark.parametrize("flags, culprit", [
    (["--shapes", "gpt2-huge"], "--shapes"),
    (["--modes", "adamw,lion"], "--modes"),
    (["--seq", "16", "--prompt", "16"], "--prompt"),
    (["--pairs", "0"], "--pairs"),
    (["--remat", "full"], "--remat"),
    (["--seq", "4096"], "--seq"),
    (["--vocab", "1"], "--vocab"),
    (["--interleave", "-1"], "--interleave"),
    (["--target", "no/such/gpu.txtpb"], "--target"),
    (["--live-peak", "--isolate", "never"], "--live-peak"),
])
def test_bad_flags_give_one_line_and_exit_2(flags, culprit, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m experiments.bench: error:")
    assert culprit in err[0]


def test_bad_flag_from_the_command_line_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--modes", "lion"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--modes" in lines[0] and "lion" in lines[0]


def test_live_peak_is_the_bytes_xla_holds_at_once(tmp_path):
    """A step whose peak is known: two arguments and two outputs of 64 × 64 float32, all
    live at its end (no donation), and the output tuple's two pointers; a dump older than
    the compile is not read."""
    dump = tmp_path / "xla"
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "module_0001.jit_step.cpu_after_optimizations-live-range.txt").write_text(
        "  Stack trace breakdown for peak usage: 1 000 bytes\n")
    script = ("import jax, jax.numpy as jnp\n"
              "def step(x, y):\n    return x + 1, y * 2\n"
              "jax.jit(step)(jnp.ones((64, 64)), jnp.ones((64, 64)))\n")
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_module_re=jit_step",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert bench.live_peak_bytes(str(dump), since=0) == 4 * 64 * 64 * 4 + 2 * 8
    assert bench.live_peak_bytes(str(stale), since=0) == 1000
    assert bench.live_peak_bytes(str(stale), since=2e9) is None


def test_live_peaks_of_every_row_and_their_ratio(tmp_path):
    out = tmp_path / "live.json"
    bench.main(["--compile-only", "--live-peak", "--dtype", "bfloat16", "--chunk-size", "16",
                "--modes", "adamw,logits-sam", "--out", str(out)])
    adamw, sam = json.loads(out.read_text())["rows"]
    for row in (adamw, sam):
        memory = row["memory"]
        assert memory["argument_bytes"] < memory["live_peak_bytes"] <= memory["estimate_bytes"]
    assert sam["live_memory_ratio_vs_adamw"] == (sam["memory"]["live_peak_bytes"]
                                                 / adamw["memory"]["live_peak_bytes"])
    assert f"(live {sam['live_memory_ratio_vs_adamw']:.3f}x)" in bench.format_table([adamw, sam])
    # The same dump's kernels: logits-SAM's inner head pass adds launches and bytes.
    assert 0 < adamw["hlo_traffic"]["kernels"] < sam["hlo_traffic"]["kernels"]
    assert 0 < adamw["hlo_traffic"]["bytes"] < sam["hlo_traffic"]["bytes"]


def test_a_dump_the_parser_cannot_read_costs_the_traffic_not_the_row(tmp_path, monkeypatch):
    def broken(dump_dir, since):
        raise ValueError("no ENTRY computation in the HLO text")

    monkeypatch.setattr(bench, "step_traffic", broken)
    args = bench.parse_args(["--compile-only", "--dump-dir", str(tmp_path)])
    row = bench.run_case(bench.cases(args)[0], "adamw", args)
    assert row["status"] == "compiled" and "hlo_traffic" not in row
    assert row["hlo_traffic_error"] == "ValueError: no ENTRY computation in the HLO text"


TARGETS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "targets")
CUDA_PLUGIN = any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None
                  for v in (12, 13)) if importlib.util.find_spec("jax_plugins") else False


def _bench_for_a_target(tmp_path, target, *flags):
    # A process of its own: the plugin compiles for a GPU only before jax has started.
    out = tmp_path / "target.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--target", target,
                           "--out", str(out), *flags], capture_output=True, text=True)
    return proc, (json.loads(out.read_text()) if proc.returncode == 0 else None)


@pytest.mark.skipif(CUDA_PLUGIN, reason="jax's CUDA plugin is installed here")
def test_a_target_without_the_cuda_plugin_says_what_to_install(tmp_path):
    proc, _ = _bench_for_a_target(tmp_path, os.path.join(TARGETS, "h200.txtpb"))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "--target" in line and f"jax[cuda13]=={jax.__version__}" in line


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs jax's CUDA plugin (pip install 'jax[cuda13]')")
@pytest.mark.parametrize("gpu", ["h100", "h200"])
def test_a_target_compiles_the_step_for_its_gpu_here(tmp_path, gpu):
    proc, result = _bench_for_a_target(tmp_path, os.path.join(TARGETS, f"{gpu}.txtpb"),
                                       "--dtype", "bfloat16", "--modes", "adamw,logits-sam")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["platform"] == "gpu" and gpu.upper() in result["device_kind"]
    assert result["peak_flops"] == 989.4e12 and result["flags"]["compile_only"]
    for row in result["rows"]:
        assert row["status"] == "compiled" and row["attention"] == "cudnn", row
        assert row["memory"]["temp_bytes"] > 0 and "step_ms" not in row


@pytest.mark.parametrize("config, culprit", [
    ("", "cuda_compute_capability"),
    ("gpu_device_info {\n  cuda_compute_capability { major: 9 }\n  core_count: 0\n}\n",
     "core_count"),
    ("gpu_device_info {\n  cuda_compute_capability { major: 9 }\n  core_count: 132\n}\n",
     "device_description_str"),
])
def test_a_target_that_describes_no_gpu_is_refused_in_one_line(tmp_path, config, culprit):
    """What XLA would take and then crash on (an empty config: a division by zero) or
    compile for no GPU (no compute capability, no cores)."""
    bad = tmp_path / "gpu.txtpb"
    bad.write_text(config)
    with pytest.raises(bench.BenchError, match=f"--target: {bad} .*no {culprit}"):
        bench.compile_device(str(bad))


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs jax's CUDA plugin (pip install 'jax[cuda13]')")
def test_a_target_that_is_not_a_gpu_config_is_named(tmp_path):
    bad = tmp_path / "gpu.txtpb"
    bad.write_text('cuda_compute_capability { major: 9 }\ncore_count: 132\n'
                   'device_description_str: "x"\n')
    proc, _ = _bench_for_a_target(tmp_path, str(bad))
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("python -m experiments.bench: error: --target:") and str(bad) in line


def test_toy_speed_row_times_the_toy_engineers_sweep():
    t = bench.toy_speed(grid=3, repeats=1)
    assert t["trajectories"] == 9 and t["jax_run_s"] > 0 and t["numpy_run_s"] > 0
    assert t["max_abs_diff"] < 1e-3  # float32 vmapped sweep vs the float64 NumPy loop


def test_a_bfloat16_first_moment_stores_two_bytes_less_per_parameter(tmp_path):
    def argument_bytes(*flags):
        out = tmp_path / f"mu{len(flags)}.json"
        bench.main(["--modes", "adamw", "--isolate", "never", "--compile-only", *flags,
                    "--out", str(out)])
        (row,) = json.loads(out.read_text())["rows"]
        return row["memory"]["argument_bytes"], row["n_params"]

    full, n_params = argument_bytes()
    half, _ = argument_bytes("--mu-dtype", "bfloat16")
    assert full - half == 2 * n_params


def test_gpu_session_runs_the_picked_cases_and_returns_at_most_eight_files(tmp_path):
    """benchmarks/gpu_session.sh at a tiny shape, three cases picked by name: their JSONs and
    the log, nothing else started, a case's VAR=VALUE in its run's environment only, a
    "-before" case run from the code in $BEFORE, XLA's autotuning results kept for
    ``bench --target`` in one tar. More JSON files than MAX_JSON (6 for the device tool's 8
    files with the log and that tar) come back as one tar."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "benchmarks", "gpu_session.sh")
    tiny = "--shapes gpt2-tiny --pairs 1 --seq 32 --prompt 8"
    # The script runs the first python3 on PATH: this interpreter's.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "SMALL": tiny, "LARGE": tiny, "PROFILE": "0", "PATH": path,
           "MAX_JSON": "1", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
           "AOT_DIR": str(tmp_path / "aot")}
    env.pop("XLA_FLAGS", None)
    before = tmp_path / "before"
    for package in ("dynamics", "experiments", "lm"):
        shutil.copytree(os.path.join(root, package), before / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    with open(before / "lm" / "losses.py", "a") as f:
        f.write("# the code before a change\n")
    env["BEFORE"] = str(before)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.json").write_text("{}")  # not this session's: never packed or removed
    done = subprocess.run(["bash", script, str(out), "gpt2-2.65b-noremat-mu-bf16",
                           "gpt2-124m-cond-graphs", "gpt2-124m-before"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    platform = jax.devices()[0].platform
    (aot_name, earlier, tar_name, log_name) = sorted(p.name for p in out.iterdir())
    assert earlier == "earlier.json" and (out / earlier).read_text() == "{}"
    assert aot_name.startswith(f"aot-{platform}-")
    with tarfile.open(out / aot_name) as tar:
        # A CPU's topology has no target config: none is written rather than an empty one.
        assert "./autotune" in tar.getnames() and "./target.txtpb" not in tar.getnames()
    assert "no target config" in (out / "session.log").read_text()
    assert tar_name.startswith(f"runs-{platform}-") and log_name == "session.log"
    with tarfile.open(out / tar_name) as tar:
        files = sorted(tar.getnames())
        earlier_code, graphs, mu = (json.load(tar.extractfile(name)) for name in files)
    assert files[0].startswith(f"{platform}-gpt2-124m-before-")
    assert files[1].startswith(f"{platform}-gpt2-124m-cond-graphs-")
    assert files[2].startswith(f"{platform}-gpt2-2.65b-noremat-mu-bf16-")
    autotune = f"--xla_gpu_per_fusion_autotune_cache_dir={tmp_path / 'aot' / 'autotune'}"
    assert graphs["xla_flags"].split() == [autotune, "--xla_gpu_enable_command_buffer=+CONDITIONAL"]
    assert mu["xla_flags"].split() == [autotune]
    assert mu["source"] == graphs["source"] == bench.source_digest() != earlier_code["source"]
    assert [r["mode"] for r in earlier_code["rows"]] == ["adamw", "logits-sam"]
    (row,) = mu["rows"]
    assert row["status"] == "ok" and row["shape"] == "gpt2-tiny"
    assert row["remat"] == "none" and row["mu_dtype"] == "bfloat16"
    log = (out / "session.log").read_text()
    assert "== gpt2-2.65b-noremat-mu-bf16" in log and "== gpt2-124m " not in log
    with open(script) as f:
        runs = [line.split()[1] for line in f if line.startswith("run ")]
    assert len(set(runs)) == len(runs), runs
