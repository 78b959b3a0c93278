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

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


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
