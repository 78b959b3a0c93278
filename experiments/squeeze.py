"""Figure 1(c) analogue: the squeezing effect in DPO, with plain gradients, logits-SAM and SAM.

    python -m experiments.squeeze                      # synthetic task, CPU, ~2.5 minutes
    python -m experiments.squeeze --seeds 6            # the same, paired over six seeds
    python -m experiments.squeeze --sweep-rho          # + Table 3 analogue over ±ρ
    python -m experiments.squeeze --model DIR --data webgpt.jsonl --max-len 512   # the paper's setting

A GPT-2 is first fine-tuned on the chosen responses (SFT: NLL of the response tokens),
then trained with DPO from the SFT model (which is also the reference) from the same
seed and batches: plain gradients (``mode="plain"``), logits-SAM at ``--rho`` (ρ > 0 is
the practical convention of paper Table 4) and at −ρ (``--no-opposite`` skips it), and
full SAM at ``--rho`` (``--no-sam`` skips it), under AdamW (default) or plain SGD (the
paper's GD). The per-step ``logps/chosen`` and ``logps/rejected`` go to
``fig1c_logps.png`` (left) and ``metrics.json``.

A run that learns the preference more slowly also moves its log-probs later, so the end
of the run alone would credit slow learning as mitigation. The runs are therefore also
compared at an equal train reward margin (half the baseline's final one): the chosen
change there is ``matched_margin_chosen_change`` and the plot's middle panel. With
``--seeds N`` every method is paired with its own seed's baseline and reported as
mean ± standard error over seeds.

Every ``--probe-every`` steps the baseline run is probed with
:func:`lm.diagnostics.sam_step_effects`: the first-order change of the chosen log-prob
that logits-SAM at ρ > 0 would add to a plain gradient step from there (not an AdamW
step: Adam rescales each coordinate, so the probe explains mechanisms, not the runs' signs), split into Theorem 3.2's curvature
term (and its per-token self part, Cor 3.6's mechanism) and the DPO pair-weight term
σ(−βΔ) evaluated at the perturbed point, which the theory's fixed ±η has no analogue of
(the plot's right panel).

What the defaults show (gpt2-tiny with GPT-2's tied head, long style, AdamW lr 1e-4, 100
steps, ρ = ±0.03; seeds 0–7, mean ± s.e. of the difference from the same seed's
baseline): the baseline squeezes (held-out chosen log-prob −1.8 to −6.0 nats while the
held-out margin grows). Logits-SAM at ρ = +0.03, the paper's practical sign, MITIGATES it:
+0.66 ± 0.17 nats at equal margin (higher on all 7 seeds that reached it), +0.50 ± 0.23
held-out at the end (6/8), at a final margin 0.86–1.00x the baseline's on six seeds (0.62x
and 0.29x on two). At ρ = −0.03 it worsens it (−0.34 ± 0.13 at equal margin, 1/8 higher).
ρ = 0.1 mostly slows learning (margin 0.07–0.2x on two of four seeds); ρ = 0.01 is within
noise (+0.03 ± 0.07). The probe agrees in sign: a head-only step with ρ > 0 raises the
chosen log-prob at 7–10 of 10 probed steps. But it does so through the pair-weight term:
Theorem 3.2's curvature term is 1e-3 to 1e-5 of it, because chosen and rejected share
nearly the same features on their common tokens and their opposite-signed corrections
cancel (each token's self part alone is positive, as Cor 3.6 says, and is cancelled by
its twin's).

With an untied head (``--head untied``, a matrix used only as the output layer) the sign
reverses, on every style: ρ = +0.1 worsens the squeeze (long style, seeds 0–5: −1.12 ± 0.35
nats held-out, −0.25 ± 0.08 at equal margin) and ρ = −0.1 mitigates it (+0.80 ± 0.31, +0.39 ±
0.08, higher on all six seeds), both at the same final margin. There the probe (seed 0)
shows where the one-step rule stops holding: while the margin is below ~0.4 a head-only
step with ρ > 0 raises the chosen log-prob, as Cor 3.6 predicts; from margin ~0.8 on it
lowers it, because DPO's pair-weight term turns negative and outweighs the curvature term.
Which sign helps therefore depends on the architecture, not only on the learning rate's
sign; the README has the full table, and the paper's own setting (GPT-2 on
webgpt_comparisons) runs with ``--model DIR --data FILE``.

By default the data are the long-suffix sentiment task (:mod:`lm.synthetic`, margin-
pitfalls §4.2) on a from-scratch ``gpt2-tiny`` with the task's word-level vocabulary and,
as in GPT-2, the output layer tied to the input embedding (logits-SAM perturbs only its
use as the output layer). The loop is :func:`lm.train.make_train_step` under
``jit`` with no checkpoints: every run here is minutes long and re-runnable from its seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
OPTIMIZERS = ("adamw", "sgd")
HEADS = ("untied", "tied")
MARGIN_WINDOW = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m experiments.squeeze", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="gpt2-tiny",
                   help="built-in name (random init, trained from scratch) or HF checkpoint directory")
    g.add_argument("--data", help="preference file (JSONL/Parquet); default: the synthetic sentiment task")
    g.add_argument("--tokenizer", help="tokenizer.json for --data (default: the model's)")
    g.add_argument("--style", default="long", choices=STYLES, help="synthetic response style")
    g.add_argument("--head", choices=HEADS,
                   help="built-in model's output layer: GPT-2's tie to the embedding (default, the paper's "
                        "model) or its own matrix (logits-SAM then perturbs a matrix used nowhere else)")
    g.add_argument("--pairs", type=_positive_int, default=512, help="synthetic training pairs")
    g.add_argument("--held-out", type=_positive_int, default=128,
                   help="held-out pairs for reward accuracy (with --data: whole questions, at least this many pairs)")
    g.add_argument("--max-len", type=_positive_int, default=32,
                   help="tokens per sequence (with a checkpoint: at most its context)")
    g.add_argument("--max-prompt-len", type=_positive_int,
                   help="prompt tokens (default: half of --max-len); longer prompts are dropped")
    g = p.add_argument_group("training")
    g.add_argument("--sft-steps", type=_nonnegative_int, default=150)
    g.add_argument("--sft-lr", type=positive_float, default=1e-3)
    g.add_argument("--steps", type=_positive_int, default=100, help="DPO steps per run")
    g.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="DPO optimizer: AdamW (clip 1.0) or plain SGD (no clipping: the paper's GD)")
    g.add_argument("--lr", type=positive_float, default=1e-4, help="DPO learning rate (constant)")
    g.add_argument("--beta", type=positive_float, default=0.1)
    g.add_argument("--rho", type=finite_float, default=0.03,
                   help="signed logits-SAM radius (> 0: the paper's practical rule, Table 4)")
    g.add_argument("--opposite", action=argparse.BooleanOptionalAction, default=True,
                   help="also run logits-SAM at -rho (the theory's sign for the y- term; see the README)")
    g.add_argument("--sam", action=argparse.BooleanOptionalAction, default=True,
                   help="also run full SAM (two passes) at the same --rho (the paper's Figure 1c compares GD and SAM)")
    g.add_argument("--batch-size", type=_positive_int, default=16)
    g.add_argument("--chunk-size", type=_positive_int,
                   help="target positions per chunk of the vocabulary logits in training and "
                        "evaluation (default: all at once)")
    g.add_argument("--remat", action="store_true",
                   help="recompute each transformer block in the backward pass (less memory, ~1/3 more compute)")
    g.add_argument("--seed", type=_nonnegative_int, default=0, help="first seed (data, init, batch order)")
    g.add_argument("--seeds", type=_positive_int, default=1,
                   help="run seeds --seed .. --seed+N-1 and report each method's mean ± s.e. vs baseline")
    g.add_argument("--sweep-rho", action="store_true", help=f"also run rho in {SWEEP_RHOS} (Table 3 analogue)")
    g.add_argument("--probe-every", type=_nonnegative_int, default=10,
                   help="every N baseline steps, the first-order effect of logits-SAM on the chosen "
                        "log-prob after one step (lm.diagnostics.sam_step_effects); 0: off")
    g.add_argument("--out", default="runs/squeeze")
    args = p.parse_args(argv)
    if args.rho == 0:
        p.error("argument --rho: must be non-zero (rho = 0 is the baseline run)")
    if args.tokenizer and not args.data:
        p.error("argument --tokenizer: only used with --data")
    if args.head and os.path.isdir(args.model):
        p.error("argument --head: only for a built-in --model (a checkpoint keeps its own head)")
    args.head = args.head or "tied"
    if args.max_prompt_len is None:
        args.max_prompt_len = args.max_len // 2
    if not 0 < args.max_prompt_len < args.max_len:
        p.error(f"argument --max-prompt-len: must be below --max-len {args.max_len}, got {args.max_prompt_len}")
    return args


# ------------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class Setup:
    cfg: Any
    params: Any
    train: Any  # lm.data.PairLoader
    heldout: Any  # lm.data.PairLoader
    data: dict[str, Any]  # what the pairs came from, for metrics.json


def _loaders(args, pairs, heldout_pairs, pad_id, culprit: str):
    """The shuffled train loader and the held-out loader (every pair, in order); a train
    set too small for one batch is an error line naming ``culprit`` (the flag it came from)."""
    from lm import data

    buckets = data.bucket_lengths(args.max_len, smallest=min(16, args.max_len))
    try:
        train = data.PairLoader(pairs, args.batch_size, buckets=buckets, pad_id=pad_id, seed=args.seed)
        # Every held-out pair is evaluated: the last batch may be smaller (one more compilation).
        held = data.PairLoader(heldout_pairs, args.batch_size, buckets=buckets, pad_id=pad_id,
                               shuffle=False, drop_last=False)
    except ValueError as err:
        fail(f"{culprit}: {err} (--batch-size {args.batch_size})")
    return train, held


def unseen_records(n: int, style: str, seed: int, seen: set[str], draws: int = 16) -> list[dict]:
    """``n`` synthetic records whose prompts are not in ``seen`` (the training prompts), so
    that held-out prompts are unseen in training, as with ``--data``.

    They are ``lm.synthetic.sentiment_records(n, seed)`` less those prompts, topped up in
    order from further draws of ``n``, the k-th seeded by ``SeedSequence([seed, k])``: a
    pure function of the arguments. Fewer than ``n`` only if ``draws`` draws run out.
    """
    from lm import synthetic

    kept = []
    for k in range(draws):
        draw_seed = seed if k == 0 else int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        kept += [r for r in synthetic.sentiment_records(n, style=style, seed=draw_seed) if r["prompt"] not in seen]
        if len(kept) >= n:
            return kept[:n]
    return kept


def synthetic_setup(args) -> Setup:
    """The sentiment-with-suffix task on a from-scratch model sized to its vocabulary;
    held-out prompts are unseen in training (:func:`unseen_records`)."""
    import jax

    from lm import data, models, synthetic
    from lm.tokenizer import prompt_bos

    if os.path.isdir(args.model):
        fail(f"--model {args.model}: a checkpoint directory needs --data (its own tokenizer)")
    if args.model not in models.BUILTIN_NAMES:
        fail(f"--model {args.model!r}: not a directory nor a built-in model ({', '.join(models.BUILTIN_NAMES)})")
    tok = synthetic.sentiment_tokenizer()
    eos, pad = tok.token_to_id(synthetic.EOS), tok.token_to_id(synthetic.PAD)
    cfg = models.builtin_config(args.model, vocab_size=tok.get_vocab_size(),
                                tie_word_embeddings=args.head == "tied",
                                max_position_embeddings=args.max_len, bos_token_id=eos,
                                eos_token_id=eos, pad_token_id=pad)
    tcfg = data.TokenizeConfig(args.max_len, args.max_prompt_len, eos_id=eos, pad_id=pad,
                               bos_id=prompt_bos(tok))
    report = data.Report()

    def tokenized(rows, part):
        records = [data.PreferenceRecord(r["prompt"], r["chosen"], r["rejected"], f"synthetic {part}:{i}")
                   for i, r in enumerate(rows)]
        report.kept += len(records)
        # Every synthetic record is well formed, so one the length policy drops means the
        # lengths are too small for the task: an error, not a silently smaller data set.
        try:
            return data.tokenize_records(records, tok, tcfg, report=report)[0]
        except data.DataError as err:
            fail(f"--max-len {args.max_len}, --max-prompt-len {args.max_prompt_len}: too small for the "
                 f"synthetic task ({err})")

    train_rows = synthetic.sentiment_records(args.pairs, style=args.style, seed=args.seed)
    held_rows = unseen_records(args.held_out, args.style, args.seed + 10_000, {r["prompt"] for r in train_rows})
    if len(held_rows) < args.held_out:
        fail(f"--held-out {args.held_out}: only {len(held_rows)} synthetic prompts found that are not "
             f"among the --pairs {args.pairs} training prompts")
    train, held = _loaders(args, tokenized(train_rows, "train"), tokenized(held_rows, "held-out"), pad,
                           f"--pairs {args.pairs}")
    if report.truncated:
        print(f"synthetic {args.style} task: {report.summary()} (--max-len {args.max_len})", file=sys.stderr)
    params = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(args.seed))
    info = {"file": None, "style": args.style, "records": report.summary(), "tokenizer": "synthetic word-level",
            "eos_id": eos, "train_pairs": len(train.pairs), "heldout_pairs": len(held.pairs)}
    return Setup(cfg, params, train, held, info)


def file_setup(args) -> Setup:
    """A real checkpoint (or built-in) and a preference file, via the DPO CLI's loaders."""
    from experiments import dpo
    from lm import data
    from lm.tokenizer import prompt_bos

    cfg, model_dir = dpo.resolve_model(args.model)
    if model_dir is None:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=args.head == "tied")
    if args.max_len > cfg.max_position_embeddings:
        fail(f"--max-len {args.max_len}: over the model's {cfg.max_position_embeddings} positions")
    ns = argparse.Namespace(tokenizer=args.tokenizer, eos_token=None, model=args.model)
    tok, eos = dpo.load_tokenizer(ns, cfg, model_dir)
    try:
        records, report = data.read_records(args.data, on_error="skip")
        tcfg = data.TokenizeConfig(args.max_len, args.max_prompt_len, eos_id=eos,
                                   bos_id=prompt_bos(tok))
        pairs, report = data.tokenize_records(records, tok, tcfg, on_error="skip", report=report)
    except (data.DataError, ValueError) as err:
        fail(f"--data: {err}")  # err names the file and line
    # Records are skipped, not fatal, so that webgpt's ties and the odd over-long prompt
    # don't stop a run; the counts say when a setting (e.g. --max-len) drops most of them.
    if len(pairs) <= args.held_out:
        fail(f"--data {args.data}: {len(pairs)} usable pairs, need more than --held-out {args.held_out} "
             f"({report.summary()}; --max-len {args.max_len}, --max-prompt-len {args.max_prompt_len})")
    if report.num_dropped or report.truncated:
        print(f"--data {args.data}: {report.summary()}", file=sys.stderr)
    try:
        train_idx, held_idx = data.split_indices(len(pairs), args.held_out, args.seed,
                                                   groups=pairs.prompt_keys)
    except ValueError as err:  # too few distinct prompts to hold --held-out pairs out
        fail(f"--held-out {args.held_out}: {err} (--data {args.data})")
    train, held = _loaders(args, pairs.take(train_idx), pairs.take(held_idx), tcfg.pad,
                           f"--data {args.data} less --held-out {args.held_out}")
    info = {"file": args.data, "records": report.summary(), "eos_id": eos,
            "tokenizer": "bytes" if isinstance(tok, dpo.ByteTokenizer)
            else args.tokenizer or os.path.join(model_dir, "tokenizer.json"),
            "train_pairs": len(train.pairs), "heldout_pairs": len(held.pairs)}
    return Setup(cfg, dpo.load_params(cfg, model_dir, args.seed), train, held, info)


