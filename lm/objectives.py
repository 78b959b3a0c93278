"""Gradients of a preference loss under plain descent, logits-SAM or full SAM.

A batch holds B preference pairs ([B, 2, T], chosen at [:, 0], rejected at [:, 1]),
right-padded as :mod:`lm.data.batching` lays them out; one trunk pass runs over the 2B
sequences. The modes differ only in where the SAM
perturbation e = ρ g/‖g‖ (``dynamics.sam``) is applied:

  plain / adamw  ∇θ L(θ)                                       (the optimizer is separate)
  logits-sam     ∇θ L(h(θ), W + e),  g = ∇_W L(sg(h), W)         paper §3.3, Algorithm 1
  sam            ∇θ L(θ + e),        g = ∇θ L(θ)                 Foret et al.; two passes

Logits-SAM costs one trunk forward and one trunk backward: only the output layer sees
the perturbation (``head_dtype="split"``, exact under bf16 compute, runs the trunk's
backward on two cotangents: see :func:`make_model_grad_fn`). For tied models (GPT-2)
the perturbed W is the head *use* of the embedding matrix; the input embedding lookup
keeps the unperturbed matrix, and the gradient of both uses lands on the one shared
parameter.

ρ > 0 with the usual positive learning rate is the practical rule (paper Table 4). The
paper's Table 6 radii: DPO 1e-4 (Pythia-2.8B) / 1e-5 (Mistral-7B); SLiC-HF 1e-3 / 1e-4;
CPO 1e-4 / 1e-5. ``rho`` defaults to 1e-4. The norm ‖g‖ is over the whole batch passed
to ``grad_fn`` (with gradient accumulation, see :mod:`lm.optim`, over one micro-batch).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from dynamics.sam import logits_sam_loss, sam_loss, sam_perturbation
from lm import losses
from lm.models import forward_hidden, matrices_in, output_head, stacked_layers

Params = Any
Batch = Mapping[str, jax.Array]
GradFn = Callable[[Params, Batch, Params], tuple[jax.Array, dict[str, jax.Array], Params]]

MODES = ("plain", "adamw", "logits-sam", "sam")
SPLIT = "split"
HEAD_DTYPES = ("float32", SPLIT)
REFERENCES = ("frozen", "precomputed", "none")


def flatten_pairs(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """input_ids, attention_mask, loss_mask reshaped [B, 2, T] → [2B, T] (pairs adjacent)."""
    return tuple(jnp.asarray(batch[k]).reshape(-1, batch[k].shape[-1]) for k in
                 ("input_ids", "attention_mask", "loss_mask"))


def split_pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[2B] (or [B, 2]) → (chosen [B], rejected [B]): the inverse of :func:`flatten_pairs`."""
    x = x.reshape(-1, 2)
    return x[:, 0], x[:, 1]


def pair_logps(logps: jax.Array, ref: jax.Array, counts: jax.Array) -> losses.PairLogps:
    """Policy and reference log-probs and response lengths of the 2B flattened sequences
    (:func:`flatten_pairs`' order) as the B pairs a loss of :data:`lm.losses.LOSSES` takes."""
    return losses.PairLogps(*split_pairs(logps), *split_pairs(ref), *split_pairs(counts))


#: ``forward_hidden`` on a batch of :mod:`lm.data`, which is right-padded: attention takes
#: each row's length (what every objective, the diagnostics and squeeze run).
batch_hidden = functools.partial(forward_hidden, right_padded=True)


def _decoder_hidden(cfg, remat, params, input_ids, attention_mask):
    return batch_hidden(cfg, params, input_ids, attention_mask, remat=remat)


def decoder_trunk(cfg, *, remat: bool = False) -> Callable[[Params, jax.Array, jax.Array], jax.Array]:
    """``hidden_fn(params, input_ids, attention_mask)`` of the decoder, as training runs it:
    each block rematerialised in the backward pass under ``remat``, or whenever
    ``cfg.remat_policy`` says what a block keeps."""
    return functools.partial(_decoder_hidden, cfg, remat or cfg.remat_policy is not None)


