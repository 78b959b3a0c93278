"""Sequence log-probabilities, the DPO family of preference losses, and their metrics.

Log-probs (one function for policy and reference). For hidden states h (N, T, d) after
the final norm, an output layer W (V, d) and token ids x (N, T), the log-prob of token
t+1 given the prefix up to t is

    log π(x_{t+1} | x_{≤t}) = z_t[x_{t+1}] − logsumexp(z_t),   z_t = h_t Wᵀ ∈ R^V

counted where ``loss_mask[t+1] = 1`` (response tokens, EOS included). With ``chunk_size``
the vocabulary × tokens float32 logits are never materialised: tokens are processed in
chunks, and the backward pass holds one chunk's logits at a time, or, with few chunks, every
chunk's softmax gradient in the compute dtype (:func:`keeps_softmax_gradient`).

Losses. Each is a pure function of a :class:`PairLogps` (policy and reference sequence
log-probs of chosen y_w and rejected y_l, and their token counts) and its
hyper-parameters, returning per-pair losses [B]. With

    Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))     (paper eq. 2)

  dpo     −log σ(βΔ)                                              Rafailov et al.
  cdpo    −(1−ε) log σ(βΔ) − ε log σ(−βΔ)                         label smoothing
  robust  (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)            Chowdhury et al.
  ipo     (Δ̄ − 1/(2β))², Δ̄ = Δ with per-token (length-normalised) log-probs
  hinge   max(0, 1 − βΔ)
  dpop    −log σ(β(Δ − λ max(0, log π_ref(y_w) − log π(y_w))))      DPO-Positive
  slic    max(0, δ − log π(y_w) + log π(y_l)) − λ log π(y_w)        paper Table 5
  cpo     −log σ(β log π(y_w) − β log π(y_l)) − λ log π(y_w)        paper Table 5
  simpo   −log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ)       Meng et al.

slic, cpo and simpo are reference-free: they never read the reference log-probs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from lm.models import head_cotangent, hidden_cotangent, logits_from_hidden, matmul_precision


# ----------------------------------------------------------------------------- log-probs


def target_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(z)[target] in float32: logits (..., V), int targets (...) → (...)."""
    target_logit, lse = _target_logit_and_lse(logits, targets)
    return target_logit - lse


def _target_logit_and_lse(logits: jax.Array, targets: jax.Array,
                          vocab: int | None = None) -> tuple[jax.Array, jax.Array]:
    """z[target] and logsumexp(z), float32 (...), of logits (..., V) and int targets (...);
    ``vocab``: the logsumexp of the first ``vocab`` columns only (each reduction masks the
    rest as it reads them: no masked copy of the logits), by :func:`padded_logsumexp`."""
    z = logits.astype(jnp.float32)
    target_logit = _target_logit(z, targets)
    if vocab is None:
        return target_logit, jax.nn.logsumexp(z, axis=-1)
    return target_logit, padded_logsumexp(z, vocab)


def _target_logit(z: jax.Array, targets: jax.Array) -> jax.Array:
    """z[target] (...) of logits z (..., V) and int targets (...)."""
    return jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _two_pass_logsumexp(z: jax.Array, vocab: int) -> jax.Array:
    real = None if vocab == z.shape[-1] else jnp.arange(z.shape[-1]) < vocab
    return jax.nn.logsumexp(z, axis=-1, where=real)


def _max_and_scaled_sum(a, b):
    """The reducer of (m, s) pairs, s = Σ exp(z − m) over what each has read:
    (max(m₁, m₂), s₁ e^{m₁−m} + s₂ e^{m₂−m}), one exp (of −|m₁ − m₂|, 1 where they are
    equal, so two empty pairs (−inf, 0) give (−inf, 0), not NaN)."""
    (m1, s1), (m2, s2) = a, b
    e = jnp.exp(jnp.where(m1 == m2, 0.0, -jnp.abs(m1 - m2)))
    return jnp.maximum(m1, m2), jnp.where(m1 >= m2, s1 + s2 * e, s1 * e + s2)


