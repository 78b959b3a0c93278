"""Squeezing diagnostics: output-layer gradient geometry and Hessian traces.

Gradient inner products (margin-pitfalls §3-4, condition (7), Figure 4). With logits
z_t = W h_t (W: (V, d), h_t: (d,)), p_t = softmax(z_t) and a_t = e_{y_t} − p_t,

    ∇_W log p_t(y_t) = a_t h_tᵀ,        ∇_W log π(y) = Σ_t m_t a_t h_tᵀ,

so for a chosen response (h_t, p_t, y_t) and a rejected one (k_s, q_s, y'_s), with
b_s = e_{y'_s} − q_s, the Frobenius products never need a V×d matrix:

    ⟨a_t h_tᵀ, b_s k_sᵀ⟩_F = (a_t·b_s)(h_t·k_s),
    a_t·b_s = [y_t = y'_s] − q_s[y_t] − p_t[y'_s] + p_t·q_s.

The (t, s) matrix of these is the token-by-token map of margin-pitfalls Figure 4b; its
sum is ⟨∇_W log π_w, ∇_W log π_l⟩ and the same formula on (w, w) and (l, l) gives the
norms. Cost O(T² (V + d)), memory O(T V + T²).

One-step effect of logits-SAM (paper Thm 3.2, Cor 3.6, in the language model). One
descent step θ' = θ − η G(θ; ρ) with the logits-SAM gradient G (``G(θ; 0) = ∇L``)
moves a log-prob functional F (the mean log π(y_w) or log π(y_l) of a batch) by

    F(θ') − F(θ) = −η ∇Fᵀ∇L − η ρ ∇Fᵀ ∂_ρG + O(η²),    ∂_ρG = ∇_θ ⟨∇_W L(h(θ), W(θ)), ê⟩,

with ê = ∇_W L/‖∇_W L‖ held fixed. ``sam`` = −∇Fᵀ∂_ρG is the first-order change per
unit ηρ: positive means ρ > 0 raises F relative to plain descent (for the chosen
log-prob: mitigates the squeeze). For the head-only step (trunk features fixed, the
setting of Theorem 3.2) ∂_ρG = ∇²_W L ê, and with the loss written through per-pair
weights c_r = ∂L/∂log π_r of each response r,

    ∇²_W L ê = Σ_r c_r ∇²_W log π_r ê  +  Σ_{r,r'} (∂²L/∂log π_r ∂log π_r') (∇ log π_r'·ê) ∇ log π_r,

the first sum (``curvature``) is Theorem 3.2's correction −Σ_t c_t H_z,t (ê h_t) h_tᵀ,
one term per token t; the second (``weight``) is the change of the pair weights
(σ(−βΔ) for DPO) at the perturbed point, which the theory's fixed ±η per response does
not have. ``self`` is the part of ``curvature`` in which each token's correction acts
on that token's own logits (the one-example mechanism of Cor 3.6); the rest couples
tokens through the feature kernel h_t·h_s.

Hessian traces (logits-SAM paper §4.3): Hutchinson's estimator
tr H = E_v[vᵀ H v] with Rademacher v, each vᵀHv from one Hessian-vector product
(``jax.jvp`` of ``jax.grad``), for the loss as a function of (a) the output layer with
the trunk features held fixed, (b) all parameters, (c) the logits of every token.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from dynamics.sam import sam_perturbation
from dynamics.softmax_regression import logit_hessian_vp
from lm import losses
from lm.models import logits_from_hidden, output_head
from lm.objectives import batch_hidden, flatten_pairs, pair_logps, reference_logps, split_pairs

PyTree = Any

#: The Hessians :func:`hessian_traces` can estimate.
HESSIANS = ("head", "params", "logits")


def token_gradient_products(
    h: jax.Array, p: jax.Array, y: jax.Array, k: jax.Array, q: jax.Array, y2: jax.Array
) -> jax.Array:
    """M[t, s] = ⟨∇_W log p_t(y_t), ∇_W log q_s(y2_s)⟩_F = (a_t·b_s)(h_t·k_s).

    Args:
      h: (T, d) features of the first sequence; p: (T, V) its next-token probabilities;
        y: (T,) its target ids.
      k, q, y2: the same for the second sequence, (S, d), (S, V), (S,).

    Returns:
      (T, S).
    """
    ab = (
        (y[:, None] == y2[None, :]).astype(p.dtype)
        - jnp.take(q, y, axis=-1).T
        - jnp.take(p, y2, axis=-1)
        + p @ q.T
    )
    return ab * (h @ k.T)


def token_gradient_norms(h: jax.Array, p: jax.Array, y: jax.Array) -> jax.Array:
    """‖a_t h_tᵀ‖_F = ‖a_t‖ ‖h_t‖ with ‖a_t‖² = 1 − 2 p_t[y_t] + ‖p_t‖²; (T,)."""
    py = jnp.take_along_axis(p, y[:, None], axis=-1)[:, 0]
    a2 = 1.0 - 2.0 * py + jnp.sum(p * p, axis=-1)
    return jnp.sqrt(jnp.maximum(a2, 0.0) * jnp.sum(h * h, axis=-1))


def _safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def pair_gradient_products(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array
) -> dict[str, jax.Array]:
    """Output-layer gradient geometry of one (chosen, rejected) pair.

    Args:
      hidden: (2, T, d) features that predict each target ([0] chosen, [1] rejected).
      head: (V, d) output layer W.
      targets: (2, T) int target ids.
      mask: (2, T) 1 on response tokens whose log-prob counts in log π.

    Returns:
      ``inner`` ⟨∇_W log π_w, ∇_W log π_l⟩_F, ``norm_chosen``, ``norm_rejected``,
      ``cosine``, ``token_inner`` (T, T) with entry (t, s) for chosen token t and
      rejected token s (zero off the response), and ``token_cosine`` (T, T), the same
      normalised by the per-token gradient norms (Figure 4b of margin-pitfalls).
    """
    m = mask.astype(hidden.dtype)
    p = jax.nn.softmax(hidden @ head.T.astype(hidden.dtype), axis=-1)

    def gram(i, j):
        return token_gradient_products(hidden[i], p[i], targets[i], hidden[j], p[j], targets[j])

    outer = m[0][:, None] * m[1][None, :]
    cross = gram(0, 1) * outer
    sq_w = jnp.sum(gram(0, 0) * (m[0][:, None] * m[0][None, :]))
    sq_l = jnp.sum(gram(1, 1) * (m[1][:, None] * m[1][None, :]))
    norm_w = jnp.sqrt(jnp.maximum(sq_w, 0.0))
    norm_l = jnp.sqrt(jnp.maximum(sq_l, 0.0))
    inner = jnp.sum(cross)
    token_norms = [token_gradient_norms(hidden[i], p[i], targets[i]) for i in (0, 1)]
    return {
        "inner": inner,
        "norm_chosen": norm_w,
        "norm_rejected": norm_l,
        "cosine": _safe_divide(inner, norm_w * norm_l),
        "token_inner": cross,
        "token_cosine": _safe_divide(cross, token_norms[0][:, None] * token_norms[1][None, :])
        * outer,
    }


def rademacher_like(key: jax.Array, tree: PyTree) -> PyTree:
    """A pytree of independent ±1 entries shaped and typed like ``tree``."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef,
        [jax.random.rademacher(k, x.shape, dtype=x.dtype) for k, x in zip(keys, leaves)],
    )


