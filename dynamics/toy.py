"""The Figure-1 toy (paper §3.2, line 130): squeezing under a signed learning rate.

A fixed-feature softmax regression ``z = W φ`` (d = 1000, V = 3 by default) is first
fine-tuned ("SFT") for a few epochs on label ``Y_SFT = 0`` with a positive learning rate,
which makes class 0 the most confident. Then the label switches to ``Y_MINUS = 1`` and
training continues with a *negative* learning rate η (the y⁻ term of DPO) under

    W ← W − η ∇_W f(W + e),   e = ρ ∇_W f / ‖∇_W f‖   (ρ = 0: GD; Thm 3.2 / A.2)

which is :func:`dynamics.sam.head_step` with ``hidden = φ``. GD squeezes: p_{y*}
(y* = 0, the most confident incorrect class) rises and every other class falls. SAM with ρ
of η's sign damps this, the opposite sign exacerbates it (Cor 3.4 / 3.6): along mode k the
residual is scaled per step by ``1 − ημ(λ_k + ρ̃ λ_k²)`` with ρ̃ = ρ√μ/‖g‖ and μ = ‖φ‖².

Because ρ acts through ρ̃, the toy fixes the feature norm ``√μ`` explicitly (independent of
d): with the default ``feature_norm = 200`` the SAM perturbation moves the logits by
|ρ|√μ = 2 at |ρ| = 0.01, a plainly visible correction, and the default η = −2.5·10⁻⁷
moves them by |η|μ‖g‖ = 0.01‖g‖ per step. With a batch (``examples > 1``) the features should be near-orthogonal (d ≫ n),
or SFT's cross-talk can leave another class the most confident.

Trajectories are ``lax.scan`` over steps; grids of (η, ρ) are ``vmap`` over a trajectory.
:func:`reference_end_probs` is the same update written as a plain float64 NumPy loop,
the independent check (and the timing baseline) of the JAX sweep.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dynamics import sam
from dynamics import softmax_regression as sr

Y_SFT = 0  # the label SFT teaches: y*, the most confident incorrect class afterwards
Y_MINUS = 1  # the label of the signed-lr phase: y⁻ when η < 0


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """The toy setting. ``lr`` and ``rho`` are the signed η and ρ of the y⁻ phase.

    Attributes:
      dim: feature dimension d.
      classes: number of classes V (≥ 2).
      examples: batch size n (one example in the paper); each has its own φ.
      feature_norm: ‖φ‖ = √μ for every example.
      init_scale: standard deviation of the initial logits W₀φ.
      sft_epochs: full-batch GD steps on label ``Y_SFT`` (one epoch = one step).
      sft_lr: the (positive) SFT learning rate.
      lr: signed learning rate η of the phase on label ``Y_MINUS``.
      rho: signed SAM radius ρ of that phase.
      steps: number of steps of that phase.
      seed: seeds φ and W₀.
    """

    dim: int = 1000
    classes: int = 3
    examples: int = 1
    feature_norm: float = 200.0
    init_scale: float = 0.5
    sft_epochs: int = 10
    sft_lr: float = 7.5e-6
    lr: float = -2.5e-7
    rho: float = -0.01
    steps: int = 200
    seed: int = 0

    def __post_init__(self):
        for name in ("dim", "examples", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.classes < 2:
            raise ValueError(f"classes must be >= 2, got {self.classes}")
        if self.sft_epochs < 0:
            raise ValueError(f"sft_epochs must be >= 0, got {self.sft_epochs}")
        if not self.feature_norm > 0:
            raise ValueError(f"feature_norm must be > 0, got {self.feature_norm}")


class Trajectory(NamedTuple):
    """One run of the signed-lr phase, recorded at steps 0..T (T + 1 rows).

    probs (T+1, n, V); residuals g = p − y (T+1, n, V); modal coefficients e_k = v_kᵀ g
    (T+1, n, V−1) in the eigenbasis of H_z (λ descending) with sign-continuous
    eigenvectors ``eigvecs`` (T+1, n, V, V−1); ``final`` the last W.
    """

    probs: jax.Array
    residuals: jax.Array
    modal: jax.Array
    eigvecs: jax.Array
    final: jax.Array


def init(config: ToyConfig, dtype=None) -> tuple[jax.Array, jax.Array]:
    """Random features φ (n, d) with ‖φ_n‖ = feature_norm and W₀ (V, d) with z₀ ~ N(0, init_scale²)."""
    dtype = dtype or jnp.zeros(()).dtype
    k_phi, k_w = jax.random.split(jax.random.PRNGKey(config.seed))
    u = jax.random.normal(k_phi, (config.examples, config.dim), dtype)
    phi = config.feature_norm * u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    scale = config.init_scale / config.feature_norm
    W = scale * jax.random.normal(k_w, (config.classes, config.dim), dtype)
    return W, phi


def one_hot(label: int, phi: jax.Array, classes: int) -> jax.Array:
    """The label ``label`` for every example of ``phi``: (n, V) in φ's dtype."""
    y = jax.nn.one_hot(label, classes, dtype=phi.dtype)
    return jnp.broadcast_to(y, (phi.shape[0], classes))


def step(W: jax.Array, phi: jax.Array, y: jax.Array, eta, rho) -> jax.Array:
    """One signed GD (ρ = 0) / SAM step on the mean cross-entropy (Thm A.2)."""
    return sam.head_step(sr.head_loss, phi, W, eta, rho, y)


def train(W: jax.Array, phi: jax.Array, y: jax.Array, eta, rho, steps: int) -> jax.Array:
    """``steps`` steps of :func:`step` without recording (a ``lax.scan``)."""
    W, _ = jax.lax.scan(lambda w, _: (step(w, phi, y, eta, rho), None), W, None, length=steps)
    return W


