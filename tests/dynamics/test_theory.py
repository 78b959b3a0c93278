"""Thm 3.2 / Cor 3.4 / Lemma 3.5 / Cor 3.6 predictions against actual (logits-)SAM steps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamics import softmax_regression as sr
from dynamics import theory


pytestmark = pytest.mark.usefixtures("x64")


def _instance(seed, V, d):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(k2, (d,)) / np.sqrt(d), jax.nn.one_hot(
        jax.random.randint(k3, (), 0, V), V), 1.5 * jax.random.normal(k1, (V, d)))


def _from_logits(z, phi):
    """A head W with W φ = z (the minimum-norm preimage of Prop A.1 (3))."""
    return jnp.outer(z, phi) / jnp.sum(phi * phi)


# Jitted once: eager op-by-op dispatch of these small programs is what makes tests slow.
actual_step = jax.jit(theory.actual_step)
predicted_step = jax.jit(theory.predicted_step)
confidence_ratios = jax.jit(theory.confidence_ratios)
predicted_confidence_ratios = jax.jit(theory.predicted_confidence_ratios)

STEPS = np.geomspace(1e-2, 1e-5, 7)  # s = |η| μ
KAPPA = 1.0


@functools.cache
def _swept(fn):
    """``fn(phi, y, W, eta, rho)`` jitted and vmapped over (eta, rho); compiled once per shape."""
    return jax.jit(jax.vmap(fn, (None, None, None, 0, 0)))


def _sweep(fn, phi, y, W, sign_eta, sign_rho):
    mu = theory.feature_scale(phi)
    eta = sign_eta * jnp.asarray(STEPS) / mu
    rho = sign_rho * KAPPA * jnp.sqrt(jnp.abs(eta))
    return _swept(fn)(phi, y, W, eta, rho)


def _slope(values):
    return np.polyfit(np.log(STEPS), np.log(np.asarray(values)), 1)[0]


@pytest.mark.parametrize("seed,V,d", [(0, 3, 4), (1, 5, 2)])
def test_remainders_are_second_order_in_eta(seed, V, d):
    """Thm 3.2 and Cor 3.4: with |ρ| = κ√|η| every remainder is O(η²), for both signs of η and ρ."""
    for sign_eta, sign_rho in [(1, 1), (1, -1), (-1, 1), (-1, -1)]:
        r = _sweep(theory.remainders, *_instance(seed, V, d), sign_eta, sign_rho)
        for name, values in r._asdict().items():
            assert abs(_slope(values) - 2.0) < 0.15, (name, sign_eta, sign_rho)


def test_dropping_the_sam_correction_leaves_an_eta_three_halves_error():
    """The ρ̃ H_z g term is what makes the error O(η²): without it the error is Θ(|η|^{3/2})."""
    phi, y, W = _instance(2, 4, 3)

    def gd_prediction_error(phi, y, W, eta, rho):
        return jnp.linalg.norm(theory.actual_step(phi, y, W, eta, rho).z
                               - theory.predicted_step(phi, y, W, eta, 0.0).z)

    assert abs(_slope(_sweep(gd_prediction_error, phi, y, W, -1, -1)) - 1.5) < 0.1


@pytest.mark.parametrize("eta", [0.3, -0.7])
def test_gd_step_is_exactly_linear_in_parameters_and_logits(eta):
    """With ρ = 0 the W and z expansions have no remainder, and Cor A.5's β form is exact."""
    phi, y, W = _instance(3, 4, 3)
    actual = actual_step(phi, y, W, eta, 0.0)
    predicted = predicted_step(phi, y, W, eta, 0.0)
    np.testing.assert_allclose(actual.W, predicted.W, atol=1e-14)
    np.testing.assert_allclose(actual.z, predicted.z, atol=1e-14)
    np.testing.assert_allclose(confidence_ratios(phi, y, W, eta, 0.0),
                               predicted_confidence_ratios(phi, y, W, eta, 0.0),
                               rtol=1e-12)


