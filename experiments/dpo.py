"""``python -m experiments.dpo``: train a decoder with DPO (or a relative) and logits-SAM.

    python -m experiments.dpo --model gpt2-tiny --data prefs.jsonl --loss dpo \\
        --grad logits-sam --rho 1e-4 --beta 0.1 --lr 1e-4 --batch-size 8 --steps 100 \\
        --out runs/dpo

``--model`` is a local Hugging Face checkpoint directory or a built-in architecture name
(``lm.models.BUILTIN_NAMES``, random init). Text is tokenised with ``--tokenizer`` (a
``tokenizer.json`` or a directory holding one), by default the model directory's own; a
built-in model without one uses bytes (ids 0-255, EOS 256). The reference policy is the
initial model, frozen. The run folder gets ``config.json`` (this command's flags),
``metrics.jsonl``, ``checkpoints/`` (Orbax), PNG plots, and with ``--export-hf`` the final
policy in Hugging Face format with its ``tokenizer.json`` (for a byte-trained model, one
that encodes bytes the same way). ``--resume`` continues from the latest checkpoint and
ends exactly where an uninterrupted run would; it refuses flags that change the run
(:data:`TRAJECTORY_FLAGS`; the paths among them compare as the files they name, so
``./prefs.jsonl``, a path from another directory or a symlink resumes a run trained on
``prefs.jsonl``), and ``--steps`` may only grow with ``--schedule constant`` (cosine and
linear decay over ``--steps``; to train a finished run further with a new schedule, start
a new run with ``--model`` set to its folder). A refused command writes nothing into
``--out``.

The ``--held-out`` pairs (whole prompts, none trained on) are evaluated every
``--eval-every`` steps and at the end: all of them, in batches of ``--batch-size`` and a
smaller last one, unless ``--eval-batches N`` keeps the first N batches. Each logged eval
metric is its mean over the evaluated pairs, and a line on stderr says at the start which
pairs those are (``eval: 130 held-out pairs in 9 batches``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

from experiments._cli import (ArgumentParser, fail, finite_float, nonnegative_int, positive_float,
                              positive_int, writable_dir)

PROG = "python -m experiments.dpo"
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>")


class ByteTokenizer:
    """UTF-8 bytes as token ids: the fallback for built-in models trained from scratch."""

    eos_id = 256

    @dataclasses.dataclass
    class _Encoding:
        ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = False) -> _Encoding:
        return self._Encoding(list(text.encode("utf-8")))

    def to_str(self, pretty: bool = False) -> str:
        """A ``tokenizer.json`` that encodes every text as this class does (one token per
        byte, ``<|endoftext|>`` = 256 never matched in text), so an export of a byte-trained
        model loads with the same ids here and in ``transformers``."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {char: byte for byte, char in _byte_chars().items()}
        vocab["<|endoftext|>"] = self.eos_id  # a vocabulary entry, not an added token: text never yields it
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return tok.to_str(pretty=pretty)


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte → character table, the one ``tokenizers``' ByteLevel pre-tokenizer uses:
    printable bytes stand for themselves, the rest for characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def parse_args(argv: list[str] | None = None):
    from lm import losses, models, objectives, optim

    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="HF checkpoint directory or built-in name")
    g.add_argument("--model-step", type=nonnegative_int,
                   help="the checkpoint step of a run folder --model (default: its latest; "
                        "recorded, so that a resume starts from the same weights)")
    g.add_argument("--data", required=True, nargs="+", help="preference files (JSONL or Parquet)")
    g.add_argument("--tokenizer", help="tokenizer.json or a directory holding one (default: the model's)")
    g.add_argument("--eos-token", help=f"EOS token text (default: the config's eos id, else one of {EOS_TOKENS})")
    g.add_argument("--format", default="auto", help="record format (auto, hh, generic, ...)")
    g.add_argument("--template", default="plain", help="chat template for message-list formats")
    g.add_argument("--on-error", default="fail", choices=("fail", "skip"), help="bad records: stop or skip")
    g.add_argument("--max-len", type=positive_int, help="tokens per sequence (default: the model's, at most 512)")
    g.add_argument("--max-prompt-len", type=positive_int, help="prompt tokens (default: half of --max-len)")
    g.add_argument("--held-out", type=finite_float, default=0.1,
                   help="eval fraction (<1) or count (>=1) of pairs, split by prompt; 0: no eval")
    g = p.add_argument_group("objective")
    g.add_argument("--loss", default="dpo", choices=sorted(losses.LOSSES))
    g.add_argument("--beta", type=positive_float, help="loss temperature β (default: the loss's)")
    g.add_argument("--lam", type=finite_float, help="λ: NLL weight (slic, cpo) or DPOP penalty")
    g.add_argument("--delta", type=finite_float, help="δ: SLiC-HF hinge margin")
    g.add_argument("--gamma", type=finite_float, help="γ: SimPO target margin")
    g.add_argument("--label-smoothing", type=finite_float, help="ε: cdpo / robust label noise")
    g.add_argument("--grad", default="logits-sam", choices=objectives.MODES, help="gradient mode")
    g.add_argument("--rho", type=finite_float, default=1e-4, help="SAM radius (logits-sam, sam)")
    g.add_argument("--reference", default="frozen", choices=("frozen", "precomputed"),
                   help="reference log-probs: the frozen initial model in every step, or "
                        "computed once before training (no reference weights on device)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (default: float32, on every device; bfloat16 is the "
                        "GPU's fast path, with cuDNN's flash attention)")
    g.add_argument("--param-dtype", choices=("float32", "bfloat16"),
                   help="parameter storage dtype (default: float32)")
    g.add_argument("--chunk-size", type=positive_int, help="tokens per chunk of vocabulary logits")
    g.add_argument("--head-dtype", choices=objectives.HEAD_DTYPES,
                   help="output-layer numerics (default: the model's compute dtype); under bf16 "
                        "compute, float32 (float32 head matmuls) keeps logits-SAM's head "
                        "correction exact, split (bf16 matmuls, twice the trunk's backward "
                        "work) every parameter's")
    g.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-batches per step (the (logits-)SAM norm is per micro-batch)")
    g.add_argument("--remat", action="store_true",
                   help="rematerialise trunk blocks (each keeps only its input for the backward pass)")
    g.add_argument("--remat-policy", choices=models.REMAT_POLICIES,
                   help="what a rematerialised block keeps besides (implies --remat); "
                        "dots_with_no_batch_dims_saveable keeps the projections' and MLP's outputs")
    g.add_argument("--scan-layers", action="store_true",
                   help="run the trunk's blocks as one lax.scan (compile time independent of depth)")
    g.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"),
                   help="attention implementation (auto: cuDNN's flash attention where it runs: an "
                        "NVIDIA GPU under --dtype bfloat16; XLA's elsewhere)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=positive_float, default=1e-6)
    g.add_argument("--warmup-steps", type=nonnegative_int, default=0)
    g.add_argument("--schedule", default="cosine", choices=optim.SCHEDULES)
    g.add_argument("--weight-decay", type=finite_float, default=0.0)
    g.add_argument("--clip-norm", type=positive_float, default=1.0)
    g.add_argument("--mu-dtype", choices=[d for d in optim.MU_DTYPES if d],
                   help="AdamW's first-moment storage (default: the parameters' dtype); "
                        "bfloat16 moves 4 fewer bytes per parameter a step (lm.optim)")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=positive_int, default=8, help="preference pairs per step (global)")
    g.add_argument("--steps", type=positive_int, default=100)
    g.add_argument("--seed", type=nonnegative_int, default=0)
    g.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=4 (default: all devices on data)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process jax.distributed job (implied by the next three)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address and a free port, the same for every process "
                        "(default: detected on SLURM / Open MPI / TPU pods, or $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=positive_int, help="processes in the job (default: detected)")
    g.add_argument("--process-id", type=nonnegative_int, help="this process, 0 to N-1 (default: detected)")
    g.add_argument("--init-timeout", type=positive_int, default=300, metavar="SECONDS",
                   help="how long every process waits for the others at the coordinator")
    g.add_argument("--log-every", type=positive_int, default=10)
    g.add_argument("--eval-every", type=nonnegative_int, default=0, help="0: eval only at the end")
    g.add_argument("--eval-batches", type=positive_int,
                   help="evaluate only the first N held-out batches (default: every held-out pair)")
    g.add_argument("--checkpoint-every", type=nonnegative_int, default=0, help="0: only at the end")
    g.add_argument("--keep-checkpoints", type=positive_int, default=3)
    g.add_argument("--skip-nonfinite", action="store_true", help="skip (and count) NaN/inf steps instead of stopping")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--out", default="runs/dpo")
    g.add_argument("--resume", action="store_true")
    g.add_argument("--export-hf", metavar="DIR", help="write the final policy as a HF checkpoint")
    args = p.parse_args(argv)
    if args.held_out < 0:
        p.error(f"--held-out must be >= 0, got {args.held_out}")
    if args.held_out >= 1 and not args.held_out.is_integer():
        p.error(f"--held-out {args.held_out}: a count of pairs (>= 1) must be a whole number "
                "(a fraction of the pairs is below 1)")
    if args.max_len is not None and args.max_prompt_len is not None and (
            args.max_prompt_len >= args.max_len):
        p.error(f"--max-prompt-len {args.max_prompt_len} must be below --max-len {args.max_len}")
    if args.held_out == 0:
        for flag in ("eval_every", "eval_batches"):
            if getattr(args, flag):
                p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: there is no held-out "
                        "data to evaluate (--held-out 0)")
    if args.num_processes is not None and args.process_id is not None and args.process_id >= args.num_processes:
        p.error(f"--process-id {args.process_id} is not below --num-processes {args.num_processes}")
    if args.coordinator is not None and not args.coordinator.rpartition(":")[2].isdigit():
        p.error(f"--coordinator {args.coordinator!r}: expected HOST:PORT")
    return args


