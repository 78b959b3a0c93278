"""Figure 1(c) analogue: the squeezing effect in DPO under AdamW, and logits-SAM's fix.

    python -m experiments.squeeze                      # synthetic task, CPU, a few minutes
    python -m experiments.squeeze --sweep-rho          # + Table 3 analogue over ρ
    python -m experiments.squeeze --model DIR --data webgpt.jsonl   # the paper's setting

A GPT-2 is first fine-tuned on the chosen responses (SFT: NLL of the response tokens),
then trained with DPO from the SFT model (which is also the reference), once with plain
gradients (``mode="adamw"``) and once with logits-SAM (``mode="logits-sam"``, ρ > 0, the
practical sign convention of paper Table 4), same seed and batches. The per-step
``logps/chosen`` and ``logps/rejected`` of both runs go to ``fig1c_logps.png`` and
``metrics.json``: under AdamW the chosen log-prob falls (squeezing, paper §3.2); under
logits-SAM it falls less or rises.

By default the data are the long-suffix sentiment task (:mod:`lm.synthetic`, margin-
pitfalls §4.2) on a from-scratch ``gpt2-tiny`` with the task's word-level vocabulary.
The loop is :func:`lm.train.make_train_step` under ``jit`` with no checkpoints: every run
here is minutes long and re-runnable from its seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np

from experiments._cli import ArgumentParser, fail, finite_float, int_at_least, positive_float

SWEEP_RHOS = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
_positive_int = int_at_least(1)
_nonnegative_int = int_at_least(0)
STYLES = ("single", "short", "long")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m experiments.squeeze", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="gpt2-tiny",
                   help="built-in name (random init, trained from scratch) or HF checkpoint directory")
    g.add_argument("--data", help="preference file (JSONL/Parquet); default: the synthetic sentiment task")
    g.add_argument("--tokenizer", help="tokenizer.json for --data (default: the model's)")
    g.add_argument("--style", default="long", choices=STYLES, help="synthetic response style")
    g.add_argument("--pairs", type=_positive_int, default=512, help="synthetic training pairs")
    g.add_argument("--held-out", type=_positive_int, default=128, help="held-out pairs for reward accuracy")
    g.add_argument("--max-len", type=_positive_int, default=32, help="tokens per sequence")
    g = p.add_argument_group("training")
    g.add_argument("--sft-steps", type=_nonnegative_int, default=150)
    g.add_argument("--sft-lr", type=positive_float, default=1e-3)
    g.add_argument("--steps", type=_positive_int, default=150, help="DPO steps per run")
    g.add_argument("--lr", type=positive_float, default=1e-4, help="DPO learning rate (AdamW, constant)")
    g.add_argument("--beta", type=positive_float, default=0.1)
    g.add_argument("--rho", type=finite_float, default=0.05, help="logits-SAM radius (> 0: practical convention)")
    g.add_argument("--batch-size", type=_positive_int, default=16)
    g.add_argument("--seed", type=_nonnegative_int, default=0)
    g.add_argument("--sweep-rho", action="store_true", help=f"also run rho in {SWEEP_RHOS} (Table 3 analogue)")
    g.add_argument("--out", default="runs/squeeze")
    args = p.parse_args(argv)
    if args.rho <= 0:
        p.error(f"argument --rho: must be > 0 (rho = 0 is the AdamW run), got {args.rho}")
    if args.tokenizer and not args.data:
        p.error("argument --tokenizer: only used with --data")
    return args


# ------------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class Setup:
    cfg: Any
    params: Any
    train: Any  # lm.data.PairLoader
    heldout: Any  # lm.data.PairLoader


def _loaders(args, pairs, heldout_pairs, pad_id):
    from lm import data

    buckets = data.bucket_lengths(args.max_len, smallest=min(16, args.max_len))
    try:
        train = data.PairLoader(pairs, args.batch_size, buckets=buckets, pad_id=pad_id, seed=args.seed)
        held = data.PairLoader(heldout_pairs, min(args.batch_size, len(heldout_pairs)), buckets=buckets,
                               pad_id=pad_id, shuffle=False)
    except ValueError as err:
        fail(f"--data: {err} (--batch-size {args.batch_size}, --held-out {args.held_out})")
    return train, held


def synthetic_setup(args) -> Setup:
    """The sentiment-with-suffix task on a from-scratch model sized to its vocabulary."""
    import jax

    from lm import data, models, synthetic

    if os.path.isdir(args.model):
        fail(f"--model {args.model}: a checkpoint directory needs --data (its own tokenizer)")
    if args.model not in models.BUILTIN_NAMES:
        fail(f"--model {args.model!r}: not a directory nor a built-in model ({', '.join(models.BUILTIN_NAMES)})")
    tok = synthetic.sentiment_tokenizer()
    eos, pad = tok.token_to_id(synthetic.EOS), tok.token_to_id(synthetic.PAD)
    cfg = models.builtin_config(args.model, vocab_size=tok.get_vocab_size(),
                                max_position_embeddings=args.max_len, bos_token_id=eos,
                                eos_token_id=eos, pad_token_id=pad)
    tcfg = data.TokenizeConfig(args.max_len, args.max_len // 2, eos_id=eos, pad_id=pad)

    def tokenized(n, seed):
        records = [data.PreferenceRecord(r["prompt"], r["chosen"], r["rejected"], f"synthetic:{i}")
                   for i, r in enumerate(synthetic.sentiment_records(n, style=args.style, seed=seed))]
        return data.tokenize_records(records, tok, tcfg)[0]

    train, held = _loaders(args, tokenized(args.pairs, args.seed),
                           tokenized(args.held_out, args.seed + 10_000), pad)
    params = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(args.seed))
    return Setup(cfg, params, train, held)


def file_setup(args) -> Setup:
    """A real checkpoint (or built-in) and a preference file, via the DPO CLI's loaders."""
    from experiments import dpo
    from lm import data

    cfg, model_dir = dpo.resolve_model(args.model)
    ns = argparse.Namespace(tokenizer=args.tokenizer, eos_token=None, model=args.model)
    tok, eos = dpo.load_tokenizer(ns, cfg, model_dir)
    try:
        records, _ = data.read_records(args.data, on_error="skip")
        tcfg = data.TokenizeConfig(args.max_len, args.max_len // 2, eos_id=eos)
        pairs, _ = data.tokenize_records(records, tok, tcfg, on_error="skip")
        train_idx, held_idx = data.split_indices(len(pairs), args.held_out, args.seed)
    except (data.DataError, ValueError) as err:
        fail(f"--data {args.data}: {err}")
    train, held = _loaders(args, pairs.take(train_idx), pairs.take(held_idx), tcfg.pad)
    return Setup(cfg, dpo.load_params(cfg, model_dir, args.seed), train, held)


# ------------------------------------------------------------------------------ training


def sft_grad_fn(cfg):
    """``grad_fn`` of the mean response-token NLL of the chosen sequences ([:, 0])."""
    import jax
    import jax.numpy as jnp

    from lm import losses
    from lm.models import forward_hidden, output_head

    def loss_fn(params, batch):
        ids, attn, mask = (batch[k][:, 0] for k in ("input_ids", "attention_mask", "loss_mask"))
        logps, counts = losses.sequence_logps(forward_hidden(cfg, params, ids, attn),
                                              output_head(cfg, params), ids, mask)
        loss = -jnp.sum(logps) / jnp.maximum(jnp.sum(counts), 1.0)
        return loss, {"loss": loss, "logps/chosen": jnp.mean(logps)}

    def grad_fn(params, batch, ref_params=None):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        return loss, metrics, grads

    return grad_fn


def run_loop(grad_fn, params, loader, steps: int, lr: float, *, ref_params=None, seed: int = 0):
    """``steps`` jitted AdamW steps (constant lr, clip 1.0); returns params and per-step metrics."""
    import jax

    from lm import optim
    from lm.train import create_train_state, make_train_step

    tx = optim.make_optimizer(lr, total_steps=steps, schedule="constant")
    step = jax.jit(make_train_step(grad_fn, tx))
    state = create_train_state(params, tx, seed)
    history: dict[str, list[float]] = {}
    for k in range(steps):
        batch = {key: v for key, v in loader.batch(k).items() if key != "index"}
        state, metrics = step(state, batch, ref_params)
        for name, value in jax.device_get(metrics).items():
            history.setdefault(name, []).append(float(value))
    if int(state.halted_at) >= 0:
        fail(f"non-finite loss or gradient at step {int(state.halted_at)}; lower --lr or --rho")
    return state.params, history


def make_eval_fn(cfg, beta: float):
    """Jitted ``(params, batch, ref_params) -> (loss, metrics)`` of plain DPO: the metrics of
    the model itself, whatever mode trained it, compiled once for every run."""
    import jax

    from lm import objectives
    from lm.train.loop import eval_from_grad_fn

    grad_fn = objectives.make_grad_fn(cfg, loss="dpo", loss_kwargs={"beta": beta})
    return jax.jit(eval_from_grad_fn(grad_fn))


def evaluate(fn, params, ref_params, loader) -> dict[str, float]:
    """Mean metrics over every held-out batch."""
    import jax

    rows = []
    for k in range(len(loader)):
        batch = {key: v for key, v in loader.batch(k).items() if key != "index"}
        rows.append(jax.device_get(fn(params, batch, ref_params)[1]))
    return {name: float(np.mean([r[name] for r in rows])) for name in rows[0]}


def dpo_run(setup: Setup, sft_params, args, mode: str, rho: float, eval_fn) -> dict[str, Any]:
    from lm import objectives

    grad_fn = objectives.make_grad_fn(setup.cfg, loss="dpo", loss_kwargs={"beta": args.beta},
                                      mode=mode, rho=rho)
    t0 = time.time()
    params, history = run_loop(grad_fn, sft_params, setup.train, args.steps, args.lr,
                               ref_params=sft_params, seed=args.seed)
    heldout = evaluate(eval_fn, params, sft_params, setup.heldout)
    return {"mode": mode, "rho": rho, "seconds": round(time.time() - t0, 1),
            "history": history, "heldout": heldout}


def summary(run: dict[str, Any], sft_logps: dict[str, float]) -> dict[str, float]:
    """End-of-run numbers: train log-probs (mean of the last 10 steps) and held-out metrics."""
    h, e = run["history"], run["heldout"]
    tail = lambda name: float(np.mean(h[name][-10:]))
    return {
        "rho": run["rho"],
        "train_logps_chosen_start": h["logps/chosen"][0],
        "train_logps_chosen_end": tail("logps/chosen"),
        "train_logps_rejected_end": tail("logps/rejected"),
        "heldout_logps_chosen": e["logps/chosen"],
        "heldout_logps_chosen_change": e["logps/chosen"] - sft_logps["logps/chosen"],
        "heldout_logps_rejected_change": e["logps/rejected"] - sft_logps["logps/rejected"],
        "heldout_margin": e["rewards/margins"],
        "heldout_accuracy": e["rewards/accuracies"],
    }


def plot(runs: dict[str, dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, run), colour in zip(runs.items(), ("tab:red", "tab:blue")):
        for key, style in (("logps/chosen", "-"), ("logps/rejected", "--")):
            ax.plot(run["history"][key], style, color=colour, label=f"{name}: {key.split('/')[1]}")
    ax.set_xlabel("DPO step")
    ax.set_ylabel("sequence log-prob (train batch)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, ".write-test"), "w"):
            pass
        os.remove(os.path.join(args.out, ".write-test"))
    except OSError as err:
        fail(f"--out {args.out}: not writable ({err.strerror})")
    setup = file_setup(args) if args.data else synthetic_setup(args)
    t0 = time.time()
    sft_params, sft_history = run_loop(sft_grad_fn(setup.cfg), setup.params, setup.train,
                                       args.sft_steps, args.sft_lr, seed=args.seed)
    print(f"SFT: {args.sft_steps} steps, {time.time() - t0:.0f}s, final NLL/token "
          f"{sft_history['loss'][-1] if args.sft_steps else float('nan'):.3f}", file=sys.stderr)
    eval_fn = make_eval_fn(setup.cfg, args.beta)
    sft_eval = evaluate(eval_fn, sft_params, sft_params, setup.heldout)

    runs = {"adamw": dpo_run(setup, sft_params, args, "adamw", 0.0, eval_fn),
            "logits-sam": dpo_run(setup, sft_params, args, "logits-sam", args.rho, eval_fn)}
    result = {"config": vars(args), "sft": {"heldout": sft_eval, "history": sft_history},
              "runs": runs, "summary": {k: summary(r, sft_eval) for k, r in runs.items()}}
    for name, s in result["summary"].items():
        print(f"{name:>10}: chosen log-prob {s['train_logps_chosen_start']:8.3f} -> "
              f"{s['train_logps_chosen_end']:8.3f} (train); held-out Δchosen "
              f"{s['heldout_logps_chosen_change']:+.3f}, Δrejected {s['heldout_logps_rejected_change']:+.3f}, "
              f"margin {s['heldout_margin']:.3f}, accuracy {s['heldout_accuracy']:.3f}")

    if args.sweep_rho:
        sweep = []
        for rho in SWEEP_RHOS:
            run = runs["adamw"] if rho == 0 else dpo_run(setup, sft_params, args, "logits-sam", rho, eval_fn)
            sweep.append(summary(run, sft_eval))
        result["sweep_rho"] = sweep
        print(f"{'rho':>8} {'chosen end':>11} {'held Δchosen':>13} {'margin':>8} {'accuracy':>9}")
        for s in sweep:
            print(f"{s['rho']:>8.0e} {s['train_logps_chosen_end']:>11.3f} "
                  f"{s['heldout_logps_chosen_change']:>+13.3f} {s['heldout_margin']:>8.3f} "
                  f"{s['heldout_accuracy']:>9.3f}")

    plot(runs, os.path.join(args.out, "fig1c_logps.png"),
         f"DPO from SFT: AdamW vs logits-SAM (rho={args.rho:g})")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}/fig1c_logps.png and {args.out}/metrics.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