def hvp(f: Callable[[PyTree], jax.Array], x: PyTree, v: PyTree) -> PyTree:
    """H_f(x) v by forward-over-reverse: ``jvp`` of ``grad``."""
    return jax.jvp(jax.grad(f), (x,), (v,))[1]


def _tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(jnp.vdot(u, w) for u, w in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def hutchinson_trace(
    f: Callable[[PyTree], jax.Array], x: PyTree, key: jax.Array, num_probes: int
) -> dict[str, jax.Array]:
    """Hutchinson estimate of tr ∇²f(x): mean of vᵀ H v over Rademacher probes v.

    Each probe is one Hessian-vector product; probes run sequentially (``lax.map``) so
    memory is that of a single HVP. ``num_probes`` ≥ 2.

    Returns:
      ``trace`` (the mean), ``stderr`` (sample std / √n) and ``samples`` (n,).
    """
    if num_probes < 2:
        raise ValueError(f"num_probes must be >= 2 for a standard error, got {num_probes}")

    def quad(k):
        v = rademacher_like(k, x)
        return _tree_vdot(v, hvp(f, x, v))

    samples = jax.lax.map(quad, jax.random.split(key, num_probes))
    return {
        "trace": jnp.mean(samples),
        "stderr": jnp.std(samples, ddof=1) / jnp.sqrt(num_probes),
        "samples": samples,
    }


# ------------------------------------------------------------------ on a decoder and a batch


def gradient_products(cfg, params: PyTree, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """:func:`pair_gradient_products` for every pair of a [B, 2, T] batch.

    Uses the log-prob alignment of :func:`lm.losses.token_logps`: h_t predicts token
    t + 1, counted where ``loss_mask[t + 1]`` is set; so ``token_*`` are (B, T−1, T−1)
    with index t standing for response token t + 1.
    """
    ids, attn, mask = flatten_pairs(batch)
    hidden = batch_hidden(cfg, params, ids, attn).astype(jnp.float32)
    head = output_head(cfg, params).astype(jnp.float32)
    b, t = ids.shape[0] // 2, ids.shape[1]
    return jax.vmap(pair_gradient_products, in_axes=(0, None, 0, 0))(
        hidden[:, :-1].reshape(b, 2, t - 1, -1),
        head,
        ids[:, 1:].reshape(b, 2, t - 1),
        mask[:, 1:].reshape(b, 2, t - 1),
    )


def _pair_objective(cfg, params, batch, ref_params, loss, loss_kwargs, head_dtype=None):
    """``loss_of_logps(logps (2B,)) -> mean pair loss`` of ``batch``, with the reference
    log-probs (from ``ref_params``, or ``params`` when None, through a head of
    ``head_dtype`` as the caller's policy log-probs) and lengths held constant."""
    objective = losses.get_loss(loss, **dict(loss_kwargs or {}))
    counts = losses.response_lengths(flatten_pairs(batch)[2])
    if objective.reference_free:
        ref = jnp.zeros(counts.shape, jnp.float32)
    else:
        ref = reference_logps(cfg, params if ref_params is None else ref_params, batch,
                              head_dtype=head_dtype)
    ref = jax.lax.stop_gradient(ref)

    def loss_of_logps(logps):
        return jnp.mean(objective(pair_logps(logps, ref, counts)))

    return loss_of_logps


def hessian_traces(
    cfg,
    params: PyTree,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    *,
    ref_params: PyTree | None = None,
    loss: str = "dpo",
    loss_kwargs: Mapping[str, Any] | None = None,
    num_probes: int = 16,
    which: Sequence[str] = HESSIANS,
) -> dict[str, dict[str, jax.Array]]:
    """Hutchinson traces of the preference loss's Hessian (mean loss over the batch's pairs).

    ``which`` picks among:
      head    ∇²_W L(sg(h), W): the output layer with the trunk features fixed (the
              space logits-SAM perturbs; for tied models, the head use of the embedding);
      params  ∇²_θ L(θ): every parameter;
      logits  ∇²_z L(z): the logits z (2B, T, V) of every position, as free variables
              (only response positions contribute).

    The reference log-probs (from ``ref_params``, or ``params`` when None) are constants.
    Each entry is ``{"trace", "stderr", "samples"}`` from :func:`hutchinson_trace`, all
    with the same ``key`` and ``num_probes``.
    """
    unknown = sorted(set(which) - set(HESSIANS))
    if unknown:
        raise ValueError(f"--hessians: unknown {unknown[0]!r}; choose from {', '.join(HESSIANS)}")
    ids, attn, mask = flatten_pairs(batch)
    loss_of_logps = _pair_objective(cfg, params, batch, ref_params, loss, loss_kwargs)

    def loss_of_head(hidden, head):
        return loss_of_logps(losses.sequence_logps(hidden, head, ids, mask)[0])

    def loss_of_params(p):
        return loss_of_head(batch_hidden(cfg, p, ids, attn), output_head(cfg, p))

    out = {}
    if "head" in which:
        hidden = jax.lax.stop_gradient(batch_hidden(cfg, params, ids, attn))
        out["head"] = hutchinson_trace(
            lambda w: loss_of_head(hidden, w), output_head(cfg, params), key, num_probes)
    if "params" in which:
        out["params"] = hutchinson_trace(loss_of_params, params, key, num_probes)
    if "logits" in which:
        z = logits_from_hidden(batch_hidden(cfg, params, ids, attn), output_head(cfg, params))
        out["logits"] = hutchinson_trace(
            lambda zz: loss_of_logps(losses.sequence_logps_from_logits(zz, ids, mask)), z, key,
            num_probes)
    return out


def sam_step_effects(
    cfg,
    params: PyTree,
    batch: Mapping[str, jax.Array],
    *,
    ref_params: PyTree | None = None,
    loss: str = "dpo",
    loss_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, jax.Array]:
    """First-order effect of logits-SAM on the batch's log-probs after one descent step.

    See the module docstring for the expansion. For each response side ``s`` in
    (chosen, rejected), with F_s the batch mean of log π(y_s):

      ``gd/s``              −∇_W F_sᵀ ∇_W L: change per unit η of a plain head-only step;
      ``sam/s``             −∇_W F_sᵀ ∇²_W L ê: change per unit ηρ that logits-SAM adds
                            to the head-only step (> 0: ρ > 0 raises F_s);
      ``sam/s/curvature``   its part through the token logit Hessians (Thm 3.2);
      ``sam/s/weight``      its part through the pair weights (``sam − curvature``);
      ``sam/s/self``        the part of ``curvature`` of each token on itself (Cor 3.6);
      ``params/gd/s``, ``params/sam/s``  the same two for a step of every parameter
                            (the logits-SAM gradient also reaches the trunk through h).

    The reference log-probs come from ``ref_params`` (``params`` when None). Every term,
    the reference's included, reads the trunk's output in float32 through a float32 head,
    whatever the compute dtype. The ``self`` term holds every token's probabilities at once:
    (2B·T, V) floats.
    """
    ids, attn, mask = flatten_pairs(batch)
    # The policy's log-probs below, of the head and of every parameter, go through a float32
    # head; so do the reference's, or under bf16 compute the margin would not be 0 at
    # ref_params = params.
    loss_of_logps = _pair_objective(cfg, params, batch, ref_params, loss, loss_kwargs,
                                    head_dtype="float32")

    def logps_of(hidden, head):
        return losses.sequence_logps(hidden, head, ids, mask)[0]

    def side_means(logps):
        chosen, rejected = split_pairs(logps)
        return {"chosen": jnp.mean(chosen), "rejected": jnp.mean(rejected)}

    def float32_hidden(p_):
        return batch_hidden(cfg, p_, ids, attn).astype(jnp.float32)

    def float32_head(p_):
        return output_head(cfg, p_).astype(jnp.float32)

    def params_logps(p_):
        return logps_of(float32_hidden(p_), float32_head(p_))

    hidden = jax.lax.stop_gradient(float32_hidden(params))
    head = float32_head(params)

    def head_loss(w):
        return loss_of_logps(logps_of(hidden, w))

    grad_w = jax.grad(head_loss)(head)
    e_hat = jax.lax.stop_gradient(sam_perturbation(grad_w, 1.0))
    correction = hvp(head_loss, head, e_hat)
    # The curvature term alone: the loss linearised in the log-probs at the current weights.
    weights = jax.grad(loss_of_logps)(logps_of(hidden, head))
    curvature = hvp(lambda w: jnp.vdot(weights, logps_of(hidden, w)), head, e_hat)

    # Per-token self term: c_t u_tᵀ H_t (ê h_t) ‖h_t‖² / B, u_t = e_{y_t} − p_t (B ∂F_s/∂z_t).
    h_prev = hidden[:, :-1]
    targets = ids[:, 1:]
    counted = (mask[:, 1:] > 0).astype(jnp.float32)
    p = jax.nn.softmax(logits_from_hidden(h_prev, head).astype(jnp.float32), axis=-1)
    dz = logits_from_hidden(h_prev, e_hat).astype(jnp.float32)
    h_dz = logit_hessian_vp(p, dz)
    u = jax.nn.one_hot(targets, head.shape[0]) - p
    n_pairs = ids.shape[0] // 2
    per_token = (weights[:, None] * counted * jnp.sum(u * h_dz, axis=-1)
                 * jnp.sum(h_prev * h_prev, axis=-1) / n_pairs)
    self_term = dict(zip(("chosen", "rejected"), split_pairs(jnp.sum(per_token, axis=-1))))

    def model_loss(p_):
        return loss_of_logps(params_logps(p_))

    def directional(p_):
        h_p = float32_hidden(p_)
        return jax.jvp(lambda w: loss_of_logps(logps_of(h_p, w)), (float32_head(p_),),
                       (e_hat,))[1]

    grad_params = jax.grad(model_loss)(params)
    d_rho_params = jax.grad(directional)(params)

    out = {}
    for side in ("chosen", "rejected"):
        grad_f = jax.grad(lambda w: side_means(logps_of(hidden, w))[side])(head)
        sam = -jnp.vdot(grad_f, correction)
        curv = -jnp.vdot(grad_f, curvature)
        grad_fp = jax.grad(lambda p_: side_means(params_logps(p_))[side])(params)
        out.update({
            f"gd/{side}": -jnp.vdot(grad_f, grad_w),
            f"sam/{side}": sam,
            f"sam/{side}/curvature": curv,
            f"sam/{side}/weight": sam - curv,
            f"sam/{side}/self": jnp.sum(self_term[side]),
            f"params/gd/{side}": -_tree_vdot(grad_fp, grad_params),
            f"params/sam/{side}": -_tree_vdot(grad_fp, d_rho_params),
        })
    return out