def test_modal_prediction_is_the_projection_of_the_residual_prediction():
    """Cor 3.4 (1 − ημ[λ_k + ρ̃λ_k²]) e_k equals v_kᵀ(I − ημH_z − ημρ̃H_z²) g."""
    phi, y, W = _instance(4, 6, 2)
    pred = predicted_step(phi, y, W, -0.05, -0.1)
    _, v = sr.eigenbasis(jax.nn.softmax(sr.logits(W, phi)))
    np.testing.assert_allclose(pred.modes, v.T @ pred.g, atol=1e-14)


def test_predicted_parameter_step_matches_hessian_of_the_sam_point():
    """W⁺ prediction = W − η(∇F + H_W[ΔW_adv]) with H_W from jax.jvp of jax.grad (independent)."""
    phi, y, W = _instance(5, 3, 4)
    eta, rho = 0.01, -0.02
    grad = jax.grad(sr.loss)
    g = grad(W, phi, y)
    dW = rho * g / jnp.linalg.norm(g)
    _, hvp = jax.jvp(lambda w: grad(w, phi, y), (W,), (dW,))
    np.testing.assert_allclose(predicted_step(phi, y, W, eta, rho).W,
                               W - eta * (g + hvp), atol=1e-14)


def test_rho_tilde_value_and_zero_gradient_convention():
    g = jnp.array([0.3, -0.4, 0.1])
    assert np.isclose(theory.rho_tilde(g, 4.0, -0.5), -0.5 * 2.0 / np.linalg.norm(g))
    zero = jnp.zeros(3)
    assert float(theory.rho_tilde(zero, 4.0, 0.5)) == 0.0
    d = jax.grad(theory.rho_tilde, argnums=(0, 2))(zero, 4.0, 0.5)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in d)


def test_most_confident_incorrect_skips_the_label():
    p = jnp.array([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]])
    y = jax.nn.one_hot(jnp.array([0, 1]), 3)
    np.testing.assert_array_equal(theory.most_confident_incorrect(p, y), [1, 2])


# --- Lemma 3.5 and Cor 3.6 as properties over random logits and labels -------------------

ratios = jax.jit(theory.squeeze_ratios)
SMALL = 1e-4  # s = |η| μ: well inside the asymptotic regime for logits in [-4, 4]


@st.composite
def problems(draw):
    V = draw(st.integers(2, 5))
    z = jnp.array(draw(st.lists(st.floats(-4, 4), min_size=V, max_size=V)))
    label = draw(st.integers(0, V - 1))
    phi = jnp.array(draw(st.lists(st.floats(0.2, 2.0), min_size=3, max_size=3)))
    phi = phi * jnp.array(draw(st.sampled_from([[1, 1, 1], [1, -1, 1], [-1, 1, -1]])))
    return phi, jax.nn.one_hot(label, V), _from_logits(z, phi)


def _picked(r):
    return (float(r.gd[r.y_star]), float(r.sam[r.y_star]),
            float(r.gd[r.label]), float(r.sam[r.label]))


@settings(max_examples=40, deadline=None)
@given(problems(), st.floats(1e-4, 1e-1))
def test_lemma_3_5_negative_step_squeezes(problem, s):
    phi, y, W = problem
    eta = -s / theory.feature_scale(phi)
    star_gd, _, y_gd, _ = _picked(ratios(phi, y, W, eta, 0.0))
    assert star_gd > 1.0 and y_gd < 1.0


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from([1.0, -1.0]))
def test_cor_3_6_same_sign_sam_restrains_the_squeeze(problem, sign):
    """ηρ > 0, |ρ| = κ√|η|, small |η|: α_{y*}^SAM < α_{y*}^GD and α_y^SAM > α_y^GD."""
    phi, y, W = problem
    eta = sign * SMALL / theory.feature_scale(phi)
    rho = sign * KAPPA * np.sqrt(abs(eta))
    star_gd, star_sam, y_gd, y_sam = _picked(ratios(phi, y, W, eta, rho))
    assert star_sam <= star_gd and y_sam >= y_gd
    # The flip side: the opposite sign of ρ does the opposite.
    star_gd, star_flip, y_gd, y_flip = _picked(ratios(phi, y, W, eta, -rho))
    assert star_flip >= star_gd and y_flip <= y_gd
