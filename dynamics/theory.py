"""One-step predictions of the squeezing theory (paper §3.2 and Appendix A).

One example: features φ (d,), one-hot label y (V,), head W (V, d), signed step η and
signed radius ρ. With z = Wφ, p = softmax(z), g = p − y, H_z = diag(p) − ppᵀ, μ = ‖φ‖²
and the equivalent perturbation coefficient

    ρ̃ = ρ √μ / ‖g‖      (ρ̃ = 0 when ‖g‖ = 0, Thm A.2 (3)),

one SAM step W⁺ = W − η ∇F(W + ρ ∇F/‖∇F‖) (``dynamics.sam.head_step``; ρ = 0 is GD)
satisfies, with O(η²) remainders when |ρ| ≤ κ√|η| (Thm 3.2 / A.2):

    W⁺ ≈ W − η (g + ρ̃ H_z g) φᵀ
    z⁺ ≈ z − ημ (g + ρ̃ H_z g)
    g⁺ ≈ (I − ημ H_z − ημρ̃ H_z²) g
    e_k⁺ := v_kᵀ g⁺ ≈ (1 − ημ[λ_k + ρ̃ λ_k²]) e_k          (Cor 3.4, eq. 5)

where (λ_k, v_k) are the eigenpairs of H_z on 1^⊥. The one-step confidence ratios
α_i = p_i⁺ / p_i (Lemma 3.5, Cor 3.6 / A.5) are computed exactly from the actual step, and
predicted by the β-representation of Cor A.5 from the first-order logit step.

Everything here is a pure function of one example; ``jax.vmap`` it over instances and
over (η, ρ) grids. Shapes are static, so it jits once per (V, d).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dynamics import softmax_regression as sr
from dynamics.sam import head_step


class Step(NamedTuple):
    """The state after one step, in every space the theory tracks.

    ``modes`` are e_k⁺ = v_kᵗᵀ g⁺ in the eigenbasis of the *current* H_zᵗ (eq. 4).
    """

    W: jax.Array  # (V, d)
    z: jax.Array  # (V,)
    g: jax.Array  # (V,)
    modes: jax.Array  # (V - 1,)


class Remainders(NamedTuple):
    """‖actual − predicted‖ for one step: Frobenius for W, ℓ2 for z and g, ℓ∞ over modes."""

    W: jax.Array
    z: jax.Array
    g: jax.Array
    modes: jax.Array


class ConfidenceRatios(NamedTuple):
    """Exact one-step ratios α_i = p_i⁺/p_i (V,) under GD and SAM, and the classes they concern."""

    gd: jax.Array  # (V,)
    sam: jax.Array  # (V,)
    label: jax.Array  # () index of y (y⁺ for η > 0, y⁻ for η < 0)
    y_star: jax.Array  # () most confident incorrect class
    p: jax.Array  # (V,) current probabilities


def feature_scale(phi: jax.Array) -> jax.Array:
    """μ = ‖φ‖²."""
    return jnp.sum(jnp.square(phi))


def rho_tilde(g: jax.Array, mu: jax.Array, rho: float | jax.Array) -> jax.Array:
    """ρ̃ = ρ√μ/‖g‖ with the convention ρ̃ = 0 when ‖g‖ = 0 (Thm A.2 (3))."""
    sq = jnp.sum(jnp.square(g))
    # sqrt of a guarded square keeps the gradient finite at g = 0 (norm's is NaN there).
    norm = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))
    return jnp.where(sq > 0, rho * jnp.sqrt(mu) / norm, 0.0)


def most_confident_incorrect(p: jax.Array, y: jax.Array) -> jax.Array:
    """y* = argmax_{j ≠ y} p_j for one-hot y: p, y (..., V) → (...)."""
    return jnp.argmax(jnp.where(y > 0, -jnp.inf, p), axis=-1)


def _logit_direction(phi, y, W, rho):
    """The direction g + ρ̃ H_z g of the first-order step Δz = −ημ(g + ρ̃ H_z g), and the
    quantities it uses."""
    z = sr.logits(W, phi)
    p = jax.nn.softmax(z)
    g = sr.residual(z, y)
    H = sr.logit_hessian(p)
    mu = feature_scale(phi)
    rt = rho_tilde(g, mu, rho)
    direction = g + rt * (H @ g)
    return z, p, g, H, mu, rt, direction


def predicted_step(phi, y, W, eta, rho) -> Step:
    """Thm 3.2 / A.2 and Cor 3.4: the step with the O(η²) remainders dropped."""
    z, p, g, H, mu, rt, direction = _logit_direction(phi, y, W, rho)
    lam, v = sr.eigenbasis(p)
    e = sr.modal_coefficients(g, v)
    Hg = H @ g
    return Step(
        W=W - eta * sr.T_phi_adjoint(direction, phi),
        z=z - eta * mu * direction,
        g=g - eta * mu * (Hg + rt * (H @ Hg)),
        modes=(1.0 - eta * mu * (lam + rt * jnp.square(lam))) * e,
    )


def actual_step(phi, y, W, eta, rho) -> Step:
    """The exact (logits-)SAM step of :func:`dynamics.sam.head_step` (GD when ρ = 0)."""
    W_next = head_step(sr.head_loss, phi, W, eta, rho, y)
    z_next = sr.logits(W_next, phi)
    g_next = sr.residual(z_next, y)
    _, v = sr.eigenbasis(jax.nn.softmax(sr.logits(W, phi)))
    return Step(W=W_next, z=z_next, g=g_next, modes=sr.modal_coefficients(g_next, v))


def remainders(phi, y, W, eta, rho) -> Remainders:
    """‖R_W‖_F, ‖r_z‖, ‖r_g‖ and max_k |r_k|: each O(η²) when |ρ| ≤ κ√|η| (Thm 3.2, Cor 3.4)."""
    a = actual_step(phi, y, W, eta, rho)
    b = predicted_step(phi, y, W, eta, rho)
    return Remainders(
        W=jnp.linalg.norm(a.W - b.W),
        z=jnp.linalg.norm(a.z - b.z),
        g=jnp.linalg.norm(a.g - b.g),
        modes=jnp.max(jnp.abs(a.modes - b.modes)),
    )


def confidence_ratios(phi, y, W, eta, rho) -> jax.Array:
    """Exact α_i = p_i⁺/p_i (V,) for the actual step (GD when ρ = 0), formed in log space."""
    W_next = head_step(sr.head_loss, phi, W, eta, rho, y)
    log_p = jax.nn.log_softmax(sr.logits(W, phi))
    log_p_next = jax.nn.log_softmax(sr.logits(W_next, phi))
    return jnp.exp(log_p_next - log_p)


def predicted_confidence_ratios(phi, y, W, eta, rho) -> jax.Array:
    """Cor A.5's β-representation with the first-order logit step (remainder r_z dropped).

        α_i = Σ_j e^{z_j} / Σ_j β_j e^{z_j},
        β_j = exp{−η'[(g_j − g_i) + ρ̃((H_z g)_j − (H_z g)_i)]},  η' = ημ,

    i.e. α_i = exp(Δz_i) / Σ_j p_j exp(Δz_j) with Δz = −η'(g + ρ̃ H_z g). Returns (V,).
    """
    _, p, _, _, mu, _, direction = _logit_direction(phi, y, W, rho)
    dz = -eta * mu * direction
    return jnp.exp(dz - jax.nn.logsumexp(dz, b=p))


def squeeze_ratios(phi, y, W, eta, rho) -> ConfidenceRatios:
    """α under GD (ρ = 0) and SAM (ρ) from the same state (Lemma 3.5, Cor 3.6)."""
    p = jax.nn.softmax(sr.logits(W, phi))
    return ConfidenceRatios(
        gd=confidence_ratios(phi, y, W, eta, 0.0),
        sam=confidence_ratios(phi, y, W, eta, rho),
        label=jnp.argmax(y),
        y_star=most_confident_incorrect(p, y),
        p=p,
    )