RUN_MODEL_CONFIG = "model_config.json"  # a run folder's architecture, in HF config.json form


def is_run_folder(path: str | None) -> bool:
    """A folder this command wrote: its checkpoints are a model too."""
    return bool(path) and os.path.isfile(os.path.join(path, RUN_MODEL_CONFIG))


def resolve_model(name: str):
    """``(cfg, model_dir or None)`` of a run folder, a HF directory or a built-in name; no
    weights yet."""
    from lm import hf, models

    if is_run_folder(name):
        try:
            with open(os.path.join(name, RUN_MODEL_CONFIG)) as f:
                return models.config_from_hf(json.load(f)), name
        except (OSError, ValueError, models.ConfigError) as err:
            fail(f"--model {name}: {err}")
    if os.path.isdir(name):
        try:
            return hf.load_config(name), name
        except (hf.CheckpointError, models.ConfigError) as err:
            fail(f"--model {name}: {err}")
    if name in models.BUILTIN_NAMES:
        return models.builtin_config(name), None
    fail(f"--model {name!r}: not a directory nor a built-in model ({', '.join(models.BUILTIN_NAMES)})")


def load_params(cfg, model_dir: str | None, seed: int, step: int | None = None):
    """Host parameters in ``cfg``'s storage dtype: the checkpoint's (a run folder's at
    ``step``), or a seeded random init of a built-in model."""
    from lm import hf, models

    if model_dir is None:
        init = jax.jit(models.init_params, static_argnums=0)
        return jax.device_get(init(cfg, jax.random.PRNGKey(seed)))
    if is_run_folder(model_dir):
        from lm.train import CheckpointError
        from lm.train.checkpoint import restore_params

        try:
            params = restore_params(os.path.join(model_dir, "checkpoints"), step)[0]
        except CheckpointError as err:
            fail(f"--model {model_dir}: {err}")
        # --param-dtype, as a HF checkpoint is loaded in it (the run may have trained in another).
        return jax.tree_util.tree_map(lambda x: np.asarray(x, cfg.params_dtype), params)
    try:
        return hf.load_pretrained(model_dir, dtype=cfg.dtype, param_dtype=cfg.param_dtype)[1]
    except (hf.CheckpointError, models.ConfigError) as err:
        fail(f"--model {model_dir}: {err}")


