"""The Figure-1 toy: the sign rule, SFT, and the sweep against independent computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamics import softmax_regression as sr
from dynamics import toy


def _gd_same_opposite(config, eta):
    """End p (n, V) of GD, SAM with ρ of η's sign, SAM with the opposite sign."""
    W, phi = toy.setup(config)
    r = abs(config.rho)
    rhos = jnp.array([0.0, r, -r]) * np.sign(eta)
    p = np.asarray(toy.run_sweep(W, phi, toy.Y_MINUS, jnp.array([eta]), rhos, config.steps))[0]
    return p[0], p[1], p[2]


@pytest.mark.parametrize(
    "seed, dim, classes",
    [(0, 16, 3), (1, 48, 3), (2, 16, 5)],
)
@pytest.mark.parametrize("eta_sign", [-1.0, 1.0])
def test_sign_rule_at_end(seed, dim, classes, eta_sign):
    """p_{y*}: SAM(sign ρ = sign η) < GD < SAM(opposite); p_{y⁻} (or p_{y⁺}) the reverse."""
    config = toy.ToyConfig(seed=seed, dim=dim, classes=classes, steps=60)
    gd, same, opposite = _gd_same_opposite(config, eta_sign * abs(config.lr))
    ys, y = toy.Y_SFT, toy.Y_MINUS
    assert np.all(same[:, ys] < gd[:, ys]) and np.all(gd[:, ys] < opposite[:, ys])
    assert np.all(same[:, y] > gd[:, y]) and np.all(gd[:, y] > opposite[:, y])


def test_sign_rule_is_plain_at_defaults():
    """At the default setting |ρ| = 0.01 moves the end p_{y*} and p_{y⁻} by percents, not ulps."""
    config = toy.ToyConfig()
    gd, same, opposite = _gd_same_opposite(config, config.lr)
    ys, y = toy.Y_SFT, toy.Y_MINUS
    assert (gd[0, ys] - same[0, ys]) / gd[0, ys] > 0.02
    assert (opposite[0, ys] - gd[0, ys]) / gd[0, ys] > 0.002
    assert same[0, y] / gd[0, y] > 2.0 and gd[0, y] / opposite[0, y] > 1.05


def test_squeezing_under_gd():
    """GD with η < 0 on label 1: only y* = 0 rises; every other class falls (paper line 130)."""
    config = toy.ToyConfig(dim=16, steps=10)
    W, phi = toy.setup(config)
    traj = toy.run_trajectory(W, phi, toy.Y_MINUS, config.lr, 0.0, config.steps)
    p = np.asarray(traj.probs[:, 0])
    assert p[-1, 0] > p[0, 0]
    assert np.all(p[-1, 1:] < p[0, 1:])


@pytest.mark.parametrize("seed, classes, examples", [(0, 3, 1), (1, 5, 1), (2, 3, 2)])
def test_sft_makes_class_zero_most_confident(seed, classes, examples):
    config = toy.ToyConfig(seed=seed, dim=256, classes=classes, examples=examples)
    W0, phi = toy.init(config)
    W, _ = toy.setup(config)
    before, after = np.asarray(toy.probs(W0, phi)), np.asarray(toy.probs(W, phi))
    assert np.all(np.argmax(after, axis=-1) == toy.Y_SFT)
    assert np.all(after[:, toy.Y_SFT] > before[:, toy.Y_SFT])
    if examples == 1:
        assert after[0, toy.Y_SFT] > 0.5


def test_init_sets_feature_norm_and_logit_scale():
    config = toy.ToyConfig(dim=4000, classes=3, examples=2, seed=3)
    W, phi = toy.init(config)
    np.testing.assert_allclose(np.linalg.norm(phi, axis=-1), config.feature_norm, rtol=1e-5)
    assert W.shape == (3, 4000) and phi.shape == (2, 4000)
    assert 0.2 < float(jnp.std(sr.logits(W, phi))) < 1.0