def _observe(W, phi, y, v_prev):
    p = probs(W, phi)
    g = p - y
    _, v = sr.eigenbasis(p)
    v = sr.align_signs(v, v_prev)
    return p, g, sr.modal_coefficients(g, v), v


def trajectory(
    W: jax.Array, phi: jax.Array, label: int, eta, rho, steps: int
) -> Trajectory:
    """The signed-lr phase from ``W`` on label ``label``, recorded at every step.

    Eigenvectors are made sign-continuous by aligning each step's with the previous
    step's (:func:`dynamics.softmax_regression.align_signs`); step 0 uses the
    deterministic sign of :func:`~dynamics.softmax_regression.eigenbasis`.
    """
    y = one_hot(label, phi, W.shape[0])
    _, v0 = sr.eigenbasis(probs(W, phi))
    first = _observe(W, phi, y, v0)

    def body(carry, _):
        w, v_prev = carry
        w = step(w, phi, y, eta, rho)
        obs = _observe(w, phi, y, v_prev)
        return (w, obs[3]), obs

    (final, _), rest = jax.lax.scan(body, (W, first[3]), None, length=steps)
    p, g, e, v = (jnp.concatenate([a[None], b]) for a, b in zip(first, rest))
    return Trajectory(probs=p, residuals=g, modal=e, eigvecs=v, final=final)


def probs(W: jax.Array, phi: jax.Array) -> jax.Array:
    """p = softmax(W φ): class probabilities (n, V) of any weights W (V, d) on φ (n, d)."""
    return jax.nn.softmax(sr.logits(W, phi), axis=-1)


def end_probs(W: jax.Array, phi: jax.Array, label: int, eta, rho, steps: int) -> jax.Array:
    """p (n, V) after ``steps`` signed steps on ``label`` from ``W``."""
    y = one_hot(label, phi, W.shape[0])
    return probs(train(W, phi, y, eta, rho, steps), phi)


def sweep(
    W: jax.Array, phi: jax.Array, label: int, etas: jax.Array, rhos: jax.Array, steps: int
) -> jax.Array:
    """End probabilities over the grid η × ρ: (len(etas), len(rhos), n, V), one vmapped run."""
    over_rho = jax.vmap(end_probs, in_axes=(None, None, None, None, 0, None))
    return jax.vmap(over_rho, in_axes=(None, None, None, 0, None, None))(
        W, phi, label, etas, rhos, steps
    )


run_train = jax.jit(train, static_argnames=("steps",))
run_trajectory = jax.jit(trajectory, static_argnames=("label", "steps"))
run_sweep = jax.jit(sweep, static_argnames=("label", "steps"))


def setup(config: ToyConfig, dtype=None) -> tuple[jax.Array, jax.Array]:
    """The SFT'd start of the signed-lr phase: (W, φ) after ``sft_epochs`` GD steps on
    label ``Y_SFT`` with ``sft_lr`` from :func:`init`."""
    W, phi = init(config, dtype)
    y = one_hot(Y_SFT, phi, config.classes)
    return run_train(W, phi, y, config.sft_lr, 0.0, config.sft_epochs), phi


def sign_rule_rhos(config: ToyConfig) -> tuple[float, float, float]:
    """The radii of Figure 1(a, b): GD (ρ = 0), then SAM with ρ = +|config.rho| and −|config.rho|."""
    r = abs(config.rho)
    return 0.0, r, -r


def sign_rule_runs(config: ToyConfig, W: jax.Array, phi: jax.Array) -> dict[str, Trajectory]:
    """GD and SAM with :func:`sign_rule_rhos` from one start, keyed by :func:`run_label`."""
    return {
        run_label(rho, config.lr): run_trajectory(W, phi, Y_MINUS, config.lr, rho, config.steps)
        for rho in sign_rule_rhos(config)
    }


def run_label(rho: float, lr: float) -> str:
    """``"GD"`` or ``"SAM rho=+0.01 (same sign as lr)"`` / ``"(opposite sign to lr)"``."""
    if rho == 0:
        return "GD"
    relation = "same sign as lr" if (rho > 0) == (lr > 0) else "opposite sign to lr"
    return f"SAM rho={rho:+g} ({relation})"


def reference_end_probs(
    W: np.ndarray, phi: np.ndarray, label: int, eta: float, rho: float, steps: int
) -> np.ndarray:
    """:func:`end_probs` as a plain float64 NumPy loop with the gradients written out.

    ∇_W F = (P − Y)ᵀ Φ / n for the mean cross-entropy; SAM evaluates it at
    W + ρ ∇_W F / ‖∇_W F‖ (no perturbation when the gradient is 0).
    """
    W = np.array(W, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    n, V = phi.shape[0], W.shape[0]
    Y = np.zeros((n, V))
    Y[:, label] = 1.0

    def softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        ez = np.exp(z)
        return ez / ez.sum(axis=-1, keepdims=True)

    def grad(w):
        return (softmax(phi @ w.T) - Y).T @ phi / n

    for _ in range(steps):
        G = grad(W)
        norm = np.linalg.norm(G)
        if rho != 0 and norm > 0:
            G = grad(W + rho * G / norm)
        W = W - eta * G
    return softmax(phi @ W.T)


def reference_sweep(W, phi, label: int, etas, rhos, steps: int) -> np.ndarray:
    """:func:`sweep` as a loop of :func:`reference_end_probs`: (len(etas), len(rhos), n, V)."""
    return np.stack(
        [
            np.stack([reference_end_probs(W, phi, label, e, r, steps) for r in rhos])
            for e in etas
        ]
    )