def model_step(model_dir: str | None, step: int | None) -> int | None:
    """``--model-step``: the given or the latest checkpoint step of a run folder ``--model``
    (None for any other model, for which the flag is refused)."""
    from lm.train.checkpoint import Checkpointer

    if not is_run_folder(model_dir):
        if step is not None:
            fail(f"--model-step {step}: --model is not a run folder (no {RUN_MODEL_CONFIG})")
        return None
    steps = Checkpointer(os.path.join(model_dir, "checkpoints")).all_steps()
    if not steps:
        fail(f"--model {model_dir}: no checkpoint in {os.path.join(model_dir, 'checkpoints')}")
    if step is not None and step not in steps:
        fail(f"--model-step {step}: {model_dir} holds the checkpoints of steps "
             f"{', '.join(map(str, steps))}")
    return max(steps) if step is None else step


def load_tokenizer(args, cfg, model_dir):
    """``(tokenizer, eos_id)`` from ``--tokenizer``, the model directory, or bytes."""
    path = args.tokenizer or (model_dir and os.path.join(model_dir, "tokenizer.json"))
    if path and os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if path and is_run_folder(model_dir) and not args.tokenizer and not os.path.isfile(path):
        path = None  # the run trained on bytes
    if path and not os.path.isfile(path):
        if args.tokenizer:
            fail(f"--tokenizer {args.tokenizer}: no such file")
        fail(f"--model {model_dir}: has no tokenizer.json; pass --tokenizer")
    if not path:
        if args.eos_token:
            fail(f"--eos-token {args.eos_token!r}: the byte tokenizer's EOS is "
                 f"{ByteTokenizer.eos_id}; pass --tokenizer to choose another")
        if cfg.vocab_size <= ByteTokenizer.eos_id:
            fail(f"--model {args.model}: vocab {cfg.vocab_size} too small for the byte tokenizer; pass --tokenizer")
        return ByteTokenizer(), ByteTokenizer.eos_id
    from lm.tokenizer import TokenizerError, read_tokenizer_json

    try:
        tok = read_tokenizer_json(path)
    except TokenizerError as err:
        fail(f"--tokenizer {err}")
    if args.eos_token:
        eos = tok.token_to_id(args.eos_token)
        if eos is None:
            fail(f"--eos-token {args.eos_token!r}: not in {path}")
    elif cfg.eos_ids:
        eos = cfg.eos_ids[0]  # the first of a list (Llama 3's), as generation configs list it
    else:
        eos = next((tok.token_to_id(t) for t in EOS_TOKENS if tok.token_to_id(t) is not None), None)
        if eos is None:
            fail(f"--tokenizer {path}: no EOS token found; pass --eos-token")
    if tok.get_vocab_size() > cfg.vocab_size:
        fail(f"--tokenizer {path}: {tok.get_vocab_size()} tokens but the model has {cfg.vocab_size}")
    return tok, int(eos)