def _head_in(dtype, hidden_fn, head_fn):
    """``hidden_fn`` and ``head_fn`` with outputs cast to ``dtype`` (None: unchanged), so
    the head matmuls, their gradients and logits-SAM's W + e run in that dtype.

    Why float32 under bf16 compute: logits-SAM's |e| ≈ ρ/√(V·d) (1e-8 at ρ = 1e-4 and
    GPT-2's head) is far below bf16's resolution of a weight (1e-4 at |W| = 0.02), so in
    bf16 W + e rounds back to W and the SAM correction of the head gradient drowns in
    rounding (tests/lm/test_objectives.py measures it). ``"split"`` keeps the compute dtype
    here: it changes only how logits-SAM differentiates W + e (:func:`make_model_grad_fn`).
    """
    if dtype is not None and dtype not in HEAD_DTYPES:
        raise ValueError(f"--head-dtype: unknown head dtype {dtype!r}; choose from "
                         f"{', '.join(HEAD_DTYPES)}")
    if dtype is None or dtype == SPLIT:
        return hidden_fn, head_fn
    dtype = jnp.dtype(dtype)
    return (lambda params, ids, attn: hidden_fn(params, ids, attn).astype(dtype),
            lambda params: head_fn(params).astype(dtype))


def _sequence_logps(hidden_fn, head_fn, params, batch, chunk_size):
    ids, attn, mask = flatten_pairs(batch)
    logps, _ = losses.sequence_logps(hidden_fn(params, ids, attn), head_fn(params), ids, mask,
                                      chunk_size=chunk_size)
    return logps.reshape(-1, 2)


def reference_logps(cfg, ref_params: Params, batch: Batch, *,
                    chunk_size: int | None = None, head_dtype: str | None = None) -> jax.Array:
    """Reference sequence log-probs log π_ref(y | x), float32 [B, 2] (chosen, rejected).

    The same log-prob function as the policy (:func:`lm.losses.sequence_logps`); store
    the result as ``batch["ref_logps"]`` to train with ``reference="precomputed"`` (with
    the ``head_dtype`` the policy uses).
    """
    hidden_fn, head_fn = _head_in(head_dtype, functools.partial(_decoder_hidden, cfg, False),
                                  functools.partial(output_head, cfg))
    return _sequence_logps(hidden_fn, head_fn, ref_params, batch, chunk_size)


def frozen_reference(cfg, params: Params, *, head_dtype: str | None = None) -> Params:
    """The frozen reference as the step reads it: every matrix (embeddings, kernels, the
    head; leaves of 2 or more dimensions) stored in the compute dtype ``cfg.dtype``.

    Exact (:func:`lm.models.matrices_in`): the reference multiplies the same bf16 weights
    as with float32 storage (its log-probs bit-for-bit equal on XLA:CPU, tested; a GPU
    may tile a GEMM with a fused cast differently in the last bits), with half its memory
    (5.3 GB at 2.65B parameters under bf16 compute) and without casting its weights again
    every step. The head keeps its dtype under ``head_dtype="float32"``, which multiplies
    in float32. Float32 compute changes nothing but the layout below.

    Under ``cfg.scan_layers`` the blocks come stacked (:func:`lm.models.stacked_layers`),
    which the step would otherwise redo every step: a copy of the reference's blocks
    (5.0 GB at 2.65B under bf16 compute).
    """
    head = output_head(cfg, params) if head_dtype == "float32" else None
    stored = matrices_in(cfg.compute_dtype, params, keep=head)
    return stacked_layers(cfg, stored) if cfg.scan_layers else stored


def make_reference_fn(cfg, *, chunk_size: int | None = None, head_dtype: str | None = None):
    """``jit``-compiled ``ref_logps(ref_params, batch) -> [B, 2]``: precompute in one pass."""
    return jax.jit(functools.partial(reference_logps, cfg, chunk_size=chunk_size,
                                     head_dtype=head_dtype))


