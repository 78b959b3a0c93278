"""lm.diagnostics: closed forms against autodiff, Hutchinson against exact traces."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from lm import diagnostics


def _pair(key, T=5, d=4, V=7):
    kh, kw, ky, km = jax.random.split(key, 4)
    hidden = jax.random.normal(kh, (2, T, d))
    head = jax.random.normal(kw, (V, d))
    targets = jax.random.randint(ky, (2, T), 0, V)
    # Shared suffix tokens, as in the sentiment task: chosen and rejected agree off t=1.
    targets = targets.at[1, 2:].set(targets[0, 2:])
    mask = jnp.array([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    return hidden, head, targets, mask


def _seq_logprob(W, h, y, m):
    logp = jax.nn.log_softmax(h @ W.T, axis=-1)
    return jnp.sum(m * jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0])


def _token_grads(W, h, y):
    """(T, V, d): ∇_W log p_t(y_t) for each t, by autodiff."""
    onehots = jnp.eye(y.shape[0], dtype=h.dtype)
    return jax.vmap(lambda e: jax.grad(_seq_logprob)(W, h, y, e))(onehots)


@pytest.fixture(params=[False, True], ids=["f32", "x64"])
def x64(request):
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", request.param)
    yield request.param
    jax.config.update("jax_enable_x64", previous)


def test_pair_gradient_products_match_autodiff(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    hidden, head, targets, mask = _pair(jax.random.key(0))
    hidden, head = hidden.astype(dtype), head.astype(dtype)
    out = diagnostics.pair_gradient_products(hidden, head, targets, mask)
    m = mask.astype(dtype)
    gw = jax.grad(_seq_logprob)(head, hidden[0], targets[0], m[0])
    gl = jax.grad(_seq_logprob)(head, hidden[1], targets[1], m[1])
    tol = dict(rtol=1e-10, atol=1e-10) if x64 else dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["inner"], jnp.vdot(gw, gl), **tol)
    np.testing.assert_allclose(out["norm_chosen"], jnp.linalg.norm(gw), **tol)
    np.testing.assert_allclose(out["norm_rejected"], jnp.linalg.norm(gl), **tol)
    np.testing.assert_allclose(
        out["cosine"], jnp.vdot(gw, gl) / (jnp.linalg.norm(gw) * jnp.linalg.norm(gl)), **tol
    )
    tw = _token_grads(head, hidden[0], targets[0])
    tl = _token_grads(head, hidden[1], targets[1])
    gram = jnp.einsum("tvd,svd->ts", tw, tl) * (m[0][:, None] * m[1][None, :])
    np.testing.assert_allclose(out["token_inner"], gram, **tol)
    norms = jnp.linalg.norm(tw.reshape(tw.shape[0], -1), axis=-1)[:, None] * jnp.linalg.norm(
        tl.reshape(tl.shape[0], -1), axis=-1
    )[None, :]
    np.testing.assert_allclose(out["token_cosine"], gram / norms, **tol)
    assert out["token_inner"].dtype == dtype


def test_token_products_sign_pattern():
    """margin-pitfalls Thm 1: same context, different tokens -> negative inner product."""
    h = jnp.ones((1, 3))
    p = jnp.array([[0.5, 0.5, 0.0, 0.0]])
    gram = diagnostics.token_gradient_products(h, p, jnp.array([0]), h, p, jnp.array([1]))
    # Uniform on M = 2 tokens: <∇log π_w, ∇log π_l> = -||h||²/M.
    np.testing.assert_allclose(gram[0, 0], -3.0 / 2, rtol=1e-6)
    same = diagnostics.token_gradient_products(h, p, jnp.array([0]), h, p, jnp.array([0]))
    np.testing.assert_allclose(same[0, 0], 3.0 * (1 - 2 * 0.5 + 0.5), rtol=1e-6)


def test_hutchinson_matches_exact_trace():
    key = jax.random.key(1)
    x = {"a": jax.random.normal(key, (3, 4)), "b": jax.random.normal(jax.random.key(2), (5,))}

    def f(t):
        return jnp.sum(jnp.tanh(t["a"]) ** 3) + jnp.sum(t["a"][0] * t["b"][:4]) ** 2 + jnp.sum(jnp.exp(0.3 * t["b"]))

    flat, unravel = jax.flatten_util.ravel_pytree(x)
    exact = jnp.trace(jax.hessian(lambda u: f(unravel(u)))(flat))
    est = diagnostics.hutchinson_trace(f, x, jax.random.key(3), 400)
    assert est["samples"].shape == (400,)
    assert est["stderr"] > 0
    assert abs(est["trace"] - exact) < 4 * est["stderr"]


def test_hutchinson_is_exact_for_diagonal_hessians():
    """Rademacher probes have v_i² = 1: a diagonal Hessian gives the trace every time."""
    x = jnp.arange(1.0, 6.0)
    est = diagnostics.hutchinson_trace(lambda u: jnp.sum(u**4), x, jax.random.key(0), 3)
    np.testing.assert_allclose(est["trace"], jnp.sum(12 * x**2), rtol=1e-6)
    np.testing.assert_allclose(est["stderr"], 0.0, atol=1e-3)


def test_hutchinson_rejects_one_probe():
    with pytest.raises(ValueError, match="num_probes"):
        diagnostics.hutchinson_trace(jnp.sum, jnp.ones(2), jax.random.key(0), 1)