def with_eos(cfg, eos_id: int):
    """``cfg`` recording ``eos_id``, the EOS the run trained with (``--eos-token`` or the
    byte tokenizer's may differ from the config's), so a model saved with it loads with it."""
    return cfg if eos_id in cfg.eos_ids else dataclasses.replace(cfg, eos_token_id=eos_id)


def run_files(cfg, tokenizer, eos_id: int, echo: dict) -> dict[str, str]:
    """The run folder's files besides the training's own: ``config.json`` (the flags) and
    what makes the folder a model for ``--model``: its architecture and its tokenizer
    (none for bytes: a run folder without one trained on bytes)."""
    from lm.models import config_to_hf

    files = {RUN_MODEL_CONFIG: json.dumps(config_to_hf(with_eos(cfg, eos_id)), indent=2) + "\n",
             "config.json": json.dumps(echo, indent=2, default=str) + "\n"}
    if not isinstance(tokenizer, ByteTokenizer):
        files["tokenizer.json"] = tokenizer.to_str(pretty=True)
    return files


# Flags that change what a run computes, recorded with each checkpoint: a resume must
# repeat them. --steps joins them when the learning rate decays over it. Free to change:
# --mesh, --chunk-size, --remat, --remat-policy, --scan-layers, --attention (layout, memory
# and kernels; the same math up to float rounding), the cadence of logs, evals and
# checkpoints, --skip-nonfinite, and process flags.
TRAJECTORY_FLAGS = (
    "model", "model_step", "data", "tokenizer", "eos_token", "format", "template", "on_error", "max_len",
    "max_prompt_len", "held_out", "loss", "beta", "lam", "delta", "gamma", "label_smoothing", "grad",
    "rho", "reference", "dtype", "param_dtype", "head_dtype", "grad_accum", "lr", "warmup_steps",
    "schedule", "weight_decay", "clip_norm", "mu_dtype",
)
# Those of them that name files: recorded resolved, and compared as the files they name
# (another spelling, working directory or symlink of the same file resumes); a built-in
# --model name is not a file and compares as a name.
PATH_FLAGS = ("model", "data", "tokenizer")