# ------------------------------------------------------------------------------ training


def sft_grad_fn(cfg, chunk_size: int | None = None, remat: bool = False):
    """``grad_fn`` of the mean response-token NLL of the chosen sequences ([:, 0])."""
    import jax
    import jax.numpy as jnp

    from lm import losses, objectives
    from lm.models import output_head

    def loss_fn(params, batch):
        ids, attn, mask = (batch[k][:, 0] for k in ("input_ids", "attention_mask", "loss_mask"))
        hidden = objectives.batch_hidden(cfg, params, ids, attn, remat=remat)
        logps, counts = losses.sequence_logps(hidden, output_head(cfg, params), ids, mask,
                                              chunk_size=chunk_size)
        loss = -jnp.sum(logps) / jnp.maximum(jnp.sum(counts), 1.0)
        return loss, {"loss": loss, "logps/chosen": jnp.mean(logps)}

    def grad_fn(params, batch, ref_params=None):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        return loss, metrics, grads

    return grad_fn


def make_tx(name: str, lr: float, steps: int):
    """Constant-lr AdamW (clip 1.0, :func:`lm.optim.make_optimizer`) or plain SGD.

    SGD is the paper's GD (Figure 1c compares GD and SAM): the update is the (logits-)SAM
    gradient itself, so the correction ρ̃ H_z g of Theorem 3.2 reaches the weights as is.
    AdamW's per-coordinate normalisation rescales it.
    """
    import optax

    from lm import optim

    if name == "sgd":
        return optax.sgd(lr)
    # A constant schedule ignores its length, which lm.optim still needs >= 1 (--sft-steps 0).
    return optim.make_optimizer(lr, total_steps=max(steps, 1), schedule="constant")