def make_grad_fn(
    cfg,
    *,
    loss: str = "dpo",
    loss_kwargs: Mapping[str, Any] | None = None,
    mode: str = "plain",
    rho: float = 1e-4,
    chunk_size: int | None = None,
    reference: str = "frozen",
    remat: bool = False,
    head_dtype: str | None = None,
) -> GradFn:
    """:func:`make_model_grad_fn` for the :mod:`lm.models` decoder with config ``cfg``.

    ``remat`` rematerialises each trunk block in the backward pass, as does a
    ``cfg.remat_policy`` (which says what a block keeps besides its input); the other
    arguments are those of :func:`make_model_grad_fn`.
    """
    return make_model_grad_fn(
        decoder_trunk(cfg, remat=remat), functools.partial(output_head, cfg),
        loss=loss, loss_kwargs=loss_kwargs, mode=mode, rho=rho, chunk_size=chunk_size,
        reference=reference, head_dtype=head_dtype,
        compute_params=functools.partial(multiplied_params, cfg))


def multiplied_params(cfg, params: Params) -> Params:
    """``params`` as the decoder multiplies them: every matrix but the output head in the
    compute dtype (:func:`lm.models.matrices_in`, exact: the decoder casts each at its use).

    The head keeps its storage dtype: its gradient sums over the chunks of the vocabulary
    logits, and logits-SAM perturbs it (a bf16 W + e would round e away).
    """
    return matrices_in(cfg.compute_dtype, params, keep=output_head(cfg, params))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"--mode: unknown gradient mode {mode!r}; choose from {', '.join(MODES)}")


def differentiates_multiplied(mode: str, head_dtype: str | None = None) -> bool:
    """Whether ``mode``'s gradient is taken with respect to the parameters as the model
    multiplies them (``compute_params`` of :func:`make_model_grad_fn`): plain and logits-SAM;
    not SAM and the split head, whose perturbations must reach the stored weights."""
    _check_mode(mode)
    return mode != "sam" and not (mode == "logits-sam" and head_dtype == SPLIT)


def kept_multiply(cfg, mode: str, head_dtype: str | None = None) -> Callable[[Params], Params] | None:
    """What a training step may keep of the parameters between steps for ``mode``'s
    gradients (:func:`lm.train.make_train_step`'s ``multiply``): :func:`multiplied_params`
    where :func:`make_grad_fn` differentiates them (:func:`differentiates_multiplied`), which
    then gives the same result for them as for the parameters. None for the other modes, and
    under ``scan_layers``: each step stacks the blocks' matrices in the compute dtype anyway
    (:func:`lm.models.stacked_layers`), so kept per-block copies would save no pass and cost
    their memory.
    """
    if not differentiates_multiplied(mode, head_dtype) or cfg.scan_layers:
        return None
    return functools.partial(multiplied_params, cfg)


