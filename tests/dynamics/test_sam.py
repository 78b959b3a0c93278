"""The (logits-)SAM transform against SAM written out by hand as two explicit passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamics import sam
from dynamics import softmax_regression as sr


pytestmark = pytest.mark.usefixtures("x64")


def _tree_norm(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves))


def _hand_sam_grad(loss_fn, params, rho, *args):
    """Two passes in numpy-land: g at params, e = ρ g/‖g‖ (0 if g = 0), then ∇ at params + e."""
    g = jax.grad(loss_fn)(params, *args)
    norm = _tree_norm(g)
    e = jax.tree_util.tree_map(lambda x: np.asarray(x) * (rho / norm if norm > 0 else 0.0), g)
    shifted = jax.tree_util.tree_map(lambda p, d: p + d, params, e)
    return jax.grad(loss_fn)(shifted, *args), loss_fn(shifted, *args)


def _mlp_head_loss(h, head, labels):
    """Cross-entropy of logits h Wᵀ + b with leading axes on h; a pytree head."""
    z = h @ head["w"].T + head["b"]
    return jnp.mean(sr.cross_entropy(z, jax.nn.one_hot(labels, z.shape[-1])))


def _head(key, V=5, d=4):
    kw, kb = jax.random.split(key)
    return {"w": jax.random.normal(kw, (V, d)), "b": 0.3 * jax.random.normal(kb, (V,))}


def _allclose(a, b, tol=1e-12):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_global_norm_is_frobenius_over_all_leaves():
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": [jnp.array([3.0, -4.0])]}
    assert np.isclose(float(sam.global_norm(tree)), np.sqrt(55.0 + 25.0))


def test_global_norm_accumulates_low_precision_in_float32():
    x = jnp.full((4096,), 1.0, dtype=jnp.bfloat16)
    norm = sam.global_norm(x)
    assert norm.dtype == jnp.float32 and float(norm) == 64.0


@pytest.mark.parametrize("rho", [0.05, -0.05, 1.7])
def test_perturbation_has_length_abs_rho_along_signed_gradient(rho):
    grads = _head(jax.random.PRNGKey(0))
    e = sam.sam_perturbation(grads, rho)
    assert np.isclose(float(sam.global_norm(e)), abs(rho), rtol=1e-12)
    cos = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(e),
                                             jax.tree_util.tree_leaves(grads)))
    assert np.isclose(float(cos), np.sign(rho) * abs(rho) * _tree_norm(grads), rtol=1e-12)


def test_perturbation_of_zero_gradient_is_zero_not_nan():
    zeros = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(3)}
    e = sam.sam_perturbation(zeros, 0.1)
    for leaf in jax.tree_util.tree_leaves(e):
        assert np.all(np.asarray(leaf) == 0.0)


@pytest.mark.parametrize("scale", [1e-25, 1e25])
def test_perturbation_has_length_rho_at_any_gradient_scale_in_float32(scale):
    """Squares of 1e-25 flush to zero and of 1e25 overflow in float32; e must not."""
    grads = {"w": jnp.full((4, 4), scale, jnp.float32), "b": jnp.full(3, -scale, jnp.float32)}
    e = sam.sam_perturbation(grads, 1e-4)
    assert np.isclose(float(sam.global_norm(e)), 1e-4, rtol=1e-6)
    assert np.isclose(float(sam.global_norm(grads)), scale * np.sqrt(19.0), rtol=1e-6)


def test_perturbation_keeps_leaf_dtype():
    grads = {"w": jnp.ones((2, 2), jnp.bfloat16), "b": jnp.ones(2, jnp.float32)}
    e = sam.sam_perturbation(grads, 0.5)
    assert e["w"].dtype == jnp.bfloat16 and e["b"].dtype == jnp.float32


@pytest.mark.parametrize("rho", [0.2, -0.2])
def test_sam_loss_gradient_matches_two_pass_sam(rho):
    key = jax.random.PRNGKey(1)
    head = _head(key)
    h = jax.random.normal(jax.random.fold_in(key, 1), (6, 4))
    labels = jnp.array([0, 1, 2, 3, 4, 0])

    def loss(params, h, labels):
        return _mlp_head_loss(h, params, labels)

    value, grads = jax.value_and_grad(lambda p: sam.sam_loss(loss, p, rho, h, labels))(head)
    want_grads, want_value = _hand_sam_grad(loss, head, rho, h, labels)
    _allclose(grads, want_grads)
    assert np.isclose(float(value), float(want_value), rtol=1e-12)


def test_signed_rho_changes_the_gradient():
    head = _head(jax.random.PRNGKey(2))
    h = jax.random.normal(jax.random.PRNGKey(3), (3, 4))
    labels = jnp.array([1, 2, 3])
    def grad(rho):
        return jax.grad(sam.logits_sam_loss, argnums=2)(_mlp_head_loss, h, head, rho, labels)

    plus, minus = grad(0.3), grad(-0.3)
    assert float(sam.global_norm(jax.tree_util.tree_map(jnp.subtract, plus, minus))) > 1e-3


def test_rho_zero_is_the_plain_loss_and_gradient():
    head = _head(jax.random.PRNGKey(4))
    h = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 4))
    labels = jnp.array([[0, 1, 2], [3, 4, 0]])
    out, g = jax.value_and_grad(sam.logits_sam_loss, argnums=(1, 2))(
        _mlp_head_loss, h, head, 0.0, labels)
    ref, g_ref = jax.value_and_grad(_mlp_head_loss, argnums=(0, 1))(h, head, labels)
    assert np.isclose(float(out), float(ref), rtol=1e-14)
    _allclose(g, g_ref, tol=1e-14)


def test_zero_gradient_point_uses_zero_perturbation_without_nan():
    target = jnp.array([1.0, -2.0, 0.5])

    def flat(p, shift):
        return jnp.sum((p - target) ** 2) + jnp.sum((p - target) ** 3) * shift  # ∇ = 0 at target

    value, (grad, d_shift) = jax.value_and_grad(
        lambda p, s: sam.sam_loss(flat, p, 0.5, s), argnums=(0, 1))(target, 2.0)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0) and float(d_shift) == 0.0


@pytest.mark.parametrize("rho", [0.15, -0.15])
def test_logits_sam_matches_hand_two_pass_including_hidden_gradient(rho):
    """Leading (batch, token) axes on h; the second pass differentiates w.r.t. h and W."""
    key = jax.random.PRNGKey(6)
    head = _head(key, V=7, d=5)
    h = jax.random.normal(jax.random.fold_in(key, 1), (2, 3, 5))
    labels = jax.random.randint(jax.random.fold_in(key, 2), (2, 3), 0, 7)

    g_h, g_w = jax.grad(sam.logits_sam_loss, argnums=(1, 2))(_mlp_head_loss, h, head, rho, labels)

    gw = jax.grad(_mlp_head_loss, argnums=1)(h, head, labels)
    scale = rho / _tree_norm(gw)
    perturbed = jax.tree_util.tree_map(lambda w, g: w + scale * np.asarray(g), head, gw)
    want_h, want_w = jax.grad(_mlp_head_loss, argnums=(0, 1))(h, perturbed, labels)
    _allclose(g_w, want_w)
    _allclose(g_h, want_h)
    # Not the plain gradient: the perturbation does reach the trunk gradient.
    plain_h = jax.grad(_mlp_head_loss)(h, head, labels)
    assert np.max(np.abs(np.asarray(g_h - plain_h))) > 1e-4


def test_perturbation_norm_is_global_over_the_whole_batch():
    """Concatenating two batches perturbs with one norm, not one per half."""
    key = jax.random.PRNGKey(7)
    head = _head(key)
    h = jax.random.normal(key, (8, 4))
    labels = jnp.arange(8) % 5
    grads = jax.grad(sam.logits_sam_loss, argnums=2)(_mlp_head_loss, h, head, 0.4, labels)
    want, _ = _hand_sam_grad(lambda w, h, l: _mlp_head_loss(h, w, l), head, 0.4, h, labels)
    _allclose(grads, want)


def test_has_aux_returns_unperturbed_aux():
    head = _head(jax.random.PRNGKey(8))
    h = jax.random.normal(jax.random.PRNGKey(9), (4, 4))
    labels = jnp.array([0, 1, 2, 3])

    def with_aux(h, w, labels):
        loss = _mlp_head_loss(h, w, labels)
        return loss, {"loss": loss, "logit_mean": jnp.mean(h @ w["w"].T + w["b"])}

    (out, aux), grads = jax.value_and_grad(
        lambda w: sam.logits_sam_loss(with_aux, h, w, 0.3, labels, has_aux=True), has_aux=True
    )(head)
    _, ref_aux = with_aux(h, head, labels)
    _allclose(aux, ref_aux, tol=1e-14)
    want, want_value = _hand_sam_grad(lambda w, h, l: _mlp_head_loss(h, w, l), head, 0.3, h, labels)
    assert np.isclose(float(out), float(want_value), rtol=1e-12)
    assert not np.isclose(float(out), float(ref_aux["loss"]))
    _allclose(grads, want)


def test_reuse_hands_the_unperturbed_aux_to_the_perturbed_evaluation():
    """``reuse(aux)``: keyword arguments of the perturbed evaluation from the unperturbed
    one's aux, as constants: the value and gradient are the plain SAM ones (here the reused
    term is added and subtracted), and without ``has_aux`` it is refused."""
    head = _head(jax.random.PRNGKey(12))
    h = jax.random.normal(jax.random.PRNGKey(13), (4, 4))
    labels = jnp.array([1, 0, 3, 2])
    seen = []

    def with_aux(h, w, labels, offset=None):
        loss = _mlp_head_loss(h, w, labels)
        if offset is not None:
            seen.append(offset)
            loss = loss + offset - jax.lax.stop_gradient(offset)
        return loss, {"loss": loss}

    out, grads = jax.value_and_grad(lambda w: sam.logits_sam_loss(
        with_aux, h, w, 0.3, labels, has_aux=True,
        reuse=lambda aux: {"offset": 2 * aux["loss"]})[0])(head)
    want, want_value = _hand_sam_grad(lambda w, h, l: _mlp_head_loss(h, w, l), head, 0.3, h, labels)
    assert len(seen) == 1
    np.testing.assert_allclose(float(seen[0]), 2 * float(_mlp_head_loss(h, head, labels)),
                               rtol=1e-12)
    assert np.isclose(float(out), float(want_value), rtol=1e-12)
    _allclose(grads, want)
    with pytest.raises(ValueError, match="has_aux"):
        sam.logits_sam_loss(lambda h, w, l: with_aux(h, w, l)[0], h, head, 0.3, labels,
                            reuse=lambda aux: {})


def test_jit_matches_eager():
    head = _head(jax.random.PRNGKey(10))
    h = jax.random.normal(jax.random.PRNGKey(11), (3, 4))
    labels = jnp.array([4, 2, 0])
    def f(w, rho):
        return jax.grad(sam.logits_sam_loss, argnums=2)(_mlp_head_loss, h, w, rho, labels)

    _allclose(jax.jit(f)(head, -0.2), f(head, -0.2))


@pytest.mark.parametrize("eta,rho", [(0.1, 0.0), (-0.1, 0.0), (0.1, 0.05), (-0.1, -0.05)])
def test_head_step_is_signed_descent_on_the_sam_gradient(eta, rho):
    key = jax.random.PRNGKey(12)
    W = jax.random.normal(key, (4, 3))
    phi = jax.random.normal(jax.random.fold_in(key, 1), (3,))
    y = jax.nn.one_hot(2, 4)
    grads, _ = _hand_sam_grad(sr.loss, W, rho, phi, y)
    got = sam.head_step(sr.head_loss, phi, W, eta, rho, y)
    np.testing.assert_allclose(np.asarray(got), np.asarray(W - eta * grads), atol=1e-14)