@functools.lru_cache(maxsize=None)
def train_step(cfg, mode: str, rho: float, beta: float | None, optimizer: str, lr: float, steps: int,
               chunk_size: int | None = None, remat: bool = False):
    """The jitted train step and its optimizer for one setting (``mode="sft"``: the SFT
    loss, :func:`sft_grad_fn`; else a DPO gradient mode of :func:`lm.objectives.make_grad_fn`).

    Cached, so every seed (and a sweep's repeated radius) reuses one compilation.
    """
    import jax

    from lm import objectives
    from lm.train import make_train_step

    grad_fn = (sft_grad_fn(cfg, chunk_size, remat) if mode == "sft" else
               objectives.make_grad_fn(cfg, loss="dpo", loss_kwargs={"beta": beta}, mode=mode, rho=rho,
                                       chunk_size=chunk_size, remat=remat))
    tx = make_tx(optimizer, lr, steps)
    return jax.jit(make_train_step(grad_fn, tx)), tx


def run_loop(step, tx, params, loader, steps: int, *, ref_params=None, seed: int = 0,
             probe=None, probe_every: int = 0):
    """``steps`` calls of the jitted ``step`` (optimizer ``tx``); returns params and
    per-step metrics, fetched from the device once, after the last step.

    With ``probe`` (``probe(params, batch, ref_params) -> dict of scalars``) and
    ``probe_every`` > 0, the probe runs on the model and batch of steps 0, k, 2k, …
    before that step's update; its values go to ``history["probe"]``, one dict each.
    """
    import jax

    from lm.train import create_train_state

    state = create_train_state(params, tx, seed)
    metrics, probed = [], []
    for k in range(steps):
        batch = {key: v for key, v in loader.batch(k).items() if key != "index"}
        if probe is not None and probe_every and k % probe_every == 0:
            probed.append((k, probe(state.params, batch, ref_params)))
        state, step_metrics = step(state, batch, ref_params)
        metrics.append(step_metrics)
    metrics, probe_values, halted_at = jax.device_get((metrics, [v for _, v in probed], state.halted_at))
    if int(halted_at) >= 0:
        fail(f"non-finite loss or gradient at step {int(halted_at)}; lower --lr or --rho")
    history: dict[str, list] = {name: [float(m[name]) for m in metrics] for name in (metrics or [{}])[0]}
    if probed:
        history["probe"] = [{"step": k, **{n: float(v) for n, v in values.items()}}
                            for (k, _), values in zip(probed, probe_values)]
    return state.params, history


