"""``python -m experiments.dpo``: one-line errors for bad input, and a tiny end-to-end run."""

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import diagnose, dpo
from lm import hf, models
from lm.train.logging import read_jsonl
from tokenizers import Tokenizer

HF = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
ROOT = str(Path(__file__).resolve().parents[2])


def errors(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        dpo.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    return exit_.value.code, lines


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        dpo.main(["--help"])
    assert exit_.value.code == 0
    assert "--grad" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "no-such-model"], "--model 'no-such-model': not a directory nor a built-in model"),
        (["--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
        (["--mesh", "data=3"], "--mesh 'data=3': data=3 x fsdp=1 = 3 devices, but 1 are available"),
        (["--grad", "sharp"], "argument --grad: invalid choice: 'sharp'"),
        (["--lr", "-1"], "argument --lr: must be > 0, got '-1'"),
        (["--max-len", "512"], "--max-len 512: over the model's 128 positions"),
        (["--batch-size", "20"], "--data: 11 pairs cannot fill one batch of 20 (pairs: 12, --batch-size 20"),
        (["--tokenizer", "nope.json"], "--tokenizer nope.json: no such file"),
        (["--loss", "slic", "--beta", "0.1"], "--beta: loss 'slic' takes no 'beta'"),
        (["--loss", "cpo", "--lam", "-1"], "--lam must be >= 0 for loss 'cpo', got -1.0"),
        (["--batch-size", "4", "--grad-accum", "3"], "--batch-size 4 is not divisible by --grad-accum 3"),
        (["--num-processes", "2", "--process-id", "2"], "--process-id 2 is not below --num-processes 2"),
        (["--coordinator", "10.0.0.1"], "--coordinator '10.0.0.1': expected HOST:PORT"),
        (["--held-out", "1.7"], "--held-out 1.7: a count of pairs (>= 1) must be a whole number"),
        (["--attention", "cudnn"], "--attention cudnn: cuDNN needs an NVIDIA GPU; use --attention"),
        (["--max-len", "16", "--max-prompt-len", "16"],
         "--max-prompt-len 16 must be below --max-len 16"),
        (["--held-out", "0", "--eval-every", "2"],
         "--eval-every 2: there is no held-out data to evaluate (--held-out 0)"),
        (["--held-out", "0", "--eval-batches", "3"],
         "--eval-batches 3: there is no held-out data to evaluate (--held-out 0)"),
        (["--eos-token", "</s>"], "--eos-token '</s>': the byte tokenizer's EOS is 256; pass --tokenizer"),
        (["--model-step", "3"], "--model-step 3: --model is not a run folder"),
        (["--export-hf", "{out}/hf"], "--export-hf {out}/hf: inside --out {out}, whose config.json"),
    ],
)
def test_bad_input_is_one_line(capsys, tmp_path, prefs, flags, message):
    out = str(tmp_path / "run")
    argv = ["--model", "gpt2-tiny", "--data", str(prefs), "--out", out, "--steps", "1"]
    code, lines = errors(capsys, argv + [f.format(out=out) for f in flags])
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("python -m experiments.dpo: error: ")
    assert message.format(out=out) in lines[0]


