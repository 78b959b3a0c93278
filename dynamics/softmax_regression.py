"""Fixed-feature softmax regression (paper §3.1) and its curvature (Prop 3.1 / A.1, Prop 3.3).

    z = W φ ∈ R^V,   p = softmax(z),   g = p − y,   f(z, y) = −Σ_k y_k log p_k

with W ∈ R^{V×d}, φ ∈ R^d, y one-hot. Everything takes arbitrary leading batch axes on
φ / z / p / y, and is correct in float32 and float64 (enable ``jax_enable_x64``).

Flattening convention: vec(W) is row-major (index v·d + i), which is what
``W.reshape(-1)`` and ``jax.hessian`` give; in it H_W = H_z ⊗ φφᵀ (Prop 3.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def logits(W: jax.Array, phi: jax.Array) -> jax.Array:
    """z = W φ, batched: φ (..., d), W (V, d) → z (..., V)."""
    return phi @ W.T


def cross_entropy(z: jax.Array, y: jax.Array) -> jax.Array:
    """f(z, y) = −Σ_k y_k log softmax(z)_k per example: z, y (..., V) → (...)."""
    return -jnp.sum(y * jax.nn.log_softmax(z, axis=-1), axis=-1)


def residual(z: jax.Array, y: jax.Array) -> jax.Array:
    """g = ∇_z f = p − y (..., V); 1ᵀg = 0 (Prop 3.3)."""
    return jax.nn.softmax(z, axis=-1) - y


def loss(W: jax.Array, phi: jax.Array, y: jax.Array) -> jax.Array:
    """Mean cross-entropy of the batch: F(W) = mean_n f(W φ_n, y_n)."""
    return jnp.mean(cross_entropy(logits(W, phi), y))


def head_loss(phi: jax.Array, W: jax.Array, y: jax.Array) -> jax.Array:
    """:func:`loss` in the ``loss_fn(hidden, head, *args)`` form of :mod:`dynamics.sam`."""
    return loss(W, phi, y)


def logit_hessian(p: jax.Array) -> jax.Array:
    """H_z = diag(p) − p pᵀ (..., V, V), the Hessian of f in z for any label."""
    return jnp.einsum("...i,ij->...ij", p, jnp.eye(p.shape[-1], dtype=p.dtype)) - (
        p[..., :, None] * p[..., None, :]
    )


def logit_hessian_vp(p: jax.Array, v: jax.Array) -> jax.Array:
    """H_z v = p ⊙ v − p (pᵀv) (..., V) without forming the V×V matrix."""
    return p * v - p * jnp.sum(p * v, axis=-1, keepdims=True)


def param_hessian(p: jax.Array, phi: jax.Array) -> jax.Array:
    """H_W = H_z ⊗ φφᵀ (V·d, V·d) for one example (Prop 3.1), row-major vec(W)."""
    return jnp.kron(logit_hessian(p), jnp.outer(phi, phi))


def T_phi(dW: jax.Array, phi: jax.Array) -> jax.Array:
    """T_φ(ΔW) = ΔW φ: the logit perturbation a parameter perturbation induces."""
    return dW @ phi


def T_phi_adjoint(v: jax.Array, phi: jax.Array) -> jax.Array:
    """T_φ*(v) = v φᵀ, the adjoint of T_φ under the Frobenius inner product."""
    return jnp.outer(v, phi)


def param_hessian_vp(p: jax.Array, phi: jax.Array, dW: jax.Array) -> jax.Array:
    """H_W[ΔW] = T_φ*(H_z T_φ(ΔW)) = H_z ΔW φφᵀ without forming the (V·d)² matrix."""
    return T_phi_adjoint(logit_hessian_vp(p, T_phi(dW, phi)), phi)


def ones_complement_basis(V: int, dtype=jnp.float32) -> jax.Array:
    """Orthonormal basis Q (V, V−1) of 1^⊥, deterministic.

    QR of the centring matrix I − 11ᵀ/V: any V−1 of its columns are independent and span
    1^⊥, so the first V−1 columns of Q are an orthonormal basis of it.
    """
    q, _ = jnp.linalg.qr(jnp.eye(V, dtype=dtype) - jnp.full((V, V), 1.0 / V, dtype=dtype))
    return q[:, : V - 1]


def eigenbasis(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenpairs of H_z restricted to 1^⊥ (Prop 3.3 / Cor 3.4).

    H_z maps 1^⊥ to itself; diagonalising Qᵀ H_z Q in an orthonormal basis Q of 1^⊥
    excludes the kernel span{1} exactly, even when some λ_k are tiny.

    Returns:
      lam (..., V−1) in descending order (λ_1 is the highest-curvature mode) and
      v (..., V, V−1) with orthonormal columns in 1^⊥, each signed so that its entry of
      largest magnitude is positive (a deterministic choice; see :func:`align_signs`).
    """
    V = p.shape[-1]
    Q = ones_complement_basis(V, p.dtype)
    lam, u = jnp.linalg.eigh(jnp.einsum("ia,...ij,jb->...ab", Q, logit_hessian(p), Q))
    lam, u = lam[..., ::-1], u[..., ::-1]
    v = jnp.einsum("ia,...ab->...ib", Q, u)
    idx = jnp.argmax(jnp.abs(v), axis=-2, keepdims=True)
    sign = jnp.sign(jnp.take_along_axis(v, idx, axis=-2))
    return lam, v * jnp.where(sign == 0, 1.0, sign)


def align_signs(v: jax.Array, reference: jax.Array) -> jax.Array:
    """Flip each eigenvector column of ``v`` to agree with ``reference`` (continuity in time)."""
    dots = jnp.sum(v * reference, axis=-2, keepdims=True)
    return v * jnp.where(dots < 0, -1.0, 1.0)


def modal_coefficients(g: jax.Array, v: jax.Array) -> jax.Array:
    """e_k = v_kᵀ g (eq. 4): g (..., V), v (..., V, V−1) → (..., V−1)."""
    return jnp.einsum("...ik,...i->...k", v, g)