@functools.lru_cache(maxsize=None)
def make_eval_fn(cfg, beta: float, chunk_size: int | None = None):
    """Jitted ``(params, batch, ref_params) -> (loss, metrics)`` of plain DPO: the metrics of
    the model itself, whatever mode trained it, compiled once for every run."""
    import jax

    from lm import objectives
    from lm.train.loop import eval_from_grad_fn

    grad_fn = objectives.make_grad_fn(cfg, loss="dpo", loss_kwargs={"beta": beta}, chunk_size=chunk_size)
    return jax.jit(eval_from_grad_fn(grad_fn))


def evaluate(fn, params, ref_params, loader) -> dict[str, float]:
    """Metrics over every pair of ``loader``: each batch's (per-pair mean) metrics weighted
    by its number of pairs, so a smaller last batch counts for what it holds
    (:func:`lm.train.loop.eval_means`)."""
    from lm.train.loop import eval_means

    batches = ({key: v for key, v in loader.batch(k).items() if key != "index"} for k in range(len(loader)))
    return eval_means(lambda batch: fn(params, batch, ref_params)[1], batches)


@functools.lru_cache(maxsize=None)
def make_probe(cfg, beta: float):
    """Jitted :func:`lm.diagnostics.sam_step_effects` of plain DPO (the one-step probe)."""
    import jax

    from lm import diagnostics

    return jax.jit(lambda params, batch, ref_params: diagnostics.sam_step_effects(
        cfg, params, batch, ref_params=ref_params, loss_kwargs={"beta": beta}))


