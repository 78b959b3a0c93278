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

Hessian traces (logits-SAM paper §4.3): Hutchinson's estimator
tr H = E_v[vᵀ H v] with Rademacher v, each vᵀHv from one Hessian-vector product
(``jax.jvp`` of ``jax.grad``), for the loss as a function of (a) the output layer with
the trunk features held fixed, (b) all parameters, (c) the logits of every token.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from lm import losses
from lm.models import forward_hidden, logits_from_hidden, output_head
from lm.objectives import flatten_pairs, reference_logps, split_pairs

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
    hidden = forward_hidden(cfg, params, ids, attn).astype(jnp.float32)
    head = output_head(cfg, params).astype(jnp.float32)
    b, t = ids.shape[0] // 2, ids.shape[1]
    return jax.vmap(pair_gradient_products, in_axes=(0, None, 0, 0))(
        hidden[:, :-1].reshape(b, 2, t - 1, -1),
        head,
        ids[:, 1:].reshape(b, 2, t - 1),
        mask[:, 1:].reshape(b, 2, t - 1),
    )


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
    objective = losses.get_loss(loss, **dict(loss_kwargs or {}))
    ids, attn, mask = flatten_pairs(batch)
    counts = losses.response_lengths(mask)
    if objective.reference_free:
        ref = jnp.zeros(counts.shape, jnp.float32)
    else:
        ref = reference_logps(cfg, params if ref_params is None else ref_params, batch)
    ref = jax.lax.stop_gradient(ref)

    def loss_of_logps(logps):
        pairs = losses.PairLogps(*split_pairs(logps), *split_pairs(ref), *split_pairs(counts))
        return jnp.mean(objective(pairs))

    def loss_of_head(hidden, head):
        return loss_of_logps(losses.sequence_logps(hidden, head, ids, mask)[0])

    def loss_of_params(p):
        return loss_of_head(forward_hidden(cfg, p, ids, attn), output_head(cfg, p))

    out = {}
    if "head" in which:
        hidden = jax.lax.stop_gradient(forward_hidden(cfg, params, ids, attn))
        out["head"] = hutchinson_trace(
            lambda w: loss_of_head(hidden, w), output_head(cfg, params), key, num_probes)
    if "params" in which:
        out["params"] = hutchinson_trace(loss_of_params, params, key, num_probes)
    if "logits" in which:
        z = logits_from_hidden(forward_hidden(cfg, params, ids, attn), output_head(cfg, params))
        out["logits"] = hutchinson_trace(
            lambda zz: loss_of_logps(losses.sequence_logps_from_logits(zz, ids, mask)), z, key,
            num_probes)
    return out