def test_unreachable_coordinator_is_one_line(capsys, tmp_path, prefs):
    """A worker whose coordinator never answers fails in --init-timeout seconds naming it
    (XLA's client would abort the process after 300 s with a C++ stack trace)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # free, and nobody listens once closed
    argv = ["--model", "gpt2-tiny", "--data", str(prefs), "--out", str(tmp_path / "run"), "--steps", "1",
            "--coordinator", address, "--num-processes", "2", "--process-id", "1", "--init-timeout", "1"]
    start = time.monotonic()
    code, lines = errors(capsys, argv)
    assert code == 2 and len(lines) == 1, lines
    assert f"--coordinator {address}: nothing listens at {address} after 1 s" in lines[0]
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("flag", ["--out", "--export-hf"])
def test_unwritable_directory_is_one_line_before_training(capsys, tmp_path, prefs, flag):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["--model", "gpt2-tiny", "--data", str(prefs), "--out", str(tmp_path / "run"), "--steps", "1"]
    code, lines = errors(capsys, argv + [flag, str(blocker / "sub")])
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"python -m experiments.dpo: error: {flag} ")
    assert "not a writable directory" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_tiny_run_logs_checkpoints_and_exports(tmp_path, prefs, capsys):
    out, export = tmp_path / "run", tmp_path / "hf"
    argv = [
        "--model", "gpt2-tiny", "--data", str(prefs), "--loss", "dpo", "--grad", "logits-sam",
        "--rho", "1e-2", "--beta", "0.1", "--lr", "1e-2", "--batch-size", "4", "--steps", "2",
        "--max-len", "16", "--max-prompt-len", "8", "--held-out", "0", "--log-every", "1",
        "--out", str(out), "--export-hf", str(export), "--no-progress",
    ]
    assert dpo.main(argv) == 0
    assert "done: step 2" in capsys.readouterr().out

    config = json.loads((out / "config.json").read_text())
    assert config["grad"] == "logits-sam" and config["rho"] == 1e-2 and config["tokenizer"] == "ByteTokenizer"
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train")]  # eval: tests/lm
    for key in ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected", "rewards/margins", "sam/perturbed_loss"):
        assert np.isfinite(rows[0][key]), key
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-3)  # policy == reference at step 0
    for png in ("loss.png", "logps.png", "margins.png"):
        assert (out / png).stat().st_size > 0
    assert (out / "checkpoints" / "2").is_dir()

    # The export is a model for --model: its tokenizer.json encodes bytes as the run did,
    # with the run's EOS (256, not the built-in config's 511).
    tokenizer, eos = dpo.load_tokenizer(argparse.Namespace(tokenizer=None, eos_token=None, model=str(export)),
                                        *dpo.resolve_model(str(export)))
    assert eos == dpo.ByteTokenizer.eos_id
    for text in ("12+3= 15", "héllo ☃ 𝄞\n", "<|endoftext|>"):
        assert tokenizer.encode(text).ids == dpo.ByteTokenizer().encode(text).ids

    cfg, exported = hf.load_pretrained(export)
    init = jax.jit(models.init_params, static_argnums=0)(models.builtin_config("gpt2-tiny"), jax.random.PRNGKey(0))
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), exported, jax.device_get(init))
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3

    # The run folder is a model too: its latest checkpoint, for diagnostics (or more training).
    run_cfg, run_dir = dpo.resolve_model(str(out))
    assert run_cfg == cfg and run_dir == str(out)
    restored = dpo.load_params(run_cfg, run_dir, seed=0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, exported)
    diag = tmp_path / "diag.json"
    assert diagnose.main(["--model", str(out), "--data", str(prefs), "--batch-size", "2", "--max-len", "16",
                          "--hessians", "", "--out", str(diag)]) == 0
    assert len(json.loads(diag.read_text())["gradient_products"]["cosine"]) == 2


def test_precomputed_reference_trains_like_the_frozen_one(tmp_path, prefs):
    """Reference log-probs computed once before training give the same run as evaluating
    the frozen reference in every step (train and held-out metrics)."""
    rows = {}
    for reference in ("frozen", "precomputed"):
        out = tmp_path / reference
        argv = [
            "--model", "gpt2-tiny", "--data", str(prefs), "--grad", "adamw", "--lr", "1e-2",
            "--batch-size", "4", "--steps", "2", "--max-len", "16", "--max-prompt-len", "8",
            "--held-out", "4", "--log-every", "1", "--reference", reference, "--out", str(out),
            "--no-progress",
        ]
        assert dpo.main(argv) == 0
        rows[reference] = read_jsonl(out / "metrics.jsonl")
    assert [r["split"] for r in rows["frozen"]] == [r["split"] for r in rows["precomputed"]]
    assert "eval" in {r["split"] for r in rows["frozen"]}
    for frozen, precomputed in zip(rows["frozen"], rows["precomputed"]):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert precomputed[key] == pytest.approx(frozen[key], rel=1e-4, abs=1e-5), key
    assert rows["frozen"][-1]["loss"] != pytest.approx(np.log(2), abs=1e-4)  # it trained


def test_scanned_layers_train_like_unrolled_ones(tmp_path, prefs):
    """--scan-layers, --attention and --remat-policy reach the model config, and a scanned,
    rematerialised run is the unrolled run up to float rounding (train and held-out metrics)."""
    rows = {}
    scanned = ["--scan-layers", "--attention", "xla", "--remat-policy", "dots_with_no_batch_dims_saveable"]
    for name, flags in (("unrolled", []), ("scanned", scanned)):
        out = tmp_path / name
        argv = ["--model", "gpt2-tiny", "--data", str(prefs), "--grad", "logits-sam", "--lr", "1e-2",
                "--batch-size", "4", "--steps", "2", "--max-len", "16", "--max-prompt-len", "8",
                "--held-out", "4", "--log-every", "1", "--out", str(out), "--no-progress", *flags]
        assert dpo.main(argv) == 0
        rows[name] = read_jsonl(out / "metrics.jsonl")
        config = json.loads((out / "config.json").read_text())["model_config"]
        assert config["scan_layers"] == bool(flags)
        assert config["attention_impl"] == ("xla" if flags else None)  # auto on a CPU: XLA's
        assert config["remat_policy"] == ("dots_with_no_batch_dims_saveable" if flags else None)
    assert [r["split"] for r in rows["scanned"]] == [r["split"] for r in rows["unrolled"]]
    for unrolled, scanned in zip(rows["unrolled"], rows["scanned"]):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert scanned[key] == pytest.approx(unrolled[key], rel=1e-4, abs=1e-5), key


def test_a_cudnn_attention_that_fails_names_the_way_round(tmp_path, prefs, monkeypatch, capsys):
    """cuDNN's attention that passes jax's checks but cannot compile the step (a CPU stands in
    for such a GPU) stops the run with one line naming --attention xla."""
    if jax.default_backend() != "cpu":
        pytest.skip("a CPU stands in for a GPU whose cuDNN cannot take the step")
    from lm import models

    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000, raising=False)
    monkeypatch.setattr(models, "attention_for", lambda *a, **k: "cudnn")
    argv = ["--model", "gpt2-tiny", "--data", str(prefs), "--dtype", "bfloat16", "--batch-size", "4",
            "--steps", "1", "--max-len", "16", "--max-prompt-len", "8", "--held-out", "0",
            "--out", str(tmp_path / "run"), "--no-progress"]
    with pytest.raises(SystemExit) as exit_:
        dpo.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m experiments.dpo: error: --attention: cuDNN's attention failed here (")
    assert err.endswith("; run with --attention xla")


@pytest.mark.parametrize("head_dtype", ["float32", "split"])
def test_bfloat16_compute_with_an_exact_head(tmp_path, prefs, head_dtype):
    """The flag reaches the run and the run folder; the heads' numerics are tested in
    tests/lm/test_objectives.py."""
    out = tmp_path / "bf16"
    argv = ["--model", "gpt2-tiny", "--data", str(prefs), "--dtype", "bfloat16", "--head-dtype", head_dtype,
            "--batch-size", "4", "--steps", "1", "--max-len", "16", "--max-prompt-len", "8", "--held-out", "0",
            "--log-every", "1", "--out", str(out), "--no-progress"]
    assert dpo.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_config"]["dtype"] == "bfloat16" and config["head_dtype"] == head_dtype
    (row,) = read_jsonl(out / "metrics.jsonl")
    assert row["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference exactly


def test_a_refused_command_leaves_the_run_folder_as_it_was(tmp_path, capsys):
    """Another --model into a trained folder (with or without --resume), or other flags on
    --resume, stop with one line naming what differs, and write nothing: the folder stays
    a model, resumable with its own flags. The export carries the run's tokenizer."""
    out, export, prefs = tmp_path / "run", tmp_path / "hf", tmp_path / "words.jsonl"
    words = "the cat sat on mat a preferred answer beats rejected hello world".split()  # known to the tokenizer
    prefs.write_text("".join(json.dumps({"prompt": " ".join(words[i:i + 3]), "chosen": f" {words[i + 3]}",
                                         "rejected": f" {words[i + 4]}"}) + "\n" for i in range(8)))
    flags = ["--data", str(prefs), "--grad", "adamw", "--lr", "1e-2", "--batch-size", "4", "--steps", "2",
             "--max-len", "16", "--max-prompt-len", "8", "--held-out", "0", "--out", str(out), "--no-progress"]
    model = ["--model", str(HF / "gpt2"), "--tokenizer", str(HF / "tokenizer")]
    assert dpo.main(model + flags + ["--export-hf", str(export)]) == 0
    capsys.readouterr()
    folder = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}

    for extra, message in [
        (["--model", "gpt2-tiny"], f"{out / 'checkpoints'} already holds checkpoints (step 2); pass --resume"),
        (["--model", "gpt2-tiny", "--resume"], f"--model gpt2-tiny (checkpoint: {HF / 'gpt2'})"),
        (model + ["--resume", "--lr", "1e-3", "--seed", "3"], "--lr 0.001 (checkpoint: 0.01), --seed 3 (checkpoint: 0)"),
        (model + ["--resume", "--steps", "3"], "--steps 3 (checkpoint: 2)"),  # cosine decays over --steps
        (model + ["--resume", "--mu-dtype", "bfloat16"], "--mu-dtype bfloat16 (checkpoint: unset)"),
    ]:
        code, lines = errors(capsys, flags + extra)
        assert code == 2 and len(lines) == 1, lines
        assert message in lines[0] and "corrupt" not in lines[0]
        assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == folder

    assert dpo.main(model + flags + ["--resume"]) == 0  # its own flags still resume it
    assert "done: step 2" in capsys.readouterr().out
    run_cfg, run_dir = dpo.resolve_model(str(out))
    assert run_dir == str(out) and dpo.load_params(run_cfg, run_dir, seed=0)
    fixture = Tokenizer.from_file(str(HF / "tokenizer" / "tokenizer.json"))
    for saved in (out / "tokenizer.json", export / "tokenizer.json"):
        assert Tokenizer.from_file(str(saved)).to_str() == fixture.to_str()