def trajectory(args) -> dict:
    """The flags a resume must repeat (:data:`TRAJECTORY_FLAGS`), by name."""
    flags = TRAJECTORY_FLAGS + (() if args.schedule == "constant" else ("steps",))
    return {name: getattr(args, name) for name in flags}


def load_data(args, tokenizer, eos_id):
    """Train and held-out :class:`~lm.data.PairLoader`s (held-out None when empty)."""
    from lm import data
    from lm.tokenizer import prompt_bos

    try:
        records, report = data.read_records(args.data, format=args.format, on_error=args.on_error, template=args.template)
        tcfg = data.TokenizeConfig(args.max_len, args.max_prompt_len, eos_id=eos_id,
                                   bos_id=prompt_bos(tokenizer))
        pairs, report = data.tokenize_records(records, tokenizer, tcfg, on_error=args.on_error, report=report)
    except (data.DataError, ValueError) as err:
        fail(f"--data: {err}")
    if report.num_dropped:
        print(report.summary(), file=sys.stderr)
    held = args.held_out if args.held_out < 1 else int(args.held_out)
    buckets = data.bucket_lengths(args.max_len)
    try:
        if held:
            train_idx, eval_idx = data.split_indices(len(pairs), held, args.seed, groups=pairs.prompt_keys)
        else:
            train_idx, eval_idx = np.arange(len(pairs)), np.arange(0)
        train = data.PairLoader(pairs.take(train_idx), args.batch_size, buckets=buckets, pad_id=tcfg.pad, seed=args.seed)
    except ValueError as err:
        fail(f"--data: {err} (pairs: {len(pairs)}, --batch-size {args.batch_size}, --held-out {held})")
    heldout = None
    if held:  # every held-out pair: the last batch may be smaller (one more compilation)
        heldout = data.PairLoader(pairs.take(eval_idx), args.batch_size, buckets=buckets, pad_id=tcfg.pad,
                                  shuffle=False, drop_last=False)
    return train, heldout


def eval_coverage(heldout, eval_batches: int | None) -> tuple[int, str]:
    """How many batches of the held-out loader each eval runs (all of them, or the first
    ``--eval-batches``), and the line that says which held-out pairs they hold."""
    num = len(heldout) if eval_batches is None else min(eval_batches, len(heldout))
    total, pairs = len(heldout.pairs), min(num * heldout.batch_size, len(heldout.pairs))
    batches = f"{num} batch" if num == 1 else f"{num} batches"
    if pairs == total:
        return num, f"eval: {total} held-out pair{'s' * (total != 1)} in {batches}"
    return num, f"eval: {pairs} of {total} held-out pairs in {batches} (--eval-batches {eval_batches})"