def dpo_run(setup: Setup, sft_params, args, mode: str, rho: float, eval_fn, probe=None) -> dict[str, Any]:
    step, tx = train_step(setup.cfg, mode, rho, args.beta, args.optimizer, args.lr, args.steps,
                          args.chunk_size, args.remat)
    t0 = time.time()
    params, history = run_loop(step, tx, sft_params, setup.train, args.steps, ref_params=sft_params,
                               seed=args.seed, probe=probe, probe_every=args.probe_every)
    heldout = evaluate(eval_fn, params, sft_params, setup.heldout)
    return {"mode": mode, "rho": rho, "seconds": round(time.time() - t0, 1),
            "history": history, "heldout": heldout}


def smoothed(values: list[float], window: int = MARGIN_WINDOW) -> np.ndarray:
    """Trailing mean over ``window`` steps (the train-batch metrics are one batch each)."""
    x = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(x)])
    end = np.arange(1, len(x) + 1)
    start = np.maximum(end - window, 0)
    return (c[end] - c[start]) / (end - start)


def chosen_change_at_margin(run: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """``(step, Δ chosen log-prob)`` at the first step whose smoothed train margin reaches
    ``target``; ``(None, None)`` if it never does, or if ``target <= 0``.

    A run that learns the preference more slowly also moves the chosen log-prob later, so
    the end-of-run numbers alone would credit slow learning as mitigation. Compared at an
    equal margin, they cannot. A target <= 0 (a baseline whose final margin is not
    positive) gives no comparison: every run starts at margin 0 and would "reach" it at
    step 0 with no change.
    """
    if target <= 0:
        return None, None
    h = run["history"]
    margin, chosen = smoothed(h["rewards/margins"]), smoothed(h["logps/chosen"])
    hits = np.flatnonzero(margin >= target)
    if not hits.size:
        return None, None
    return int(hits[0]), float(chosen[hits[0]] - chosen[0])


def summary(run: dict[str, Any], sft_logps: dict[str, float], target_margin: float) -> dict[str, Any]:
    """End-of-run numbers (train: mean of the last 10 steps; held-out: plain-DPO metrics of
    the final model vs the SFT model) and the chosen change at ``target_margin``."""
    h, e = run["history"], run["heldout"]
    tail = lambda name: float(np.mean(h[name][-10:]))
    step, change = chosen_change_at_margin(run, target_margin)
    return {
        "mode": run["mode"],
        "rho": run["rho"],
        "train_logps_chosen_start": h["logps/chosen"][0],
        "train_logps_chosen_end": tail("logps/chosen"),
        "train_logps_rejected_start": h["logps/rejected"][0],
        "train_logps_rejected_end": tail("logps/rejected"),
        "train_margin_end": tail("rewards/margins"),
        "matched_margin": target_margin,
        "matched_margin_step": step,
        "matched_margin_chosen_change": change,
        "heldout_logps_chosen": e["logps/chosen"],
        "heldout_logps_chosen_change": e["logps/chosen"] - sft_logps["logps/chosen"],
        "heldout_logps_rejected_change": e["logps/rejected"] - sft_logps["logps/rejected"],
        "heldout_margin": e["rewards/margins"],
        "heldout_accuracy": e["rewards/accuracies"],
    }


def verdict(name: str, s: dict[str, Any], base: dict[str, Any], tol: float = 0.1) -> str:
    """One plain sentence: does ``name`` lose less chosen log-prob than the baseline at the
    matched margin (the like-for-like comparison)? End-of-run numbers and the final margin
    follow, since a run that learns more slowly also squeezes later. One seed: a claim
    needs several (``--seeds``)."""
    end = s["heldout_logps_chosen_change"] - base["heldout_logps_chosen_change"]
    margin_ratio = s["heldout_margin"] / base["heldout_margin"] if base["heldout_margin"] > 0 else float("nan")
    tail = (f"held-out Δchosen {end:+.2f} nats vs baseline at a final margin {margin_ratio:.2f}x the "
            f"baseline's (this seed only)")
    at, base_at = s["matched_margin_chosen_change"], base["matched_margin_chosen_change"]
    if base_at is None:
        why = ("the baseline's final train margin is not positive" if s["matched_margin"] <= 0 else
               f"the baseline's smoothed margin never reached {s['matched_margin']:.3f}")
        return f"{name}: {why}, so no like-for-like comparison; {tail}"
    if at is None:
        return (f"{name}: never reached the matched margin {s['matched_margin']:.3f} (it learned the "
                f"preference more slowly), so no like-for-like comparison; {tail}")
    rel = at - base_at
    word = ("MITIGATES the squeeze" if rel > tol else "WORSENS the squeeze" if rel < -tol
            else "does not change the squeeze")
    return f"{name} {word} at equal margin ({rel:+.2f} nats of chosen log-prob vs baseline); {tail}"


PROBE_TERMS = {
    "sam/chosen": "head-only step",
    "params/sam/chosen": "step of every parameter",
    "sam/chosen/curvature": "Thm 3.2's curvature term alone",
    "sam/chosen/self": "its per-token self part (Cor 3.6)",
}


def probe_summary(records: list[dict[str, float]]) -> dict[str, Any]:
    """Along the probed baseline steps: in how many does ρ > 0 raise the chosen log-prob
    at first order (per term of :data:`PROBE_TERMS`), and how large is the pair-weight
    term against the curvature term (median of |weight| / |curvature|)."""
    ratios = [abs(r["sam/chosen/weight"]) / abs(r["sam/chosen/curvature"])
              for r in records if r["sam/chosen/curvature"] != 0]
    return {"probed_steps": len(records),
            "raises_chosen": {term: sum(r[term] > 0 for r in records) for term in PROBE_TERMS},
            "median_weight_over_curvature": float(np.median(ratios)) if ratios else None}


def probe_line(s: dict[str, Any]) -> str:
    n = s["probed_steps"]
    counts = ", ".join(f"{what} {s['raises_chosen'][term]}/{n}" for term, what in PROBE_TERMS.items())
    ratio = s["median_weight_over_curvature"]
    return (f"one-step probe of the baseline run ({n} steps): rho > 0 raises the chosen log-prob at "
            f"first order in: {counts}; the pair-weight term is a median "
            + (f"{ratio:.1f}x" if ratio is not None else "n/a") + " the curvature term")


COLOURS = {"baseline": "tab:red", "logits-sam": "tab:blue", "logits-sam-opposite": "tab:purple",
           "sam": "tab:green"}


def figure(runs: dict[str, dict[str, Any]], title: str = ""):
    """The Figure 1(c) analogue as a matplotlib figure (also drawn by the notebook).

    Left: chosen (solid) and rejected (dashed) train log-probs per step. Middle: the
    chosen change against the smoothed train margin, the like-for-like view. Right (when
    the baseline was probed): the one-step first-order effect of ρ > 0 on the chosen
    log-prob, per term of :func:`lm.diagnostics.sam_step_effects`.
    """
    import matplotlib.pyplot as plt

    records = runs["baseline"]["history"].get("probe", [])
    fig, axes = plt.subplots(1, 3 if records else 2, figsize=(16.5 if records else 11, 4))
    ax, bx = axes[:2]
    for name, run in runs.items():
        h, colour = run["history"], COLOURS.get(name, "tab:gray")
        label = f"{name} (rho={run['rho']:g})"
        ax.plot(h["logps/chosen"], "-", color=colour, label=f"{label}: chosen")
        ax.plot(h["logps/rejected"], "--", color=colour, label=f"{label}: rejected")
        chosen = smoothed(h["logps/chosen"])
        bx.plot(smoothed(h["rewards/margins"]), chosen - chosen[0], color=colour, label=label)
    ax.set_xlabel("DPO step")
    ax.set_ylabel("sequence log-prob (train batch)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    bx.set_xlabel(f"train reward margin ({MARGIN_WINDOW}-step mean)")
    bx.set_ylabel("Δ chosen log-prob since step 0")
    bx.set_title("chosen change at equal margin", fontsize=9)
    bx.legend(fontsize=7)
    if records:
        cx = axes[2]
        steps = [r["step"] for r in records]
        for term, what in {**PROBE_TERMS, "sam/chosen/weight": "pair-weight term"}.items():
            cx.plot(steps, [r[term] for r in records], "o-", ms=3, label=what)
        cx.axhline(0.0, color="k", lw=0.5)
        cx.set_yscale("symlog", linthresh=1e-3)
        cx.set_xlabel("baseline DPO step")
        cx.set_ylabel("d(Δ chosen log-prob)/d(ηρ) after one step")
        cx.set_title("> 0: rho > 0 raises the chosen log-prob (first order)", fontsize=9)
        cx.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot(runs: dict[str, dict[str, Any]], path: str, title: str) -> None:
    """:func:`figure`, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(runs, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# A held-out DPO margin (nats) below which the baseline has not learned the preference.
MIN_LEARNED_MARGIN = 0.01


def report(result: dict[str, Any]) -> list[str]:
    """The printed summary: one line of numbers per run, then one plain verdict each."""
    lines = []
    for name, s in result["summary"].items():
        at = s["matched_margin_chosen_change"]
        lines.append(
            f"{name:>10} (rho={s['rho']:g}): chosen {s['train_logps_chosen_start']:7.2f} -> "
            f"{s['train_logps_chosen_end']:7.2f}, rejected {s['train_logps_rejected_start']:7.2f} -> "
            f"{s['train_logps_rejected_end']:7.2f} (train); Δchosen at margin {s['matched_margin']:.3f}: "
            + (f"{at:+.2f} (step {s['matched_margin_step']})" if at is not None else
               "never reached" if s["matched_margin"] > 0 else "none (the baseline's train margin is not positive)")
            + f"; held-out Δchosen {s['heldout_logps_chosen_change']:+.2f}, "
            f"Δrejected {s['heldout_logps_rejected_change']:+.2f}, margin {s['heldout_margin']:.3f}, "
            f"accuracy {s['heldout_accuracy']:.3f}")
    base = result["summary"]["baseline"]
    squeezed = base["heldout_logps_chosen_change"] < -0.1
    if base["heldout_margin"] < MIN_LEARNED_MARGIN:
        lines.append(f"baseline: did not learn the preference (held-out margin "
                     f"{base['heldout_margin']:.3f}, accuracy {base['heldout_accuracy']:.3f}): "
                     f"nothing to squeeze or mitigate; raise --lr or --steps")
    else:
        lines.append(f"baseline: the chosen log-prob {'FALLS' if squeezed else 'does not fall'} "
                     f"({base['heldout_logps_chosen_change']:+.2f} nats held-out) while the margin "
                     f"grows to {base['heldout_margin']:.3f}" + (" (squeezing)" if squeezed else ""))
    lines += [verdict(name, s, base) for name, s in result["summary"].items() if name != "baseline"]
    if "probe" in result:
        lines.append(probe_line(result["probe"]))
    return lines


def run_seed(args) -> dict[str, Any]:
    """SFT, then every DPO run of one seed (``args.seed``); returns the result dict."""
    setup = file_setup(args) if args.data else synthetic_setup(args)
    t0 = time.time()
    step, tx = train_step(setup.cfg, "sft", 0.0, None, "adamw", args.sft_lr, args.sft_steps,
                          args.chunk_size, args.remat)
    sft_params, sft_history = run_loop(step, tx, setup.params, setup.train, args.sft_steps, seed=args.seed)
    print(f"seed {args.seed}: SFT {args.sft_steps} steps, {time.time() - t0:.0f}s, final NLL/token "
          f"{sft_history['loss'][-1] if args.sft_steps else float('nan'):.3f}", file=sys.stderr)
    eval_fn = make_eval_fn(setup.cfg, args.beta, args.chunk_size)
    sft_eval = evaluate(eval_fn, sft_params, sft_params, setup.heldout)

    probe = make_probe(setup.cfg, args.beta) if args.probe_every else None
    runs = {"baseline": dpo_run(setup, sft_params, args, "plain", 0.0, eval_fn, probe),
            "logits-sam": dpo_run(setup, sft_params, args, "logits-sam", args.rho, eval_fn)}
    if args.opposite:
        runs["logits-sam-opposite"] = dpo_run(setup, sft_params, args, "logits-sam", -args.rho, eval_fn)
    if args.sam:
        runs["sam"] = dpo_run(setup, sft_params, args, "sam", args.rho, eval_fn)
    # Half the baseline's final train margin: reached early enough by a run that learns a
    # little more slowly, late enough that the baseline has squeezed.
    target = 0.5 * float(np.mean(runs["baseline"]["history"]["rewards/margins"][-10:]))
    result = {"seed": args.seed, "data": setup.data, "sft": {"heldout": sft_eval, "history": sft_history},
              "runs": runs, "summary": {k: summary(r, sft_eval, target) for k, r in runs.items()}}
    if probe is not None:
        result["probe"] = probe_summary(runs["baseline"]["history"]["probe"])
    result["verdict"] = report(result)

    if args.sweep_rho:
        done = {0.0: runs["baseline"], args.rho: runs["logits-sam"], -args.rho: runs.get("logits-sam-opposite")}
        rhos = sorted({*SWEEP_RHOS, *(-r for r in SWEEP_RHOS if args.opposite)})
        result["sweep_rho"] = [summary(done.get(rho) or dpo_run(setup, sft_params, args, "logits-sam", rho, eval_fn),
                                       sft_eval, target) for rho in rhos]
    return result


def sweep_table(sweep: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'rho':>8} {'chosen end':>11} {'held Δchosen':>13} {'margin':>8} {'accuracy':>9}"]
    lines += [f"{s['rho']:>8.0e} {s['train_logps_chosen_end']:>11.3f} {s['heldout_logps_chosen_change']:>+13.3f} "
              f"{s['heldout_margin']:>8.3f} {s['heldout_accuracy']:>9.3f}" for s in sweep]
    return lines


def across_seeds(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, the paired differences from the same seed's baseline: held-out chosen
    change at the end and train chosen change at the matched margin, each as
    ``{"values", "mean", "stderr", "mitigates"}`` (stderr None for one seed; mitigates =
    seeds with a positive difference). A seed where either run has no matched-margin
    change (never reached, or a baseline margin <= 0) is left out of the latter."""
    out = {}
    for name in results[0]["summary"]:
        if name == "baseline":
            continue
        diffs = {"end": [], "matched_margin": []}
        for r in results:
            s, b = r["summary"][name], r["summary"]["baseline"]
            diffs["end"].append(s["heldout_logps_chosen_change"] - b["heldout_logps_chosen_change"])
            if None not in (s["matched_margin_chosen_change"], b["matched_margin_chosen_change"]):
                diffs["matched_margin"].append(s["matched_margin_chosen_change"] - b["matched_margin_chosen_change"])
        out[name] = {"rho": results[0]["summary"][name]["rho"]}
        for key, values in diffs.items():
            v = np.asarray(values)
            out[name][key] = {
                "values": values,
                "mean": float(v.mean()) if v.size else None,
                "stderr": float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else None,
                "mitigates": int(np.sum(v > 0)),
            }
    return out


def across_seeds_lines(agg: dict[str, dict[str, Any]], seeds: int) -> list[str]:
    def cell(d):
        if d["mean"] is None:
            return "no seed to compare"
        err = f" ± {d['stderr']:.2f}" if d["stderr"] is not None else ""
        return f"{d['mean']:+.2f}{err} (higher in {d['mitigates']}/{len(d['values'])})"
    return [f"over {seeds} seeds, chosen log-prob vs the same seed's baseline (mean ± s.e.):"] + [
        f"{name:>20} (rho={a['rho']:g}): held-out at the end {cell(a['end'])}; "
        f"train at equal margin {cell(a['matched_margin'])}" for name, a in agg.items()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, ".write-test"), "w"):
            pass
        os.remove(os.path.join(args.out, ".write-test"))
    except OSError as err:
        fail(f"--out {args.out}: not writable ({err.strerror})")
    results = []
    for seed in range(args.seed, args.seed + args.seeds):
        results.append(run_seed(argparse.Namespace(**{**vars(args), "seed": seed})))
        print("\n".join([f"-- seed {seed}", *results[-1]["verdict"]]))
        if args.sweep_rho:
            print("\n".join(sweep_table(results[-1]["sweep_rho"])))
    first = results[0]
    result = {"config": vars(args), **first, "seeds": [
        {k: r[k] for k in ("seed", "summary", "verdict", "probe", "sweep_rho") if k in r} for r in results]}
    if args.seeds > 1:
        result["across_seeds"] = across_seeds(results)
        print("\n".join(across_seeds_lines(result["across_seeds"], args.seeds)))

    plot(first["runs"], os.path.join(args.out, "fig1c_logps.png"),
         f"DPO from SFT ({args.optimizer}, lr={args.lr:g}, rho={args.rho:g}, seed {args.seed})")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}/fig1c_logps.png and {args.out}/metrics.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