def test_sweep_equals_individual_scan_runs():
    config = toy.ToyConfig(dim=16, classes=3, steps=10)
    W, phi = toy.setup(config)
    etas = jnp.array([-5e-7, 2.5e-7])
    rhos = jnp.array([-0.02, 0.0, 0.01])
    grid = np.asarray(toy.run_sweep(W, phi, toy.Y_MINUS, etas, rhos, config.steps))
    for i, eta in enumerate(etas):
        for j, rho in enumerate(rhos):
            traj = toy.run_trajectory(W, phi, toy.Y_MINUS, eta, rho, config.steps)
            np.testing.assert_allclose(grid[i, j], traj.probs[-1], rtol=1e-5, atol=1e-7)


def test_sweep_equals_numpy_float64_loop(x64):
    config = toy.ToyConfig(dim=40, classes=4, examples=2, steps=30)
    W, phi = toy.setup(config)
    assert W.dtype == jnp.float64
    etas = np.array([-5e-7, -1e-7, 3e-7])
    rhos = np.array([-0.03, 0.0, 0.01, 0.03])
    got = np.asarray(toy.run_sweep(W, phi, toy.Y_MINUS, etas, rhos, config.steps))
    want = toy.reference_sweep(np.asarray(W), np.asarray(phi), toy.Y_MINUS, etas, rhos, config.steps)
    assert got.shape == want.shape == (3, 4, 2, 4)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    # The check is not vacuous: ρ moves the result far beyond the tolerance.
    assert np.max(np.abs(want[:, 0] - want[:, 1])) > 1e-4


def test_modal_coefficients_reconstruct_residual_and_are_sign_continuous(x64):
    config = toy.ToyConfig(dim=32, classes=4, steps=40)
    W, phi = toy.setup(config)
    traj = toy.run_trajectory(W, phi, toy.Y_MINUS, 4 * config.lr, -0.01, config.steps)
    v, e, g = np.asarray(traj.eigvecs), np.asarray(traj.modal), np.asarray(traj.residuals)
    np.testing.assert_allclose(np.einsum("tnik,tnk->tni", v, e), g, atol=1e-12)
    # Each v_k is an eigenvector of H_z(p_t), and turns only a little between steps.
    H = np.asarray(sr.logit_hessian(traj.probs))
    lam = np.einsum("tnik,tnij,tnjk->tnk", v, H, v)
    np.testing.assert_allclose(np.einsum("tnij,tnjk->tnik", H, v), v * lam[:, :, None, :], atol=1e-12)
    assert np.all(np.einsum("tnik,tnik->tnk", v[1:], v[:-1]) > 0.9)
    np.testing.assert_allclose(g, np.asarray(traj.probs) - np.eye(4)[toy.Y_MINUS], atol=1e-15)


def test_probs_is_the_softmax_of_any_weights():
    gen = np.random.default_rng(0)
    W, phi = gen.normal(size=(4, 8)), gen.normal(size=(3, 8))
    z = phi @ W.T
    expected = np.exp(z - z.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(toy.probs(jnp.asarray(W), jnp.asarray(phi)), expected, rtol=1e-5)


def test_trajectory_matches_end_probs():
    config = toy.ToyConfig(dim=16, steps=10)
    W, phi = toy.setup(config)
    traj = toy.run_trajectory(W, phi, toy.Y_MINUS, config.lr, 0.01, config.steps)
    assert traj.probs.shape == (11, 1, 3) and traj.modal.shape == (11, 1, 2)
    np.testing.assert_allclose(traj.probs[0], toy.probs(W, phi), rtol=1e-6)
    np.testing.assert_allclose(traj.probs[-1], toy.probs(traj.final, phi), rtol=1e-6)


@pytest.mark.parametrize(
    "field, value", [("classes", 1), ("dim", 0), ("steps", 0), ("sft_epochs", -1), ("feature_norm", 0.0)]
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        toy.ToyConfig(**{field: value})


def test_run_labels_say_which_sign_matches_lr():
    assert toy.run_label(0.0, -1.0) == "GD"
    assert toy.run_label(-0.01, -1.0) == "SAM rho=-0.01 (same sign as lr)"
    assert toy.run_label(0.01, -1.0) == "SAM rho=+0.01 (opposite sign to lr)"
    assert toy.run_label(0.01, 1.0) == "SAM rho=+0.01 (same sign as lr)"
