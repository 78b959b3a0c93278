"""Squeezing diagnostics of a model on preference data (``lm.diagnostics``), as JSON.

    python -m experiments.diagnose --model DIR --data prefs.jsonl [--ref DIR] --out diag.json

For the first ``--batch-size`` usable pairs: the output-layer gradient inner product and
cosine of log π(y_w) and log π(y_l) per pair (margin-pitfalls condition (7)), and
Hutchinson estimates of the traces of the DPO loss Hessian w.r.t. the output layer, all
parameters and the logits (logits-SAM paper §4.3), and the first-order effect of
logits-SAM on the chosen and rejected log-probs after one step, by term
(``lm.diagnostics.sam_step_effects``). The reference is ``--ref`` (default: the model).
Records that cannot be used (a tie, a prompt over ``--max-prompt-len``, ...) are skipped
and counted, on stderr and under ``data`` in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from experiments._cli import ArgumentParser, fail, int_at_least, positive_float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from lm.diagnostics import HESSIANS

    p = ArgumentParser(prog="python -m experiments.diagnose", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory or built-in name")
    p.add_argument("--ref", help="reference model directory (default: --model)")
    p.add_argument("--data", required=True, help="preference file (JSONL or Parquet)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the model's)")
    p.add_argument("--max-len", type=int_at_least(2), default=64,
                   help="tokens per sequence (at most the model's context)")
    p.add_argument("--max-prompt-len", type=int_at_least(1),
                   help="prompt tokens (default: half of --max-len); pairs with longer prompts are skipped")
    p.add_argument("--batch-size", type=int_at_least(1), default=4, help="pairs to diagnose")
    p.add_argument("--beta", type=positive_float, default=0.1)
    p.add_argument("--probes", type=int_at_least(2), default=16, help="Hutchinson probes")
    p.add_argument("--step-effects", action=argparse.BooleanOptionalAction, default=True,
                   help="the one-step effect of logits-SAM by term (holds every token's V logits at once)")
    p.add_argument("--hessians", default=",".join(HESSIANS),
                   help=f"comma-separated subset of {','.join(HESSIANS)} ('' for none)")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--out", help="write the JSON here as well as to stdout")
    args = p.parse_args(argv)
    args.hessians = tuple(h for h in args.hessians.split(",") if h)
    unknown = [h for h in args.hessians if h not in HESSIANS]
    if unknown:
        p.error(f"argument --hessians: unknown {unknown[0]!r}; choose from {', '.join(HESSIANS)}")
    if args.max_prompt_len is None:
        args.max_prompt_len = args.max_len // 2
    if args.max_prompt_len >= args.max_len:
        p.error(f"argument --max-prompt-len: must be below --max-len {args.max_len}, got {args.max_prompt_len}")
    return args


def usable_pairs(args, tok, tcfg):
    """``(pairs, report)`` of ``--data`` under ``tcfg``: bad records (a tie, a prompt over
    ``--max-prompt-len``, ...) are skipped and counted, since only the first
    ``--batch-size`` usable pairs are diagnosed; fewer than that is one error line."""
    from lm import data

    try:
        records, report = data.read_records(args.data, on_error="skip")
        pairs, report = data.tokenize_records(records, tok, tcfg, on_error="skip", report=report)
    except (data.DataError, ValueError) as err:
        fail(f"--data {args.data}: {err}")
    if len(pairs) < args.batch_size:
        fail(f"--data {args.data}: {len(pairs)} usable pairs, fewer than --batch-size {args.batch_size} "
             f"({report.summary()}; --max-len {args.max_len}, --max-prompt-len {args.max_prompt_len})")
    return pairs, report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from experiments import dpo
    from lm import data, diagnostics
    from lm.tokenizer import prompt_bos

    cfg, model_dir = dpo.resolve_model(args.model)
    if args.max_len > cfg.max_position_embeddings:
        fail(f"--max-len {args.max_len}: over the model's {cfg.max_position_embeddings} positions")
    ns = argparse.Namespace(tokenizer=args.tokenizer, eos_token=None, model=args.model)
    tok, eos = dpo.load_tokenizer(ns, cfg, model_dir)
    tcfg = data.TokenizeConfig(args.max_len, args.max_prompt_len, eos_id=eos,
                               bos_id=prompt_bos(tok))
    pairs, report = usable_pairs(args, tok, tcfg)
    if report.num_dropped or report.truncated:
        print(f"--data {args.data}: {report.summary()}", file=sys.stderr)
    params = dpo.load_params(cfg, model_dir, args.seed)
    ref_params = params
    if args.ref:
        ref_cfg, ref_dir = dpo.resolve_model(args.ref)
        if ref_cfg != cfg:
            fail(f"--ref {args.ref}: architecture differs from --model {args.model}")
        ref_params = dpo.load_params(ref_cfg, ref_dir, args.seed)
    batch = data.collate(pairs, np.arange(args.batch_size), (args.max_len,), tcfg.pad)
    batch = {k: v for k, v in batch.items() if k != "index"}

    products = jax.jit(diagnostics.gradient_products, static_argnums=0)(cfg, params, batch)
    traces = {}
    if args.hessians:
        traces = jax.jit(lambda p, b, r: diagnostics.hessian_traces(
            cfg, p, b, jax.random.PRNGKey(args.seed), ref_params=r,
            loss_kwargs={"beta": args.beta}, num_probes=args.probes, which=args.hessians))(
            params, batch, ref_params)
    effects = {}
    if args.step_effects:
        effects = jax.jit(lambda p, b, r: diagnostics.sam_step_effects(
            cfg, p, b, ref_params=r, loss_kwargs={"beta": args.beta}))(params, batch, ref_params)
    products, traces, effects = jax.device_get((products, traces, effects))
    result = {
        "data": {"file": args.data, "records": report.summary()},
        "pairs": [pairs.source[i] for i in range(args.batch_size)],
        "gradient_products": {k: np.asarray(products[k]).tolist()
                              for k in ("inner", "norm_chosen", "norm_rejected", "cosine")},
        "token_cosine": np.asarray(products["token_cosine"]).tolist(),
        "hessian_traces": {k: {"trace": float(v["trace"]), "stderr": float(v["stderr"]),
                               "probes": args.probes} for k, v in traces.items()},
        "sam_step_effects": {k: float(v) for k, v in effects.items()},
    }
    text = json.dumps(result)
    if args.out:
        try:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        except OSError as err:
            fail(f"--out {args.out}: {err.strerror}")
    print(json.dumps({k: v for k, v in result.items() if k != "token_cosine"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
