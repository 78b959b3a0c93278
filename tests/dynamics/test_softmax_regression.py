"""Softmax regression and its curvature against jax.hessian, jax.grad and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamics import softmax_regression as sr


pytestmark = pytest.mark.usefixtures("x64")


def _instance(seed, V, d):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    W = 1.5 * jax.random.normal(k1, (V, d))
    phi = jax.random.normal(k2, (d,))
    y = jax.nn.one_hot(jax.random.randint(k3, (), 0, V), V)
    return W, phi, y


SHAPES = [(2, 1), (3, 4), (5, 3), (7, 2)]
dense_hessian = jax.jit(jax.hessian(sr.loss))  # (V, d, V, d), independent of sr's formulas


@pytest.mark.parametrize("V,d", SHAPES)
def test_param_hessian_is_kronecker_of_logit_hessian(V, d):
    """Prop 3.1: ∇²_W f(Wφ, y) = H_z ⊗ φφᵀ in row-major vec(W)."""
    for seed in range(3):
        W, phi, y = _instance(seed, V, d)
        dense = dense_hessian(W, phi, y).reshape(V * d, V * d)
        p = jax.nn.softmax(sr.logits(W, phi))
        np.testing.assert_allclose(sr.param_hessian(p, phi), dense, atol=1e-13)


@pytest.mark.parametrize("V,d", SHAPES)
def test_hessian_vector_product_matches_dense_matrix(V, d):
    W, phi, y = _instance(1, V, d)
    dW = jax.random.normal(jax.random.PRNGKey(9), (V, d))
    p = jax.nn.softmax(sr.logits(W, phi))
    dense = dense_hessian(W, phi, y).reshape(V * d, V * d)
    np.testing.assert_allclose(
        sr.param_hessian_vp(p, phi, dW).reshape(-1), dense @ dW.reshape(-1), atol=1e-13)
    # and the bilinear form pulls back: <ΔW, H_W ΔW> = <T_φ ΔW, H_z T_φ ΔW>
    zdW = sr.T_phi(dW, phi)
    np.testing.assert_allclose(jnp.vdot(dW, sr.param_hessian_vp(p, phi, dW)),
                               zdW @ sr.logit_hessian(p) @ zdW, rtol=1e-12)


def test_t_phi_adjoint_identity():
    """<T_φ ΔW, v> = <ΔW, T_φ* v>_F for random ΔW, v; T_φ* is also the VJP of T_φ."""
    key = jax.random.PRNGKey(3)
    for i in range(5):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        dW, phi, v = (jax.random.normal(k1, (4, 6)), jax.random.normal(k2, (6,)),
                      jax.random.normal(k3, (4,)))
        assert np.isclose(jnp.vdot(sr.T_phi(dW, phi), v),
                          jnp.vdot(dW, sr.T_phi_adjoint(v, phi)), rtol=1e-12)
        _, vjp = jax.vjp(lambda m: sr.T_phi(m, phi), dW)
        np.testing.assert_allclose(vjp(v)[0], sr.T_phi_adjoint(v, phi), atol=1e-14)


def test_residual_is_the_logit_gradient():
    """g = p − y equals jax.grad of f in z; ∇_W F = g φᵀ (Prop A.1 (1))."""
    W, phi, y = _instance(4, 6, 3)
    z = sr.logits(W, phi)
    np.testing.assert_allclose(sr.residual(z, y), jax.grad(sr.cross_entropy)(z, y), atol=1e-14)
    np.testing.assert_allclose(jax.grad(sr.loss)(W, phi, y),
                               sr.T_phi_adjoint(sr.residual(z, y), phi), atol=1e-14)


def test_loss_gradient_matches_central_finite_differences():
    W, phi, y = _instance(5, 4, 3)
    grad = np.asarray(jax.grad(sr.loss)(W, phi, y))
    h = 1e-6
    steps = h * jnp.eye(W.size).reshape(-1, *W.shape)
    at = jax.vmap(lambda w: sr.loss(w, phi, y))
    fd = ((at(W + steps) - at(W - steps)) / (2 * h)).reshape(W.shape)
    np.testing.assert_allclose(grad, fd, atol=1e-8)


def test_logit_hessian_matches_jax_hessian_and_finite_differences_of_residual():
    z = jnp.array([0.3, -1.2, 2.0, 0.1])
    y = jax.nn.one_hot(1, 4)
    H = sr.logit_hessian(jax.nn.softmax(z))
    np.testing.assert_allclose(H, jax.hessian(sr.cross_entropy)(z, y), atol=1e-14)
    h = 1e-6
    fd = np.stack([(sr.residual(z + h * e, y) - sr.residual(z - h * e, y)) / (2 * h)
                   for e in np.eye(4)], axis=1)
    np.testing.assert_allclose(H, fd, atol=1e-8)


def test_logit_hessian_vp_matches_the_matrix_on_a_batch():
    key = jax.random.PRNGKey(3)
    p = jax.nn.softmax(jax.random.normal(key, (2, 3, 5)), axis=-1)
    v = jax.random.normal(jax.random.fold_in(key, 1), (2, 3, 5))
    np.testing.assert_allclose(sr.logit_hessian_vp(p, v),
                               jnp.einsum("...ij,...j->...i", sr.logit_hessian(p), v), atol=1e-14)


def test_batched_loss_is_mean_of_single_losses():
    key = jax.random.PRNGKey(6)
    W = jax.random.normal(key, (3, 2))
    phi = jax.random.normal(jax.random.fold_in(key, 1), (5, 2))
    y = jax.nn.one_hot(jnp.array([0, 1, 2, 0, 1]), 3)
    singles = [sr.loss(W, phi[i], y[i]) for i in range(5)]
    assert np.isclose(sr.loss(W, phi, y), np.mean(singles), rtol=1e-13)


@pytest.mark.parametrize("V", [2, 3, 6])
def test_eigenbasis_on_ones_complement(V):
    """Prop 3.3: orthonormal eigenvectors ⊥ 1, positive descending λ, reconstructing H_z."""
    p = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(V), (V,)))
    lam, v = sr.eigenbasis(p)
    H = sr.logit_hessian(p)
    assert lam.shape == (V - 1,) and v.shape == (V, V - 1)
    assert np.all(lam > 0) and np.all(np.diff(lam) <= 0)
    np.testing.assert_allclose(v.T @ v, np.eye(V - 1), atol=1e-13)
    np.testing.assert_allclose(jnp.sum(v, axis=0), 0.0, atol=1e-13)
    np.testing.assert_allclose(H @ v, v * lam, atol=1e-13)
    np.testing.assert_allclose((v * lam) @ v.T, H, atol=1e-13)
    np.testing.assert_allclose(H @ jnp.ones(V), 0.0, atol=1e-15)
    assert np.linalg.eigvalsh(np.asarray(H)).min() > -1e-15


def test_modal_coefficients_reconstruct_the_residual_batched():
    key = jax.random.PRNGKey(11)
    z = jax.random.normal(key, (4, 5))
    y = jax.nn.one_hot(jnp.array([0, 4, 2, 2]), 5)
    g = sr.residual(z, y)
    _, v = sr.eigenbasis(jax.nn.softmax(z))
    e = sr.modal_coefficients(g, v)
    assert e.shape == (4, 4)
    np.testing.assert_allclose(jnp.einsum("bik,bk->bi", v, e), g, atol=1e-13)
    np.testing.assert_allclose(jnp.sum(g, axis=-1), 0.0, atol=1e-15)


def test_align_signs_follows_reference():
    _, v = sr.eigenbasis(jax.nn.softmax(jnp.array([0.1, 0.5, -0.3])))
    flipped = v * jnp.array([-1.0, 1.0])
    np.testing.assert_allclose(sr.align_signs(flipped, v), v)