def one_read_logsumexp(z: jax.Array, vocab: int) -> jax.Array:
    """logsumexp of the first ``vocab`` columns of float32 z (..., V′), V′ a multiple of
    :data:`HEAD_ALIGNMENT`, reading z once: one reduction of (running max m, Σ exp(z − m))
    pairs (:func:`_max_and_scaled_sum`) where ``jax.nn.logsumexp`` reads z twice (its max,
    then Σ exp(z − max)). Each row is reduced in blocks of HEAD_ALIGNMENT columns, then
    across the blocks, so no chain of roundings is longer than V′ / 128 (flat, on XLA:CPU's
    serial loop: 70× the two-pass error at V = 50257; blocked, within 0.8 ulp of it on
    random logits, about 6 ulp of the row's max on a slowly rising row)."""
    if z.shape[-1] % HEAD_ALIGNMENT:
        raise ValueError(f"one_read_logsumexp: {z.shape[-1]} columns, not a multiple of "
                         f"{HEAD_ALIGNMENT} (the chunked head pads its logits to one)")
    real = jnp.arange(z.shape[-1]) < vocab
    blocks = (*z.shape[:-1], z.shape[-1] // HEAD_ALIGNMENT, HEAD_ALIGNMENT)
    pairs = (jnp.where(real, z, -jnp.inf).reshape(blocks),
             jnp.broadcast_to(real.astype(jnp.float32), z.shape).reshape(blocks))
    init = (jnp.float32(-jnp.inf), jnp.float32(0.0))
    for axis in (z.ndim, z.ndim - 1):
        pairs = jax.lax.reduce(pairs, init, _max_and_scaled_sum, (axis,))
    m, s = pairs
    return m + jnp.log(s)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def padded_logsumexp(z: jax.Array, vocab: int) -> jax.Array:
    """logsumexp of the first ``vocab`` columns of the chunked head's float32 logits
    z (..., V′), V′ a multiple of :data:`HEAD_ALIGNMENT`: :func:`one_read_logsumexp` on
    accelerators, whose max and exp-sum passes are memory-bound (at gpt2-124m, 8 × 512, the
    max alone took 0.62 ms of adamw's 27.3 ms step on an H200); ``jax.nn.logsumexp`` on the
    CPU, where the pair reduction is a scalar loop (2.3× slower). Its derivative is the
    softmax's, Σ_v softmax(z)_v ż_v, so both run under ``jax.jvp``."""
    return jax.lax.platform_dependent(
        z, cpu=functools.partial(_two_pass_logsumexp, vocab=vocab),
        default=functools.partial(one_read_logsumexp, vocab=vocab))


@padded_logsumexp.defjvp
def _padded_logsumexp_jvp(vocab, primals, tangents):
    (z,), (dz,) = primals, tangents
    # jax.nn.softmax, from the row's max: exp(z − lse) would round z − lse at the logits'
    # magnitude (4.7e-4 of the largest p at logits near 1e4).
    real = jnp.arange(z.shape[-1]) < vocab
    p = jax.nn.softmax(z, axis=-1, where=real)
    return padded_logsumexp(z, vocab), jnp.sum(jnp.where(real, p * dz, 0.0), axis=-1)


def _masked(flat_logps: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Keep the next-token log-probs (N, T − 1) whose target is a counted token."""
    return jnp.where(loss_mask[:, 1:] > 0, flat_logps, 0.0)


def _counted_logps(prev_logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Masked log-probs (N, T − 1) of tokens 1..T−1 from the logits at 0..T−2 (N, T − 1, V)."""
    return _masked(target_logps(prev_logits, input_ids[:, 1:]), loss_mask)


def response_lengths(loss_mask: jax.Array) -> jax.Array:
    """Counted response tokens |y| per row (N,) float32: the targets 1..T−1 in ``loss_mask``."""
    return jnp.sum(loss_mask[:, 1:].astype(jnp.float32), axis=-1)


def sequence_logps_from_logits(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
) -> jax.Array:
    """:func:`sequence_logps` (sums only) from full logits (N, T, V): for callers that
    differentiate with respect to the logits themselves (the logit Hessian)."""
    return jnp.sum(_counted_logps(logits[:, :-1], input_ids, loss_mask), axis=-1)


class PerturbedHead(NamedTuple):
    """The output layer W + e, kept as its two terms (logits-SAM's, :mod:`lm.objectives`):
    :func:`token_logps` forms the sum in ``weight``'s dtype where it casts the head to the
    compute dtype, so the sum in ``weight``'s dtype is never stored.

    ``unperturbed_lse``, if given, is the logsumexp of the unperturbed logits h Wᵀ at every
    target position (N, T − 1), at the very features h the perturbed head is applied to:
    what :func:`token_logps` of W returns ``with_lse``. A chunked head that keeps its
    softmax gradients then reads each chunk's perturbed logits once instead of twice
    (:func:`_shifted_chunk`); elsewhere it is not read.
    """

    weight: jax.Array
    perturbation: jax.Array
    unperturbed_lse: jax.Array | None = None


def token_logps(
    hidden: jax.Array,
    head: jax.Array | PerturbedHead,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int | None = None,
    with_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Masked per-token log-probs of the next token: (N, T, d), (V, d) → (N, T − 1) float32.

    Entry [n, t] is log π(x_{n,t+1} | x_{n,≤t}) where ``loss_mask[n, t+1]`` is set, else 0.

    Chunking runs along the sequence, over *target* positions [k·c, (k+1)·c) of every row
    at once, so the chunk axis is never the (data-parallel sharded) row axis, and a chunk
    whose targets are all uncounted — the prompt of a prompt longer than c, the padding of
    a bucket — skips its head matmul entirely (forward and backward: a ``lax.cond``).
    Chunked, the derivative is :func:`_head_chunks_logps`' own: with few chunks it reads the
    softmax gradients the forward kept, else each chunk's backward recomputes its logits (but
    not their logsumexp). It is reverse mode only (``jax.jvp`` of chunked log-probs raises;
    ``jax.jvp`` of their ``jax.grad`` works); unchunked log-probs are plain JAX, which
    :mod:`lm.diagnostics` differentiates in both modes.

    Args:
      hidden: final hidden states h (N, T, d), any float dtype.
      head: output layer W (V, d) (for tied models, the embedding matrix), or a
        :class:`PerturbedHead` (W, e): the sum W + e is formed where the head is cast to
        ``hidden``'s dtype, so no (V, d) array of it in W's dtype outlives that cast.
      input_ids: int (N, T).
      loss_mask: (N, T), 1 on the tokens whose log-probs count (the response, EOS incl.).
      chunk_size: target positions per chunk (each chunk holds N·c·V float32 logits);
        ``None`` = all at once.
      with_lse: also return logsumexp(z_t) (N, T − 1) float32 at every target position,
        counted or not (0 in the chunks skipped), without derivative: a perturbed head's
        ``unperturbed_lse``.
    """
    t = input_ids.shape[1]
    shift = None
    if isinstance(head, PerturbedHead):
        shift, head = head.unperturbed_lse, head._replace(unperturbed_lse=None)
    if _chunks(t, chunk_size) is None:
        z = logits_from_hidden(hidden[:, :-1], _multiplied_head(head, hidden.dtype))
        target_logit, lse = _target_logit_and_lse(z, input_ids[:, 1:])
        logps = _masked(target_logit - lse, loss_mask)
    else:
        # The shift is indexed by target position already: entry 0 (no target) unused.
        aligned = () if shift is None else (jnp.pad(shift.astype(jnp.float32), ((0, 0), (1, 0))),)
        counted, targets, (h_prev,), aligned = _chunk_layout((hidden,), aligned, input_ids,
                                                              loss_mask, chunk_size)
        logps, lse = _head_chunks_logps(h_prev, head, targets, counted,
                                        aligned[0] if aligned else None)
        logps, lse = _unchunked(logps, loss_mask), _target_positions(lse, t)
    return (logps, jax.lax.stop_gradient(lse)) if with_lse else logps


def _multiplied_head(head: jax.Array | PerturbedHead, dtype: Any) -> jax.Array:
    """The head as the logits multiply it: W, or W + e formed in W's dtype, in ``dtype``."""
    if isinstance(head, PerturbedHead):
        head = head.weight + head.perturbation.astype(head.weight.dtype)
    return head.astype(dtype)


@jax.custom_vjp
def _head_chunks_logps(hidden, head, targets, counted, shift):
    """(Unmasked log-probs, lse) [K, N, c] of chunked targets: features [K, N, c, d] (each
    chunk's predecessors, :func:`_chunk_layout`), ``head`` as :func:`token_logps` takes it
    (a :class:`PerturbedHead` without its lse), int ``targets`` and bool ``counted``
    [K, N, c], and ``shift``: None or the unperturbed head's lse [K, N, c] (float32), read
    by the kept forward of a perturbed head (:func:`_shifted_chunk`). A chunk without a
    counted target is 0. The lse has no derivative (:func:`token_logps` returns it under
    ``stop_gradient``).

    Forward, per chunk: z = h Wᵀ, log π = z[target] − lse(z). Backward, with c the
    cotangent of a chunk's log-probs [N, c] and Q = onehot(target) − softmax(z) the
    softmax's gradient:

        G = c Q,   ∂h = G W = c (Q W),   ∂W = Σ_chunks Gᵀ h = Σ_chunks Qᵀ (c h)

    Under ``jax.grad`` the forward keeps what the backward needs, in one of two ways
    (:func:`keeps_softmax_gradient` chooses from the shapes and the features' dtype):

    * **kept**: Q in ``hidden``'s dtype for ∂W, and U = Q W [N, c, d] in float32 for ∂h,
      formed while the chunk's logits are live. The backward is one matmul per chunk
      (Qᵀ (c h)) and a scaling (c U): 6·N·V·d for both gradients, 4·N·V·d for ∂W alone
      (logits-SAM's inner gradient), the unchunked head's count.
    * **recomputed**: only lse (N·c floats); the backward recomputes z from h and W and
      forms G in one pass (a rematerialised autodiff forward would also recompute lse, two
      more passes over the chunk's N·c·V float32 logits): 8·N·V·d, and 6 for ∂W alone.

    The head is cast to ``hidden``'s dtype once per pass, not in every chunk (fused into a
    GEMM, the cast re-reads float32 W for every tile of rows), with V padded to
    :data:`HEAD_ALIGNMENT` (exact: the reductions read the real V, the padded columns' Q
    and G are 0). ∂W sums the chunks in float32 (:func:`head_cotangent`) in that padded
    [V′, d] shape and is sliced to V once, after the last chunk: XLA:GPU then adds each
    chunk's product in its GEMM's epilogue, into the sum. Sliced chunk by chunk, every
    product [V′, d] and its slice were written out beside the sum; in logits-SAM's inner
    pass, which runs while the trunk's activations are held, that was the step's peak
    (``benchmarks/README.md``, *XLA:GPU compiled here*). ∂h and ∂W are formed only for the
    inputs that are differentiated.
    """
    return _head_chunks_forward(hidden, head, targets, counted)[:2]


#: The chunked head multiplies W with its rows zero-padded to a multiple of this, and leaves
#: the padded logits out of its softmax: GPT-2's V = 50257 makes every row of the [N·c, V]
#: logits and of their cotangent an odd number of elements long, which no 16-byte-aligned
#: GEMM tile can load or store (nanoGPT pads the embedding itself to 50304 for that reason).
HEAD_ALIGNMENT = 128

#: The chunked head keeps every chunk's softmax gradient Q for its backward when a sequence
#: has at most this many chunks and the features are narrower than float32: then Q of every
#: chunk, with one chunk's live float32 logits, stays under three chunks' float32 logits
#: (bf16: 4 · 2 + 4 bytes per logit of a chunk; the recomputing backward holds 6), and
#: under the unchunked head's float32 logits. Float32 Q would be those logits whole.
KEPT_CHUNKS = 4


def keeps_softmax_gradient(seq_len: int, chunk_size: int | None, dtype: Any) -> bool:
    """Whether the chunked head's backward reads the forward's kept softmax gradients
    (:func:`_head_chunks_logps`) rather than recomputing each chunk's logits: at most
    :data:`KEPT_CHUNKS` chunks of a sequence of ``seq_len`` tokens, of features in a
    ``dtype`` narrower than float32. False for an unchunked head, whose autodiff keeps its
    logits whole."""
    chunks = _chunks(seq_len, chunk_size)
    return chunks is not None and chunks <= KEPT_CHUNKS and jnp.dtype(dtype).itemsize < 4


def _aligned_head(head: jax.Array | PerturbedHead, dtype: Any) -> tuple[jax.Array, int]:
    """(:func:`_multiplied_head` with zero rows up to a multiple of :data:`HEAD_ALIGNMENT`,
    the vocabulary size V)."""
    w = _multiplied_head(head, dtype)
    vocab = w.shape[0]
    return jnp.pad(w, ((0, -vocab % HEAD_ALIGNMENT), (0, 0))), vocab


def _softmax_gradient(z, targets, lse, vocab):
    """onehot(target) − exp(z − lse) in float32 [..., V′] of padded logits z, 0 in the padded
    columns (their exp(−lse) could overflow to inf)."""
    column = jnp.arange(z.shape[-1])
    onehot = (column == targets[..., None]).astype(jnp.float32)
    return jnp.where(column < vocab, onehot - jnp.exp(z - lse[..., None]), 0.0)


def _head_chunks_forward(hidden, head, targets, counted, keep=(), shift=None):
    """(log-probs, lse, kept) of :func:`_head_chunks_logps`; ``keep`` names the kept
    residuals to form, each a list of K chunks' [N, c, ·]: "head" (Q̃ and r [N, c] with
    Q = r Q̃, for ∂W) and "hidden" (U = Q W, for ∂h). A ``shift`` (the unperturbed lse of a
    perturbed head) lets each kept chunk whose rows provably stay near it read its logits
    once (:func:`_shifted_chunk`); the others run as without it.

    Kept, the few chunks (:func:`keeps_softmax_gradient`) run unrolled, each Q̃ an array of
    its own, allocated where it is formed: a loop would stack them into one buffer that
    XLA may allocate before the loop (logits-SAM: before its inner pass has freed its own).
    """
    w, vocab = _aligned_head(head, hidden.dtype)
    if jnp.finfo(hidden.dtype).maxexp < jnp.finfo(jnp.float32).maxexp:
        shift = None  # float16's E = exp(z − shift) would overflow within the range

    # r exists where a chunk may take the shifted pass; elsewhere Q̃ is Q (r = 1, no kernel).
    def scale(value):
        return None if shift is None else jnp.full(hidden.shape[1:3], value, jnp.float32)

    def exact(h, tg, *_):
        z = logits_from_hidden(h, w)
        target_logit, lse = _target_logit_and_lse(z, tg, vocab)
        kept = {}
        if keep:
            q = _softmax_gradient(z, tg, lse, vocab).astype(h.dtype)
            kept["head"] = (q, scale(1.0))
            if "hidden" in keep:
                kept["hidden"] = _dot(q, w, "...v,vd->...d")
        return target_logit, lse, {k: kept[k] for k in keep}

    def shifted(h, tg, s, m):
        return _shifted_chunk(h, w, tg, s, m, vocab, keep)

    def skip(h, tg, *_):
        zeros = {"head": (jnp.zeros((*tg.shape, w.shape[0]), h.dtype), scale(0.0)),
                 "hidden": jnp.zeros(h.shape, jnp.float32)}
        return (*(jnp.zeros(tg.shape, jnp.float32),) * 2, {k: zeros[k] for k in keep})

    if not keep:
        target_logit, lse, _ = jax.lax.map(
            lambda xs: jax.lax.cond(jnp.any(xs[2]), exact, skip, xs[0], xs[1]),
            (hidden, targets, counted))
        return target_logit - lse, lse, {}
    if shift is None:
        chunks = [jax.lax.cond(jnp.any(counted[k]), exact, skip, hidden[k], targets[k])
                  for k in range(targets.shape[0])]
    else:
        # Per chunk, whether its rows' perturbed lse provably lies within SHIFT_RANGE of the
        # shift; the slots without a target (zero features: lse = log V, shift 0) do for
        # any V < e^23, and whatever shift an uncounted row has, it writes no Q̃ or r.
        largest = jnp.sqrt(jnp.max(jnp.sum(jnp.square(hidden.astype(jnp.float32)), axis=-1),
                                   axis=(1, 2)))
        near = largest * _perturbation_bound(head, hidden.dtype) + 1.0 <= SHIFT_RANGE
        branch = jnp.where(jnp.any(counted, axis=(1, 2)), jnp.where(near, 2, 1), 0)
        chunks = [jax.lax.switch(branch[k], (skip, exact, shifted), hidden[k], targets[k],
                                 shift[k], counted[k]) for k in range(targets.shape[0])]
    target_logit, lse = (jnp.stack([c[i] for c in chunks]) for i in (0, 1))
    return target_logit - lse, lse, {name: [c[2][name] for c in chunks] for name in keep}


#: How far (in nats) a perturbed head's logsumexp may provably lie from the unperturbed one
#: for :func:`_shifted_chunk` to shift its exponentials by the latter: exp(z − shift) then
#: stays under e^24 an entry and V′·e^24 a row (no overflow), and flushes to zero only the
#: probabilities under about 1e-38 · e^24 ≈ 3e-28 (1e-38 unshifted).
SHIFT_RANGE = 24.0


def _perturbation_bound(head: PerturbedHead, dtype: Any) -> jax.Array:
    """B with |lse(z′)_n − lse(z)_n| ≤ ‖h_n‖ B for every feature row h_n, z = h wᵀ and
    z′ = h w′ᵀ with w, w′ the heads W and W + e as the logits multiply them (cast to
    ``dtype``, float32 accumulation): lse is 1-Lipschitz in the max norm, and

        |z′_v − z_v| ≤ ‖h‖ ‖w′_v − w_v‖ + (rounding of both products)
                     ≤ ‖h‖ (max_v ‖w′_v − w_v‖ + 2 d ε max_v max(‖w_v‖, ‖w′_v‖))

    (Cauchy–Schwarz; each float32 accumulation of d products errs by at most about
    d (ε/2) ‖h‖ ‖w_v‖, ε the machine epsilon, here counted twice over)."""
    def rounded(x):
        # x.astype(dtype) in float32, by an op of its own: the cast itself would be merged
        # with the inner pass's cast of W and hold that [V, d] array until here. Padded as
        # the perturbed head is (_aligned_head): XLA:GPU then sums these squares in the
        # kernel that casts W + e, which reads W and e anyway.
        bits = jnp.finfo(dtype)
        x = jax.lax.reduce_precision(x.astype(jnp.float32), bits.nexp, bits.nmant)
        return jnp.pad(x, ((0, -x.shape[0] % HEAD_ALIGNMENT), (0, 0)))

    w = rounded(head.weight)
    w1 = rounded(head.weight + head.perturbation.astype(head.weight.dtype))
    # Both sums of squares a row in one reduction (nothing [V, d] stored on the CPU);
    # max(‖w_v‖, ‖w′_v‖) ≤ ‖w_v‖ + ‖w′_v − w_v‖.
    zero = jnp.float32(0)
    squares = jax.lax.reduce((jnp.square(w1 - w), jnp.square(w)), (zero, zero),
                             lambda a, b: (a[0] + b[0], a[1] + b[1]), (w.ndim - 1,))
    change, size = (jnp.sqrt(jnp.max(x)) for x in squares)
    return change + 2 * w.shape[-1] * jnp.finfo(jnp.float32).eps * (size + change)


def _shifted_chunk(h, w, targets, shift, counted, vocab, keep):
    """The kept forward of one chunk of a perturbed head, its float32 logits z = h w′ᵀ read
    once: with s the unperturbed head's lse at each row (within :data:`SHIFT_RANGE` of
    lse(z), :func:`_perturbation_bound`),

        E = exp(z − s),   Σ = Σ_v E_v,   lse(z) = s + log Σ,
        Q = onehot − E / Σ = r Q̃,   Q̃ = Σ onehot − E,   r = 1 / Σ

    where the plain forward reads z twice: its logsumexp, then Q = onehot − exp(z − lse).
    One pass over z writes −E in h's dtype and sums E; Q̃'s target entries, Σ − E_target
    (from the gathered target logit), are then written into it in place. The backward
    scales c h by r for ∂W = Q̃ᵀ (r c h) (:func:`_kept_cotangents`), and U = r (Q̃ w′).
    The algebra holds for any shift: one within :data:`SHIFT_RANGE` of lse(z) gives the
    exact pass's numbers (only probabilities under about 3e-28 may flush), and a row whose
    log Σ falls outside, which the bound excludes for the unperturbed lse, gets a NaN lse,
    never a wrong number. Uncounted rows (cotangent 0) keep Q̃ = 0 and r = 0 whatever their
    shift, so no inf reaches the backward's products with their zeros.
    """
    z = logits_from_hidden(h, w)
    target_logit = _target_logit(z, targets)
    column = jnp.arange(z.shape[-1])
    e = jnp.where(column < vocab, jnp.exp(z - shift[..., None]), 0.0)
    # Summed in blocks of HEAD_ALIGNMENT columns, then across them, as one_read_logsumexp
    # reduces: no chain of float32 roundings longer than V′ / 128 on XLA:CPU's serial loop.
    total = jnp.sum(e.reshape(*e.shape[:-1], -1, HEAD_ALIGNMENT), axis=-1).sum(axis=-1)
    target_entry = jnp.where(counted, total - jnp.exp(target_logit - shift), 0.0).astype(h.dtype)
    # A row-wise scatter (vmapped: its rows are batch dimensions, so a data-parallel shard
    # writes its own rows without gathering the indices).
    set_target = jax.vmap(jax.vmap(lambda row, t, v: row.at[t].set(v, unique_indices=True)))
    q = set_target(jnp.where(counted[..., None], -e, 0.0).astype(h.dtype), targets, target_entry)
    log_total = jnp.log(total)
    lse = shift + jnp.where(jnp.abs(log_total) <= SHIFT_RANGE, log_total, jnp.nan)
    scale = jnp.where(counted, 1.0 / total, 0.0)
    kept = {"head": (q, scale)}
    if "hidden" in keep:
        kept["hidden"] = scale[..., None] * _dot(q, w, "...v,vd->...d")
    return target_logit, lse, {k: kept[k] for k in keep}


def _head_chunks_fwd(hidden, head, targets, counted, shift):
    # symbolic_zeros: every leaf comes as a CustomVJPPrimal (value, perturbed).
    needed = ("hidden",) if hidden.perturbed else ()
    if any(x.perturbed for x in jax.tree_util.tree_leaves(head)):
        needed += ("head",)
    hidden, head, targets, counted, shift = jax.tree_util.tree_map(
        lambda x: x.value, (hidden, head, targets, counted, shift))
    chunks, n, c = targets.shape
    keep = needed if keeps_softmax_gradient(chunks * c, c, hidden.dtype) else ()
    logps, lse, kept = _head_chunks_forward(hidden, head, targets, counted, keep, shift)
    # Names as a pytree's structure (residuals are arrays): {name: ()}.
    return (logps, lse), (hidden, head, targets, counted, lse, dict.fromkeys(needed, ()), kept)


def _head_chunks_bwd(res, ct):
    hidden, head, targets, counted, lse, needed, kept = res
    ct = ct[0]  # the lse's is zero: token_logps returns it under stop_gradient
    if isinstance(ct, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None, None
    if kept:
        d_head, d_hidden = _kept_cotangents(hidden, head, counted, ct, kept)
    else:
        d_head, d_hidden = _recomputed_cotangents(hidden, head, targets, counted, lse, ct, needed)
    if d_head is not None:
        d_head = jax.tree_util.tree_map(lambda x: d_head.astype(x.dtype), head)
    return d_hidden, d_head, None, None, None


def _kept_cotangents(hidden, head, counted, ct, kept):
    """(∂W float32 or None, ∂h or None) from the forward's Q̃, r (None: 1) and U (chunk by
    chunk, unrolled as the forward kept them)."""
    d_hidden = None
    if "hidden" in kept:
        d_hidden = jnp.stack([ct_k[..., None] * u for ct_k, u in zip(ct, kept["hidden"])]
                             ).astype(hidden.dtype)
    if "head" not in kept:
        return None, d_hidden
    vocab = jax.tree_util.tree_leaves(head)[0].shape[0]
    d_head = jnp.zeros((kept["head"][0][0].shape[-1], hidden.shape[-1]), jnp.float32)
    for (q, scale), h, m, ct_k in zip(kept["head"], hidden, counted, ct):
        d_head = jax.lax.cond(
            jnp.any(m),
            lambda d, q=q, h=h, g=ct_k if scale is None else ct_k * scale: d + head_cotangent(
                q, (g[..., None] * h).astype(h.dtype)),
            lambda d: d, d_head)
    return d_head[:vocab], d_hidden


def _recomputed_cotangents(hidden, head, targets, counted, lse, ct, needed):
    """(∂W float32 or None, ∂h or None), each chunk's logits recomputed."""
    w, vocab = _aligned_head(head, hidden.dtype)

    def chunk(d_head, xs):
        h, tg, m, lse_k, ct_k = xs

        def run():
            g = ct_k[..., None] * _softmax_gradient(logits_from_hidden(h, w), tg, lse_k, vocab)
            d_h = hidden_cotangent(g, w, h.dtype) if "hidden" in needed else None
            return (None if d_head is None else d_head + head_cotangent(g, h)), d_h

        def skip():
            return d_head, (jnp.zeros_like(h) if "hidden" in needed else None)

        return jax.lax.cond(jnp.any(m), run, skip)

    d_head = jnp.zeros(w.shape, jnp.float32) if "head" in needed else None
    d_head, d_hidden = jax.lax.scan(chunk, d_head, (hidden, targets, counted, lse, ct))
    return (None if d_head is None else d_head[:vocab]), d_hidden


_head_chunks_logps.defvjp(_head_chunks_fwd, _head_chunks_bwd, symbolic_zeros=True)


def split_token_logps(
    hidden: jax.Array,
    head: jax.Array,
    e: jax.Array,
    unperturbed_cotangent: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int | None = None,
) -> jax.Array:
    """:func:`token_logps` of the perturbed head W + e, whose derivative is the SAM
    correction alone, exact for tiny e in bf16 matmuls.

    Forward, per token: z = h Wᵀ, δ = h eᵀ (both matmuls in h's dtype with float32
    results: e keeps its own relative precision in bf16), log-probs from z' = z + δ.
    Backward, with c' the incoming cotangent of a token's log-prob and c
    (``unperturbed_cotangent``, (N, T − 1), a constant) the one at e = 0:

        g0 = c (onehot − p),   g' = c' (onehot − p'),   Δg = g' − g0
           = (c' − c)(onehot − p') − c (p' − p),   p' − p = p·expm1(δ − Δlse),
        Δlse = lse(z') − lse(z) = log1p(Σ_v p_v expm1(δ_v))

    (Δg is formed without cancelling p' against p), and

        ∂/∂hidden = Δg W + g' e        ∂/∂head = Δgᵀ h

    the gradients of z' = h (W + e)ᵀ, g' (W + e) and g'ᵀ h, less the plain ones g0 W and
    g0ᵀ h, which the caller takes from :func:`token_logps` at e = 0 with cotangent c (its
    inner gradient): the correction (first order in ρ, ~1e-4 of the gradient at ρ = 1e-4
    on GPT-2) is rounded to bf16 relative to itself, never against the much larger plain
    share, and logits-SAM minus plain descent is the correction alone. ``e`` and the
    unperturbed cotangent get zero cotangents. Shapes and chunking as in :func:`token_logps`.
    """
    cot = jnp.pad(_masked(unperturbed_cotangent.astype(jnp.float32), loss_mask), ((0, 0), (1, 0)))
    return _chunked(lambda h, tg, c: _split_target_logps(h, head, e, c, tg),
                    (hidden,), (cot,), input_ids, loss_mask, chunk_size)


def _dot(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
    """einsum in float32 result, operands as given (cast by the caller)."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=matmul_precision(b))


@jax.custom_vjp
def _split_target_logps(h, head, e, c, targets):
    return target_logps(logits_from_hidden(h, head) + logits_from_hidden(h, e), targets)


def _split_fwd(h, head, e, c, targets):
    z, delta = logits_from_hidden(h, head), logits_from_hidden(h, e)
    return target_logps(z + delta, targets), (h, head, e, c, targets, z, delta)


def _split_bwd(res, ct):
    h, head, e, c, targets, z, delta = res
    p = jax.nn.softmax(z, axis=-1)
    dlse = jnp.log1p(jnp.sum(p * jnp.expm1(delta), axis=-1, keepdims=True))
    dp = p * jnp.expm1(delta - dlse)
    onehot = jax.nn.one_hot(targets, z.shape[-1], dtype=jnp.float32)
    c0, c1 = c[..., None], ct[..., None]
    g_new = c1 * (onehot - p - dp)
    dg = (c1 - c0) * (onehot - p - dp) - c0 * dp
    w = head.astype(h.dtype)
    d_h = (_dot(dg.astype(h.dtype), w, "...v,vd->...d")
           + _dot(g_new.astype(h.dtype), e.astype(h.dtype), "...v,vd->...d")).astype(h.dtype)
    d_head = head_cotangent(dg, h).astype(head.dtype)
    return d_h, d_head, jnp.zeros_like(e), jnp.zeros_like(c), None


_split_target_logps.defvjp(_split_fwd, _split_bwd)


def _chunks(t: int, chunk_size: int | None) -> int | None:
    """Chunks of ``chunk_size`` target positions in sequences of length ``t``; None when
    the head runs over every position at once."""
    if chunk_size is None or chunk_size >= t - 1:
        return None
    if chunk_size < 1:
        raise ValueError(f"--chunk-size must be a positive integer, got {chunk_size}")
    return -(-t // chunk_size)


def _chunk_layout(shifted, aligned, input_ids, loss_mask, chunk_size):
    """(counted, targets, shifted, aligned) laid out in chunks of target positions
    [K, N, c, ...] for :func:`_unchunked`; ``shifted`` and ``aligned`` as in :func:`_chunked`."""
    n, t = input_ids.shape
    chunks = _chunks(t, chunk_size)
    pad = chunks * chunk_size - t

    def pad_right(x):
        return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))

    def split(x):
        return jnp.moveaxis(x.reshape(n, chunks, chunk_size, *x.shape[2:]), 1, 0)

    # Target j is predicted from h_{j−1}: shift h right by one so chunks align with targets.
    # h_{T−1} predicts nothing and is left out: every slot without a target holds zeros.
    h_prev = [jnp.pad(x[:, :-1], ((0, 0), (1, pad)) + ((0, 0),) * (x.ndim - 2))
              for x in shifted]
    counted = pad_right(loss_mask).at[:, 0].set(0) > 0
    return (split(counted), split(pad_right(input_ids)), [split(x) for x in h_prev],
            [split(pad_right(x)) for x in aligned])


def _target_positions(x: jax.Array, t: int) -> jax.Array:
    """Chunked per-target values [K, N, c] back to (N, T − 1), target positions 1..T − 1."""
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1)[:, 1:t]


def _unchunked(logps: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Chunked log-probs [K, N, c] back to the masked (N, T − 1) of target positions 1..T − 1."""
    return _masked(_target_positions(logps, loss_mask.shape[1]), loss_mask)


def _chunked(fn, shifted, aligned, input_ids, loss_mask, chunk_size):
    """Masked ``fn(*h_prev, targets, *aligned)`` (N, T − 1) over target positions 1..T − 1.

    ``shifted`` are (N, T, ...) per-position inputs (the features that predict the next
    token: shifted by one onto their targets); ``aligned`` are (N, T, ...) inputs already
    indexed by target position (entry 0 unused). See :func:`token_logps` for the chunking;
    each chunk is rematerialised in the backward pass.
    """
    if _chunks(input_ids.shape[1], chunk_size) is None:
        logps = fn(*(x[:, :-1] for x in shifted), input_ids[:, 1:], *(x[:, 1:] for x in aligned))
        return _masked(logps, loss_mask)

    @jax.checkpoint
    def chunk(xs):
        m_c, tg_c, hs, al = xs
        return jax.lax.cond(
            jnp.any(m_c),
            lambda: fn(*hs, tg_c, *al),
            lambda: jnp.zeros(tg_c.shape, jnp.float32),
        )

    return _unchunked(jax.lax.map(chunk, _chunk_layout(shifted, aligned, input_ids, loss_mask,
                                                       chunk_size)), loss_mask)


def sequence_logps(
    hidden: jax.Array,
    head: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Summed response log-probs log π(y | x) (N,) and response token counts |y| (N,).

    See :func:`token_logps` for the arguments; both outputs are float32.
    """
    logps = token_logps(hidden, head, input_ids, loss_mask, chunk_size=chunk_size)
    return jnp.sum(logps, axis=-1), response_lengths(loss_mask)


# ---------------------------------------------------------------------------- pair losses


class PairLogps(NamedTuple):
    """Sequence log-probs of a batch of preference pairs, each (B,).

    ``ref_*`` are zeros (and unused) for reference-free losses; ``*_len`` are response
    token counts, used by the length-normalised losses.
    """

    chosen: jax.Array
    rejected: jax.Array
    ref_chosen: jax.Array
    ref_rejected: jax.Array
    chosen_len: jax.Array
    rejected_len: jax.Array

    def per_token(self) -> "PairLogps":
        """The same pairs with every log-prob divided by its response length (≥ 1)."""
        c = jnp.maximum(self.chosen_len, 1.0)
        r = jnp.maximum(self.rejected_len, 1.0)
        return self._replace(
            chosen=self.chosen / c,
            rejected=self.rejected / r,
            ref_chosen=self.ref_chosen / c,
            ref_rejected=self.ref_rejected / r,
        )


def log_ratio_margin(p: PairLogps) -> jax.Array:
    """Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), (B,).

    The DPO margin is β·Δ (paper eq. 2); every reference-based loss goes through here.
    """
    return (p.chosen - p.ref_chosen) - (p.rejected - p.ref_rejected)


def _smoothed_sigmoid(x: jax.Array, eps: float, robust: bool) -> jax.Array:
    pos, neg = -jax.nn.log_sigmoid(x), -jax.nn.log_sigmoid(-x)
    if robust:
        return ((1.0 - eps) * pos - eps * neg) / (1.0 - 2.0 * eps)
    return (1.0 - eps) * pos + eps * neg


def dpo(p: PairLogps, *, beta: float) -> jax.Array:
    return -jax.nn.log_sigmoid(beta * log_ratio_margin(p))


def cdpo(p: PairLogps, *, beta: float, label_smoothing: float) -> jax.Array:
    return _smoothed_sigmoid(beta * log_ratio_margin(p), label_smoothing, robust=False)


def robust(p: PairLogps, *, beta: float, label_smoothing: float) -> jax.Array:
    return _smoothed_sigmoid(beta * log_ratio_margin(p), label_smoothing, robust=True)


def ipo(p: PairLogps, *, beta: float) -> jax.Array:
    return jnp.square(log_ratio_margin(p.per_token()) - 1.0 / (2.0 * beta))


def hinge(p: PairLogps, *, beta: float) -> jax.Array:
    return jax.nn.relu(1.0 - beta * log_ratio_margin(p))


def dpop(p: PairLogps, *, beta: float, lam: float) -> jax.Array:
    penalty = lam * jax.nn.relu(p.ref_chosen - p.chosen)
    return -jax.nn.log_sigmoid(beta * (log_ratio_margin(p) - penalty))


def slic(p: PairLogps, *, delta: float, lam: float) -> jax.Array:
    return jax.nn.relu(delta - p.chosen + p.rejected) - lam * p.chosen


def cpo(p: PairLogps, *, beta: float, lam: float) -> jax.Array:
    return -jax.nn.log_sigmoid(beta * p.chosen - beta * p.rejected) - lam * p.chosen


def simpo(p: PairLogps, *, beta: float, gamma: float) -> jax.Array:
    q = p.per_token()
    return -jax.nn.log_sigmoid(beta * q.chosen - beta * q.rejected - gamma)


# ------------------------------------------------------------------------------ registry


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


_CHECKS: dict[str, tuple[Callable[[float], bool], str]] = {
    "beta": (_positive, "> 0"),
    "lam": (_non_negative, ">= 0"),
    "delta": (_non_negative, ">= 0"),
    "gamma": (_non_negative, ">= 0"),
    "label_smoothing": (lambda v: 0 <= v <= 0.5, "in [0, 0.5]"),
}


@dataclasses.dataclass(frozen=True)
class Loss:
    """A preference loss with its hyper-parameters bound.

    Attributes:
      name: registry name.
      fn: ``fn(PairLogps, **hparams) -> (B,)`` per-pair losses.
      hparams: the bound hyper-parameters.
      reference_free: the loss never reads ``ref_*``.
      length_normalized: the loss compares per-token log-probs; rewards follow suit.
    """

    name: str
    fn: Callable[..., jax.Array]
    hparams: Mapping[str, float]
    reference_free: bool
    length_normalized: bool

    def __call__(self, logps: PairLogps) -> jax.Array:
        return self.fn(logps, **self.hparams)

    def metrics(self, logps: PairLogps, losses: jax.Array) -> dict[str, jax.Array]:
        """TRL-named batch means: implicit rewards, accuracies, log-probs, loss.

        Rewards are β(log π − log π_ref), or β log π for reference-free losses, with
        per-token log-probs for the length-normalised losses (ipo, simpo) and β = 1 for
        losses without one (slic). ``logps/*`` are always the summed sequence log-probs
        log π(y | x): their fall for the chosen responses is the squeezing effect.
        """
        scale = self.hparams.get("beta", 1.0)
        q = logps.per_token() if self.length_normalized else logps
        if self.reference_free:
            rc, rr = scale * q.chosen, scale * q.rejected
        else:
            rc, rr = scale * (q.chosen - q.ref_chosen), scale * (q.rejected - q.ref_rejected)
        return {
            "loss": jnp.mean(losses),
            "rewards/chosen": jnp.mean(rc),
            "rewards/rejected": jnp.mean(rr),
            "rewards/margins": jnp.mean(rc - rr),
            "rewards/accuracies": jnp.mean((rc > rr).astype(jnp.float32)),
            "logps/chosen": jnp.mean(logps.chosen),
            "logps/rejected": jnp.mean(logps.rejected),
        }


@dataclasses.dataclass(frozen=True)
class _Spec:
    fn: Callable[..., jax.Array]
    defaults: Mapping[str, float]
    reference_free: bool = False
    length_normalized: bool = False
    checks: Mapping[str, tuple[Callable[[float], bool], str]] = dataclasses.field(
        default_factory=dict
    )


# Defaults: β = 0.1 as in the DPO paper / TRL; SLiC-HF δ = 1, λ = 0.1 and CPO λ = 1, β = 0.1
# from the paper's Table 5 grids; SimPO β = 2, γ = 1 (Meng et al.'s γ/β = 0.5); DPOP
# λ = 50 (Pal et al.); cDPO / robust ε = 0.1.
LOSSES: dict[str, _Spec] = {
    "dpo": _Spec(dpo, {"beta": 0.1}),
    "cdpo": _Spec(cdpo, {"beta": 0.1, "label_smoothing": 0.1}),
    "robust": _Spec(
        robust,
        {"beta": 0.1, "label_smoothing": 0.1},
        checks={"label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)")},
    ),
    "ipo": _Spec(ipo, {"beta": 0.1}, length_normalized=True),
    "hinge": _Spec(hinge, {"beta": 0.1}),
    "dpop": _Spec(dpop, {"beta": 0.1, "lam": 50.0}),
    "slic": _Spec(slic, {"delta": 1.0, "lam": 0.1}, reference_free=True),
    "cpo": _Spec(cpo, {"beta": 0.1, "lam": 1.0}, reference_free=True),
    "simpo": _Spec(
        simpo, {"beta": 2.0, "gamma": 1.0}, reference_free=True, length_normalized=True
    ),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def get_loss(name: str, **hparams: Any) -> Loss:
    """The loss ``name`` with its defaults overridden by ``hparams``.

    Raises:
      ValueError: one line naming the flag: unknown loss, a hyper-parameter the loss does
        not take, or a value out of range (β ≤ 0, λ < 0, ε outside [0, 0.5] for cdpo or
        [0, 0.5) for robust, non-finite).
    """
    spec = LOSSES.get(name)
    if spec is None:
        raise ValueError(f"--loss: unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    unknown = sorted(set(hparams) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"{_flag(unknown[0])}: loss {name!r} takes no {unknown[0]!r}; "
            f"its hyper-parameters are {', '.join(spec.defaults)}"
        )
    bound: dict[str, float] = {}
    for key, default in spec.defaults.items():
        value = hparams.get(key, default)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{_flag(key)}: expected a number, got {value!r}") from None
        ok, rule = spec.checks.get(key, _CHECKS[key])
        if not math.isfinite(value) or not ok(value):
            raise ValueError(f"{_flag(key)} must be {rule} for loss {name!r}, got {value}")
        bound[key] = value
    return Loss(name, spec.fn, bound, spec.reference_free, spec.length_normalized)