def test_steps_may_grow_on_resume_where_the_schedule_ignores_them(tmp_path, prefs, capsys):
    """A constant learning rate does not depend on --steps, so a finished run trains on."""
    flags = ["--model", "gpt2-tiny", "--data", str(prefs), "--grad", "adamw", "--lr", "1e-2", "--batch-size", "4",
             "--max-len", "16", "--max-prompt-len", "8", "--held-out", "0", "--log-every", "1",
             "--schedule", "constant", "--out", str(tmp_path), "--no-progress"]
    assert dpo.main(flags + ["--steps", "1"]) == 0
    assert dpo.main(flags + ["--steps", "2", "--resume"]) == 0
    assert "done: step 2" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_micro_batches_that_cannot_split_over_the_mesh_name_both_flags(tmp_path, prefs):
    """2 devices, 2 pairs in 2 micro-batches: each micro-batch has 1 pair for 2 devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = ["--model", "gpt2-tiny", "--data", str(prefs), "--out", str(tmp_path / "run"),
            "--batch-size", "2", "--grad-accum", "2"]
    proc = subprocess.run([sys.executable, "-m", "experiments.dpo", *argv], env=env, capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == ("python -m experiments.dpo: error: --batch-size 2 / --grad-accum 2 = 1 pairs per "
                        "micro-batch, not divisible by the 2 batch shards of the mesh (data=2 x fsdp=1)")


def test_resume_takes_the_same_files_by_other_paths(tmp_path, prefs, capsys, monkeypatch):
    """Path flags compare as the files they name: a run trained on a relative --data resumes
    from another directory through a symlink, with the built-in --model still a name there;
    another file is refused, shown as typed and as the checkpoint holds it (resolved)."""
    (tmp_path / "link.jsonl").symlink_to(prefs)
    (tmp_path / "other.jsonl").write_bytes(prefs.read_bytes())
    (tmp_path / "sub").mkdir()
    flags = ["--model", "gpt2-tiny", "--grad", "adamw", "--batch-size", "4", "--steps", "1", "--max-len", "16",
             "--held-out", "0", "--out", str(tmp_path / "run"), "--no-progress", "--data"]
    monkeypatch.chdir(tmp_path)
    assert dpo.main(flags + ["prefs.jsonl"]) == 0
    monkeypatch.chdir(tmp_path / "sub")
    assert dpo.main(flags + ["../link.jsonl", "--resume"]) == 0
    assert "done: step 1" in capsys.readouterr().out
    code, lines = errors(capsys, flags + ["../other.jsonl", "--resume"])
    assert code == 2 and len(lines) == 1, lines
    assert f"other settings: --data ../other.jsonl (checkpoint: {os.path.realpath(prefs)}); resume" in lines[0]


def test_micro_batches_and_training_share_one_mesh(tmp_path, prefs, monkeypatch):
    from lm.train import mesh as mesh_lib

    built, make_mesh = [], mesh_lib.make_mesh
    monkeypatch.setattr(mesh_lib, "make_mesh", lambda *args: built.append(make_mesh(*args)) or built[-1])
    argv = ["--model", "gpt2-tiny", "--data", str(prefs), "--grad-accum", "2", "--batch-size", "4", "--steps", "1",
            "--max-len", "16", "--held-out", "0", "--out", str(tmp_path / "run"), "--no-progress"]
    assert dpo.main(argv) == 0
    assert len(built) == 1


def test_every_held_out_pair_is_evaluated_as_a_pair_weighted_mean(tmp_path, prefs, capsys):
    """5 held-out pairs in batches of 2: the eval covers all 5 (the last batch holds one),
    and its metrics are those of the 5 pairs evaluated one by one and averaged. A resume
    logs each eval once."""
    out = tmp_path / "run"
    flags = ["--model", "gpt2-tiny", "--data", str(prefs), "--grad", "adamw", "--lr", "1e-2", "--batch-size", "2",
             "--max-len", "16", "--max-prompt-len", "8", "--held-out", "5", "--eval-every", "1",
             "--log-every", "1", "--schedule", "constant", "--out", str(out), "--no-progress"]
    assert dpo.main(flags + ["--steps", "1"]) == 0
    assert "eval: 5 held-out pairs in 3 batches" in capsys.readouterr().err.splitlines()
    assert dpo.main(flags + ["--steps", "2", "--resume"]) == 0
    assert "eval: 5 held-out pairs in 3 batches" in capsys.readouterr().err.splitlines()
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (1, "eval"), (2, "train"), (2, "eval")]

    from lm import data, objectives
    from lm.train.loop import eval_from_grad_fn

    args = dpo.parse_args(flags)
    heldout = dpo.load_data(args, dpo.ByteTokenizer(), dpo.ByteTokenizer.eos_id)[1]
    one_by_one = data.PairLoader(heldout.pairs, 1, buckets=heldout.buckets, pad_id=heldout.pad_id, shuffle=False)
    cfg = models.builtin_config("gpt2-tiny")
    eval_fn = jax.jit(eval_from_grad_fn(objectives.make_grad_fn(cfg, mode="plain", loss="dpo")))
    policy, reference = dpo.load_params(cfg, str(out), seed=0), dpo.load_params(cfg, None, seed=0)
    alone = [jax.device_get(eval_fn(policy, one_by_one.batch(i), reference)[1]) for i in range(len(one_by_one))]
    assert len(alone) == 5
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert rows[-1][key] == pytest.approx(np.mean([m[key] for m in alone]), rel=1e-5, abs=1e-6), key
    assert rows[-1]["loss"] != pytest.approx(np.log(2), abs=1e-4)  # it trained: pairs differ


def test_the_eval_line_says_which_held_out_pairs_are_evaluated(tmp_path, prefs):
    """Fewer held-out pairs than a batch are one smaller batch, not skipped; --eval-batches
    caps the batches and the line says how many pairs that leaves."""
    def coverage(held_out, eval_batches=None):
        args = dpo.parse_args(["--model", "gpt2-tiny", "--data", str(prefs), "--batch-size", "2", "--max-len", "16",
                               "--max-prompt-len", "8", "--held-out", held_out])
        heldout = dpo.load_data(args, dpo.ByteTokenizer(), dpo.ByteTokenizer.eos_id)[1]
        return dpo.eval_coverage(heldout, eval_batches)

    assert coverage("1") == (1, "eval: 1 held-out pair in 1 batch")
    assert coverage("5") == (3, "eval: 5 held-out pairs in 3 batches")
    assert coverage("5", 3) == coverage("5", 4) == coverage("5")
    assert coverage("5", 2) == (2, "eval: 4 of 5 held-out pairs in 2 batches (--eval-batches 2)")
    assert coverage("5", 1) == (1, "eval: 2 of 5 held-out pairs in 1 batch (--eval-batches 1)")


def test_a_run_folder_model_loads_its_recorded_step_in_the_asked_dtype(tmp_path, prefs, capsys):
    """--model A (a run folder) starts from A's latest step, recorded as --model-step: after
    A trains on, a resume of B names the step it started from, and --model-step N loads it.
    The weights come in --param-dtype, whatever A trained in."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--data", str(prefs), "--batch-size", "4", "--max-len", "16", "--held-out", "0",
              "--checkpoint-every", "1", "--schedule", "constant", "--no-progress"]
    assert dpo.main(["--model", "gpt2-tiny", "--out", str(a), "--steps", "1",
                     "--param-dtype", "bfloat16"] + common) == 0
    assert dpo.main(["--model", str(a), "--out", str(b), "--steps", "1"] + common) == 0
    assert json.loads((b / "config.json").read_text())["model_step"] == 1
    cfg, model_dir = dpo.resolve_model(str(a))
    params = dpo.load_params(dataclasses.replace(cfg, param_dtype="float32"), model_dir, 0, 1)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype("float32")}
    assert dpo.main(["--model", "gpt2-tiny", "--out", str(a), "--steps", "2", "--resume",
                     "--param-dtype", "bfloat16"] + common) == 0
    capsys.readouterr()
    code, lines = errors(capsys, ["--model", str(a), "--out", str(b), "--steps", "2",
                                  "--resume"] + common)
    assert code == 2 and "--model-step 2 (checkpoint: 1)" in lines[0], lines
    assert dpo.main(["--model", str(a), "--model-step", "1", "--out", str(b), "--steps", "2",
                     "--resume"] + common) == 0
    code, lines = errors(capsys, ["--model", str(a), "--model-step", "7", "--out",
                                  str(tmp_path / "c")] + common)
    assert code == 2 and "--model-step 7: " in lines[0] and "steps 1, 2" in lines[0], lines


def test_a_list_of_eos_ids_takes_the_first(tmp_path):
    """config.json may list several EOS ids (Llama 3): the run appends the first."""
    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((HF / "llama_gqa" / "config.json").read_text())
    config["eos_token_id"] = [2, 3]
    (model / "config.json").write_text(json.dumps(config))
    cfg, model_dir = dpo.resolve_model(str(model))
    args = argparse.Namespace(tokenizer=str(HF / "tokenizer"), eos_token=None, model=str(model))
    assert dpo.load_tokenizer(args, cfg, model_dir)[1] == 2