def make_model_grad_fn(
    hidden_fn: Callable[[Params, jax.Array, jax.Array], jax.Array],
    head_fn: Callable[[Params], jax.Array],
    *,
    loss: str = "dpo",
    loss_kwargs: Mapping[str, Any] | None = None,
    mode: str = "plain",
    rho: float = 1e-4,
    chunk_size: int | None = None,
    reference: str = "frozen",
    head_dtype: str | None = None,
    compute_params: Callable[[Params], Params] | None = None,
) -> GradFn:
    """A jit-able ``grad_fn(params, batch, ref_params) -> (loss, metrics, grads)``.

    Args:
      hidden_fn: ``hidden_fn(params, input_ids, attention_mask) -> [N, T, d]``, the trunk
        up to the final norm.
      head_fn: ``head_fn(params) -> [V, d]``, the output layer (may be a view of the
        embedding: only this use of it is perturbed by logits-SAM).
      loss: a name in :data:`lm.losses.LOSSES`; ``loss_kwargs`` its hyper-parameters.
      mode: one of :data:`MODES` (see the module docstring).
      rho: signed SAM radius for "logits-sam" and "sam"; unused otherwise.
      chunk_size: tokens per chunk of the vocabulary logits (None: all at once).
      reference: "frozen" evaluates ``ref_params`` in the same computation (no gradient);
        "precomputed" reads ``batch["ref_logps"]`` [B, 2]; "none" uses no reference and
        needs a reference-free loss. Reference-free losses never evaluate the reference,
        whatever this says, and ``ref_params`` may then be None.
      head_dtype: the output layer's numerics. None: the trunk's dtype. "float32": float32
        head matmuls, so logits-SAM's W + e and its head-gradient correction survive bf16
        compute (the trunk still receives ∂L/∂h rounded to bf16). "split": the trunk's
        dtype, and logits-sam differentiates W + e with the SAM correction carried apart
        from the plain gradient (:func:`lm.losses.split_token_logps`) and run through the
        trunk's backward pass separately, so the correction of every gradient is exact to
        its own bf16 precision (with float32 parameters: bf16 gradients cannot hold it);
        other modes are unaffected.
      compute_params: ``params`` as the model multiplies them (:func:`multiplied_params`:
        the matrices in the compute dtype). Plain and logits-SAM gradients are taken with
        respect to this tree, so each matrix's gradient comes back in the dtype it was
        computed in: the same values as the stored dtype's gradient, without writing and
        reading a float32 copy of them every step, or casting the weights again in each
        rematerialised block's backward. SAM and the split head differentiate ``params``:
        their perturbations must reach the stored weights.

    Returns:
      ``grad_fn``; ``loss`` and ``metrics`` (see :meth:`lm.losses.Loss.metrics`) are of
      the unperturbed model; in SAM modes ``metrics["sam/perturbed_loss"]`` is the
      objective whose gradient is returned.

    Raises:
      ValueError: one line naming the flag (``--mode``, ``--reference``, ``--rho``,
        ``--loss`` and its hyper-parameters).
    """
    _check_mode(mode)
    if reference not in REFERENCES:
        raise ValueError(
            f"--reference: unknown reference {reference!r}; choose from {', '.join(REFERENCES)}"
        )
    try:
        rho = float(rho)
    except (TypeError, ValueError):
        raise ValueError(f"--rho: expected a number, got {rho!r}") from None
    if not math.isfinite(rho):
        raise ValueError(f"--rho must be finite, got {rho}")
    objective = losses.get_loss(loss, **dict(loss_kwargs or {}))
    hidden_fn, head_fn = _head_in(head_dtype, hidden_fn, head_fn)
    if reference == "none" and not objective.reference_free:
        free = ", ".join(k for k, s in losses.LOSSES.items() if s.reference_free)
        raise ValueError(
            f"--reference none: loss {loss!r} needs a reference model; "
            f"reference-free losses are {free}"
        )

    def tokens_loss(token_logps, mask, ref):
        """Mean loss and metrics of the pairs from masked per-token log-probs (2B, T − 1)."""
        logps, counts = jnp.sum(token_logps, axis=-1), losses.response_lengths(mask)
        pairs = pair_logps(logps, ref, counts)
        per_pair = objective(pairs)
        return jnp.mean(per_pair), objective.metrics(pairs, per_pair)

    def pair_loss(hidden, head, mask, ids, ref, unperturbed_lse=None):
        """Mean loss, and as aux (metrics, each token's logsumexp), of the pairs from trunk
        output ``hidden`` and head ``head``; logits-SAM's perturbed head takes the
        unperturbed logsumexp (``reuse``) to read its logits once."""
        if unperturbed_lse is not None:
            head = head._replace(unperturbed_lse=unperturbed_lse)
        token_logps, lse = losses.token_logps(hidden, head, ids, mask, chunk_size=chunk_size,
                                              with_lse=True)
        out, metrics = tokens_loss(token_logps, mask, ref)
        return out, (metrics, lse)

    def split_logits_sam(params, ids, attn, mask, ref):
        """Metrics and ∇θ L(h(θ), W + e) for ``head_dtype="split"``.

        The inner pass gives the per-token cotangents c = ∂L/∂log π at e = 0 and the plain
        gradients of the head's inputs, g0 W and g = g0ᵀ h with g0 = c (onehot − p), so
        e = ρ g/‖g‖; the perturbed pass (split_token_logps) returns the correction alone, and

            ∇θ = J_Wᵀ (g + Δgᵀh) + J_hᵀ (g0 W) + J_hᵀ (Δg W + g' e)

        with J_W, J_h the Jacobians of head and trunk: the trunk's backward runs once per
        share (one pass vmapped over the two), since summing them first would round the
        correction away in the compute dtype. The plain shares are the plain gradient's
        own (the same :func:`lm.losses.token_logps`), so logits-SAM minus plain descent
        is the correction alone, whichever way the chunked head rounds.
        """
        hidden, trunk_vjp = jax.vjp(lambda p: hidden_fn(p, ids, attn), params)
        head, head_vjp = jax.vjp(head_fn, params)
        h0, w0 = jax.lax.stop_gradient((hidden, head))
        tok0, inner_vjp = jax.vjp(
            lambda h, w: losses.token_logps(h, w, ids, mask, chunk_size=chunk_size), h0, w0)
        (_, metrics), cot = jax.value_and_grad(tokens_loss, has_aux=True)(tok0, mask, ref)
        d_plain, inner = inner_vjp(cot)
        e = jax.lax.stop_gradient(sam_perturbation(inner, rho))

        def perturbed(h, w):
            tok = losses.split_token_logps(h, w, e, cot, ids, mask, chunk_size=chunk_size)
            return tokens_loss(tok, mask, ref)[0]

        out, (d_corr, d_head) = jax.value_and_grad(perturbed, argnums=(0, 1))(hidden, head)
        trunk = jax.vmap(trunk_vjp)(jnp.stack([d_plain, d_corr]))[0]
        grads = jax.tree_util.tree_map(lambda h, t: h + t[0] + t[1],
                                       head_vjp(inner + d_head)[0], trunk)
        return {**metrics, "sam/perturbed_loss": out}, grads

    def model_loss(params, ids, attn, mask, ref):
        hidden = hidden_fn(params, ids, attn)
        head = head_fn(params)
        if mode == "logits-sam":
            # e in the head's compute dtype, added to W where the chunked head casts W (once
            # per pass): a stored float32 W + e would be one more (V, d) float32 array live
            # through the head's backward (+2.4% of the step's memory at gpt2-124m, 8 × 512,
            # --chunk-size 128).
            out, (metrics, _) = logits_sam_loss(
                pair_loss, hidden, head, rho, mask, ids, ref, has_aux=True,
                perturb=lambda w, e: losses.PerturbedHead(w, e.astype(hidden.dtype)),
                reuse=lambda aux: {"unperturbed_lse": aux[1]})
            return out, {**metrics, "sam/perturbed_loss": out}
        out, (metrics, _) = pair_loss(hidden, head, mask, ids, ref)
        return out, metrics

    def reference_for(batch, ref_params, n):
        if objective.reference_free:
            return jnp.zeros((n,), jnp.float32)
        if reference == "precomputed":
            if "ref_logps" not in batch:
                raise ValueError(
                    "--reference precomputed: the batch has no 'ref_logps' [B, 2]; "
                    "compute them with lm.objectives.make_reference_fn"
                )
            ref = batch["ref_logps"]
        else:
            if ref_params is None:
                raise ValueError(f"--reference frozen: loss {loss!r} needs the reference model's "
                                 "weights (ref_params); pass them, or use --reference precomputed")
            ref = _sequence_logps(hidden_fn, head_fn, ref_params, batch, chunk_size)
        return jax.lax.stop_gradient(ref.astype(jnp.float32).reshape(n))

    def grad_fn(params, batch, ref_params=None):
        ids, attn, mask = flatten_pairs(batch)
        ref = reference_for(batch, ref_params, ids.shape[0])
        if differentiates_multiplied(mode, head_dtype):
            multiplied = params if compute_params is None else compute_params(params)
            (_, metrics), grads = jax.value_and_grad(model_loss, has_aux=True)(
                multiplied, ids, attn, mask, ref)
        elif mode == "sam":
            def perturbed(p):
                out, metrics = sam_loss(model_loss, p, rho, ids, attn, mask, ref, has_aux=True)
                return out, {**metrics, "sam/perturbed_loss": out}
            (_, metrics), grads = jax.value_and_grad(perturbed, has_aux=True)(params)
        else:
            metrics, grads = split_logits_sam(params, ids, attn, mask, ref)
        return metrics["loss"], metrics, grads

    return grad_fn