def precompute_reference(cfg, params, loader, chunk_size, head_dtype):
    """Reference log-probs [N, 2] of every pair ``loader`` draws from, in one pass.

    Batches carry their pairs' ``index``, so :func:`lm.data.with_ref_logps` attaches the
    right rows whatever the shuffle.
    """
    from lm import data, objectives

    reference = objectives.make_reference_fn(cfg, chunk_size=chunk_size, head_dtype=head_dtype)
    ordered = data.PairLoader(loader.pairs, loader.batch_size, buckets=loader.buckets,
                              pad_id=loader.pad_id, shuffle=False, drop_last=False)
    table = np.full((len(loader.pairs), 2), np.nan, np.float32)
    for k in range(len(ordered)):
        batch = ordered.batch(k)
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "loss_mask")}
        table[batch["index"]] = np.asarray(reference(params, inputs))
    return table


@contextlib.contextmanager
def cudnn_attention_hint(cfg):
    """One line naming ``--attention xla`` where cuDNN's attention fails to compile or run
    (its version, this GPU), not a traceback from deep inside XLA."""
    from lm import models

    try:
        yield
    except Exception as err:
        if cfg.attention_impl == "cudnn" and models.is_cudnn_attention_error(err):
            fail(f"--attention: cuDNN's attention failed here ({str(err).splitlines()[0]}); "
                 f"run with --attention xla")
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lm import data, losses, models, objectives, optim
    from lm.hf import save_pretrained
    from lm.train import CheckpointError, ConfigError, NonFiniteError, TrainConfig, train
    from lm.train.logging import write_text_atomic
    from lm.train.loop import check_run_folder, eval_from_grad_fn
    from lm.train.mesh import batch_sharding, check_batch_size, make_mesh, maybe_initialize_distributed, to_host

    try:
        maybe_initialize_distributed(args.distributed, coordinator=args.coordinator,
                                     num_processes=args.num_processes, process_id=args.process_id,
                                     timeout_s=args.init_timeout)
    except ConnectionError as err:
        fail(f"--coordinator {args.coordinator}: {err}")
    except (ValueError, RuntimeError) as err:
        fail(f"--distributed: {str(err).splitlines()[0]} (outside SLURM / Open MPI / TPU pods pass "
             f"--coordinator, --num-processes and --process-id)")
    primary = jax.process_index() == 0  # writes the run folder's files; every process trains
    for path in args.data:
        if not os.path.isfile(path):
            fail(f"--data {path}: no such file")
    cfg, model_dir = resolve_model(args.model)
    args.model_step = model_step(model_dir, args.model_step)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("dtype", args.dtype),
                                                        ("param_dtype", args.param_dtype)) if v})
    split = args.head_dtype == "split" and args.grad == "logits-sam"
    try:
        attention = models.attention_for(args.attention, cfg, vmapped_backward=split)
    except models.ConfigError as err:
        fail(str(err))
    cfg = dataclasses.replace(cfg, attention_impl=attention, scan_layers=args.scan_layers,
                              remat_policy=args.remat_policy)
    try:
        mesh = make_mesh(args.mesh)  # the one mesh: the micro-batches' sharding and train()'s
        check_batch_size(args.batch_size, mesh.shape, args.grad_accum)
    except ConfigError as err:
        fail(str(err))
    out = writable_dir(args.out)
    if args.export_hf:  # found out now, not after training
        export = writable_dir(args.export_hf, "--export-hf").resolve()
        if export == out.resolve() or out.resolve() in export.parents:
            fail(f"--export-hf {args.export_hf}: inside --out {args.out}, whose config.json "
                 "it would overwrite; export to a folder of its own")

    if args.max_len is None:
        args.max_len = min(512, cfg.max_position_embeddings)
    if args.max_prompt_len is None:
        args.max_prompt_len = args.max_len // 2
    if args.max_len > cfg.max_position_embeddings:
        fail(f"--max-len {args.max_len}: over the model's {cfg.max_position_embeddings} positions")
    loss_kwargs = {
        name: getattr(args, name)
        for name in ("beta", "lam", "delta", "gamma", "label_smoothing")
        if getattr(args, name) is not None
    }
    try:
        objective = losses.get_loss(args.loss, **loss_kwargs)
    except ValueError as err:
        fail(str(err))
    tokenizer, eos_id = load_tokenizer(args, cfg, model_dir)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seed=args.seed, mesh=mesh,
        log_every=args.log_every, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, skip_nonfinite=args.skip_nonfinite,
        progress=not args.no_progress,
    )
    try:  # train() checks again; this refuses before the model and data are loaded
        check_run_folder(str(out), config, resume=args.resume, meta=trajectory(args), paths=PATH_FLAGS)
    except ConfigError as err:
        fail(str(err))
    except CheckpointError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    loader, heldout = load_data(args, tokenizer, eos_id)
    if heldout is not None:
        num_eval, coverage = eval_coverage(heldout, args.eval_batches)
        print(coverage, file=sys.stderr)
    params = load_params(cfg, model_dir, args.seed, args.model_step)
    batch_at, eval_at = loader.batch, heldout and heldout.batch
    if args.reference == "precomputed" and not objective.reference_free:
        with cudnn_attention_hint(cfg):
            train_table = precompute_reference(cfg, params, loader, args.chunk_size, args.head_dtype)
            eval_table = (None if heldout is None else
                          precompute_reference(cfg, params, heldout, args.chunk_size, args.head_dtype))
        batch_at = lambda k: data.with_ref_logps(loader.batch(k), train_table)
        if heldout is not None:
            eval_at = lambda k: data.with_ref_logps(heldout.batch(k), eval_table)
    try:
        reference = "none" if objective.reference_free else args.reference
        common = dict(loss=args.loss, loss_kwargs=loss_kwargs, chunk_size=args.chunk_size, reference=reference,
                      head_dtype=args.head_dtype)
        grad_fn = optim.accumulate_gradients(
            objectives.make_grad_fn(cfg, mode=args.grad, rho=args.rho, remat=args.remat,
                                    **common),
            args.grad_accum, batch_sharding=batch_sharding(mesh),
        )
        eval_fn = eval_from_grad_fn(objectives.make_grad_fn(cfg, mode="plain", **common))
        tx = optim.make_optimizer(
            args.lr, total_steps=args.steps, warmup_steps=args.warmup_steps, schedule=args.schedule,
            weight_decay=args.weight_decay, clip_norm=args.clip_norm, mu_dtype=args.mu_dtype,
        )
    except ValueError as err:
        fail(str(err))

    echo = dict(vars(args), model_config=dataclasses.asdict(cfg), eos_id=eos_id,
                tokenizer=type(tokenizer).__name__, devices=jax.device_count())
    eval_batches = None if heldout is None else (lambda: (eval_at(i) for i in range(num_eval)))
    with cudnn_attention_hint(cfg):
        try:
            result = train(
                grad_fn, tx, params, batch_at, config, str(out),
                ref_params=(None if reference != "frozen"
                            else objectives.frozen_reference(cfg, params, head_dtype=args.head_dtype)),
                eval_batches=eval_batches, eval_fn=eval_fn, resume=args.resume,
                meta=trajectory(args), paths=PATH_FLAGS, files=run_files(cfg, tokenizer, eos_id, echo),
                multiply=objectives.kept_multiply(cfg, args.grad, args.head_dtype),
            )
        except ConfigError as err:
            fail(str(err))
        except (NonFiniteError, CheckpointError) as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 1
    if args.export_hf:
        policy = to_host(result.state.params)  # a gather: every process takes part
        if primary:
            save_pretrained(with_eos(cfg, eos_id), policy, args.export_hf)
            write_text_atomic(Path(args.export_hf) / "tokenizer.json", tokenizer.to_str(pretty=True))
    summary = ", ".join(f"{k} {v:.4g}" for k, v in result.last_metrics.items() if k in ("loss", "rewards/accuracies", "rewards/margins"))
    print(f"done: step {int(result.state.step)} ({summary}); run folder {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
