"""lm.diagnostics: closed forms against autodiff, Hutchinson against exact traces."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from lm import diagnostics


def _pair(seed, T=5, d=4, V=7):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((2, T, d))
    head = rng.standard_normal((V, d))
    targets = rng.integers(0, V, (2, T))
    # Shared suffix tokens, as in the sentiment task: chosen and rejected agree off t=1.
    targets[1, 2:] = targets[0, 2:]
    mask = np.array([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    return hidden, head, targets, mask


def _seq_logprob(W, h, y, m):
    logp = jax.nn.log_softmax(h @ W.T, axis=-1)
    return jnp.sum(m * jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0])


@jax.jit
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
    hidden, head, targets, mask = _pair(0)
    hidden, head, m = jnp.asarray(hidden, dtype), jnp.asarray(head, dtype), jnp.asarray(mask, dtype)
    out = jax.jit(diagnostics.pair_gradient_products)(hidden, head, targets, mask)
    seq_grad = jax.jit(jax.grad(_seq_logprob))
    gw = seq_grad(head, hidden[0], targets[0], m[0])
    gl = seq_grad(head, hidden[1], targets[1], m[1])
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
    rng = np.random.default_rng(1)
    x = {"a": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
         "b": jnp.asarray(rng.standard_normal(5), jnp.float32)}

    def f(t):
        return jnp.sum(jnp.tanh(t["a"]) ** 3) + jnp.sum(t["a"][0] * t["b"][:4]) ** 2 + jnp.sum(jnp.exp(0.3 * t["b"]))

    flat, unravel = jax.flatten_util.ravel_pytree(x)
    exact = jax.jit(lambda u: jnp.trace(jax.hessian(lambda v: f(unravel(v)))(u)))(flat)
    est = jax.jit(diagnostics.hutchinson_trace, static_argnums=(0, 3))(f, x, jax.random.key(3), 400)
    assert est["samples"].shape == (400,)
    assert est["stderr"] > 0
    assert abs(est["trace"] - exact) < 4 * est["stderr"]


def test_hutchinson_is_exact_for_diagonal_hessians():
    """Rademacher probes have v_i² = 1: a diagonal Hessian gives the trace every time."""
    x = jnp.arange(1.0, 6.0)
    est = jax.jit(lambda u: diagnostics.hutchinson_trace(
        lambda v: jnp.sum(v**4), u, jax.random.key(0), 3))(x)
    np.testing.assert_allclose(est["trace"], jnp.sum(12 * x**2), rtol=1e-6)
    np.testing.assert_allclose(est["stderr"], 0.0, atol=1e-3)


def test_hutchinson_rejects_one_probe():
    with pytest.raises(ValueError, match="num_probes"):
        diagnostics.hutchinson_trace(jnp.sum, jnp.ones(2), jax.random.key(0), 1)


# ------------------------------------------------------------------ on a (micro) decoder

from lm import losses  # noqa: E402
from lm.models import builtin_config, forward_hidden, init_params, output_head  # noqa: E402
from lm.objectives import flatten_pairs  # noqa: E402


@functools.cache
def _micro():
    """A one-layer GPT-2 small enough for jax.hessian over every parameter."""
    cfg = builtin_config("gpt2-tiny", vocab_size=11, hidden_size=8, num_heads=2, num_kv_heads=2,
                         head_dim=4, num_layers=1, bos_token_id=1, eos_token_id=1, intermediate_size=8, max_position_embeddings=6)
    # Larger than the N(0, 0.02) init, so that p is far from uniform and H is not tiny.
    params = jax.jit(lambda k: jax.tree_util.tree_map(lambda x: 20.0 * x, init_params(cfg, k)))(
        jax.random.key(0))
    ref_params = jax.tree_util.tree_map(lambda x: 0.9 * x, params)
    ids = jnp.array([[[3, 4, 5, 6, 7, 1], [3, 4, 8, 6, 7, 1]],
                     [[9, 2, 5, 5, 1, 0], [9, 2, 4, 5, 1, 0]]], jnp.int32)
    attn = jnp.array([[[1] * 6, [1] * 6], [[1] * 5 + [0], [1] * 5 + [0]]], jnp.int32)
    loss_mask = jnp.array([[[0, 0, 1, 1, 1, 1]] * 2, [[0, 0, 1, 1, 1, 0]] * 2], jnp.int32)
    return cfg, params, ref_params, {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def test_gradient_products_on_a_decoder_match_autodiff_of_sequence_logps():
    cfg, params, _, batch = _micro()
    out = jax.jit(diagnostics.gradient_products, static_argnums=0)(cfg, params, batch)
    ids, attn, mask = (batch[k].reshape(4, 6) for k in ("input_ids", "attention_mask", "loss_mask"))

    @jax.jit
    def per_sequence_head_grads(p):  # (4, V, d): ∇_W log π of each sequence, h fixed
        hidden = forward_hidden(cfg, p, ids, attn)
        return jax.jacrev(lambda w: losses.sequence_logps(hidden, w, ids, mask)[0])(output_head(cfg, p))

    grads = per_sequence_head_grads(params)
    g = grads.reshape(2, 2, -1)
    inner = jnp.sum(g[:, 0] * g[:, 1], axis=-1)
    np.testing.assert_allclose(out["inner"], inner, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["norm_chosen"], jnp.linalg.norm(g[:, 0], axis=-1), rtol=1e-4)
    np.testing.assert_allclose(out["token_inner"].sum(axis=(1, 2)), inner, rtol=1e-4, atol=1e-5)
    assert out["token_cosine"].shape == (2, 5, 5)
    # Only response-to-response entries are non-zero (loss_mask shifted by one).
    assert np.all(np.asarray(out["token_inner"])[:, :1, :] == 0)
    assert np.all(np.asarray(out["token_inner"])[1, 4, :] == 0)


def _dpo_of(cfg, params, ref_params, batch, beta=0.1):
    ids, attn, mask = (batch[k].reshape(4, 6) for k in ("input_ids", "attention_mask", "loss_mask"))

    def logps(p):
        return losses.sequence_logps(forward_hidden(cfg, p, ids, attn), output_head(cfg, p), ids, mask)[0]

    ref = logps(ref_params).reshape(2, 2)
    return lambda lp: jnp.mean(-jax.nn.log_sigmoid(
        beta * ((lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1])))), logps, (ids, attn, mask)


def _traces(cfg, params, batch, ref_params, which):
    return jax.jit(lambda p, b, r: diagnostics.hessian_traces(
        cfg, p, b, jax.random.key(7), ref_params=r, num_probes=200, which=which))(
        params, batch, ref_params)


@pytest.fixture(scope="module")
def micro_traces():
    cfg, params, ref_params, batch = _micro()
    return cfg, params, ref_params, batch, _traces(cfg, params, batch, ref_params, ("head", "logits"))


def _assert_within(estimate, exact, name):
    assert abs(estimate["trace"] - exact) < 4 * estimate["stderr"], (name, estimate, exact)
    # ... and the test has teeth: the standard error is small next to the trace.
    assert estimate["stderr"] < 0.25 * abs(exact), (name, estimate["stderr"], exact)


def _assert_probes_exact(estimate, hessian, x, name):
    """Every probe's vᵀ H v against the exact Hessian [n, n] of ``x``'s flattening, each
    probe regenerated from _traces' key (so the estimate is the mean of exact quadratic
    forms: a wrong Hessian fails here, however wide the standard error), and the estimate
    within 4 standard errors of the exact trace."""
    keys = jax.random.split(jax.random.key(7), len(estimate["samples"]))
    probes = jax.vmap(lambda k: jax.flatten_util.ravel_pytree(
        diagnostics.rademacher_like(k, x))[0])(keys)
    want = np.einsum("pi,ij,pj->p", np.asarray(probes, np.float64), np.asarray(hessian, np.float64),
                     np.asarray(probes, np.float64))
    np.testing.assert_allclose(estimate["samples"], want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max(), err_msg=name)
    _assert_within(estimate, np.trace(np.asarray(hessian, np.float64)), name)


def test_head_trace_matches_exact_hessian(micro_traces):
    cfg, params, ref_params, batch, est = micro_traces
    dpo, _, (ids, attn, mask) = _dpo_of(cfg, params, ref_params, batch)
    hidden = forward_hidden(cfg, params, ids, attn)
    head = output_head(cfg, params)
    hessian = jax.jit(jax.hessian(
        lambda w: dpo(losses.sequence_logps(hidden, w.reshape(head.shape), ids, mask)[0].reshape(2, 2))
    ))(head.reshape(-1))
    _assert_probes_exact(est["head"], hessian, head, "head")


@pytest.mark.slow
def test_param_trace_matches_exact_hessian():
    """Every parameter (616 of them): ~1 min of compiling on a 2-core machine."""
    cfg, params, ref_params, batch = _micro()
    est = _traces(cfg, params, batch, ref_params, ("params",))
    dpo, logps, _ = _dpo_of(cfg, params, ref_params, batch)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    # Trace only: this float32 Hessian of every parameter is not symmetric to 10% (the
    # micro model's large weights), so single probes cannot be compared as the head's are.
    exact = jax.jit(lambda x: jnp.trace(jax.hessian(
        lambda u: dpo(logps(unravel(u)).reshape(2, 2)))(x)))(flat)
    _assert_within(est["params"], exact, "params")


def test_logit_trace_matches_closed_form(micro_traces):
    """tr ∇²_z L for DPO: ℓ''(Δ)‖∇_zΔ‖² + ℓ'(Δ)(−S_w + S_l), per pair, averaged, with
    ∇_{z_t}Δ = ±(e_y − p_t) and S = Σ_t Σ_v p_tv(1 − p_tv) (−tr ∇²_z log p_t(y))."""
    cfg, params, ref_params, batch, est = micro_traces
    beta = 0.1
    dpo, logps, (ids, attn, mask) = _dpo_of(cfg, params, ref_params, batch, beta)
    ref = logps(ref_params).reshape(2, 2)
    lp = logps(params).reshape(2, 2)
    delta = (lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1])
    d1 = -beta * jax.nn.sigmoid(-beta * delta)
    d2 = beta**2 * jax.nn.sigmoid(beta * delta) * jax.nn.sigmoid(-beta * delta)
    hidden = forward_hidden(cfg, params, ids, attn)
    p = jax.nn.softmax(hidden[:, :-1] @ output_head(cfg, params).T, axis=-1)
    m = mask[:, 1:].astype(jnp.float32)
    py = jnp.take_along_axis(p, ids[:, 1:, None], axis=-1)[..., 0]
    grad_sq = jnp.sum(m * (1 - 2 * py + jnp.sum(p * p, -1)), -1).reshape(2, 2).sum(-1)
    s = jnp.sum(m * jnp.sum(p * (1 - p), -1), -1).reshape(2, 2)
    exact = jnp.mean(d2 * grad_sq + d1 * (-s[:, 0] + s[:, 1]))
    z = hidden @ output_head(cfg, params).T
    hessian = jax.jit(jax.hessian(lambda zz: dpo(losses.sequence_logps_from_logits(
        zz.reshape(z.shape), ids, mask).reshape(2, 2))))(z.reshape(-1))
    np.testing.assert_allclose(np.trace(np.asarray(hessian, np.float64)), exact, rtol=1e-4)
    _assert_probes_exact(est["logits"], hessian, z, "logits")


def test_hessian_traces_rejects_unknown_hessian():
    cfg, params, _, batch = _micro()  # cached
    with pytest.raises(ValueError, match="--hessians"):
        diagnostics.hessian_traces(cfg, params, batch, jax.random.key(0), which=("trunk",))


# ------------------------------------------------------- the one-step effect of logits-SAM


def _effects(cfg, params, batch, ref_params):
    return {k: float(v) for k, v in jax.jit(lambda p, b, r: diagnostics.sam_step_effects(
        cfg, p, b, ref_params=r))(params, batch, ref_params).items()}


@pytest.fixture(scope="module")
def micro_effects():
    cfg, params, ref_params, batch = _micro()
    return _effects(cfg, params, batch, ref_params)


def _explicit_head_effects(cfg, params, ref_params, batch, beta=0.1):
    """The head-only expansion written out token by token in float64 NumPy: every ∇_W as
    an explicit V×d matrix, the curvature as the double sum over tokens (j, t) with the
    feature kernel h_j·h_t, the weight term from DPO's second derivative."""
    ids, attn, mask = (np.asarray(batch[k]).reshape(4, 6) for k in ("input_ids", "attention_mask", "loss_mask"))
    hidden = np.asarray(forward_hidden(cfg, params, jnp.asarray(ids), jnp.asarray(attn)), np.float64)
    W = np.asarray(output_head(cfg, params), np.float64)
    ref = np.asarray(_dpo_of(cfg, params, ref_params, batch)[1](ref_params), np.float64)
    tokens = [(r, t) for r in range(4) for t in range(5) if mask[r, t + 1]]
    h = {k: hidden[k] for k in tokens}
    p = {}
    for k in tokens:
        z = W @ h[k]
        p[k] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    u = {k: np.eye(W.shape[0])[ids[k[0], k[1] + 1]] - p[k] for k in tokens}
    logp = np.zeros(4)
    for k in tokens:
        logp[k[0]] += np.log(p[k][ids[k[0], k[1] + 1]])
    grad_seq = np.zeros((4,) + W.shape)  # ∇_W log π of each row
    for k in tokens:
        grad_seq[k[0]] += np.outer(u[k], h[k])
    delta = (logp[0::2] - ref[0::2]) - (logp[1::2] - ref[1::2])
    sig = 1 / (1 + np.exp(beta * delta))  # σ(−βΔ)
    B = 2
    c = np.zeros(4)
    c[0::2], c[1::2] = -beta * sig / B, beta * sig / B  # ∂L/∂log π of each row
    grad_L = np.einsum("r,rvd->vd", c, grad_seq)
    e_hat = grad_L / np.linalg.norm(grad_L)
    grad_m = grad_seq[0::2] - grad_seq[1::2]
    curv_w = beta ** 2 * sig * (1 - sig) / B  # ∂²L/∂Δ² / β² per pair
    out = {}
    for side, rows in (("chosen", (0, 2)), ("rejected", (1, 3))):
        grad_f = sum(grad_seq[r] for r in rows) / B
        curvature = self_term = 0.0
        for j in tokens:
            if j[0] not in rows:
                continue
            for t in tokens:
                dz = e_hat @ h[t]
                h_dz = p[t] * dz - p[t] * (p[t] @ dz)
                term = c[t[0]] * (u[j] @ h_dz) * (h[j] @ h[t]) / B
                curvature += term
                self_term += term if t == j else 0.0
        weight = -sum(curv_w[b] * np.vdot(grad_m[b], e_hat) * np.vdot(grad_f, grad_m[b]) for b in range(B))
        out.update({f"gd/{side}": -np.vdot(grad_f, grad_L), f"sam/{side}": curvature + weight,
                    f"sam/{side}/curvature": curvature, f"sam/{side}/weight": weight,
                    f"sam/{side}/self": self_term})
    return out


def test_sam_step_effects_match_an_explicit_token_sum(micro_effects):
    cfg, params, ref_params, batch = _micro()
    explicit = _explicit_head_effects(cfg, params, ref_params, batch)
    for name, value in explicit.items():
        assert abs(value) > 1e-6, name  # every term is exercised, none vanishes by accident
        np.testing.assert_allclose(micro_effects[name], value, rtol=2e-3, atol=1e-7, err_msg=name)


def _side_grad(cfg, ref_params, batch, side):
    _, logps, _ = _dpo_of(cfg, ref_params, ref_params, batch)
    return jax.jit(jax.grad(lambda p: jnp.mean(logps(p).reshape(2, 2)[:, side])))


def test_sam_step_effects_of_every_parameter_match_the_logits_sam_gradient(micro_effects):
    """−∇Fᵀ ∂_ρG against central differences in ρ of the production logits-SAM gradient."""
    from lm import objectives

    cfg, params, ref_params, batch = _micro()
    eps = 1e-3

    def grads(mode, rho):
        fn = objectives.make_grad_fn(cfg, loss="dpo", loss_kwargs={"beta": 0.1}, mode=mode, rho=rho)
        return jax.jit(fn)(params, batch, ref_params)[2]

    flat = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
    d_rho = (flat(grads("logits-sam", eps)) - flat(grads("logits-sam", -eps))) / (2 * eps)
    for i, side in enumerate(("chosen", "rejected")):
        grad_f = flat(_side_grad(cfg, ref_params, batch, i)(params))
        np.testing.assert_allclose(micro_effects[f"params/gd/{side}"],
                                   -jnp.vdot(grad_f, flat(grads("plain", 0.0))), rtol=1e-4)
        np.testing.assert_allclose(micro_effects[f"params/sam/{side}"], -jnp.vdot(grad_f, d_rho),
                                   rtol=1e-2)


def test_head_sam_effect_matches_a_signed_head_step():
    """The head-only ``sam`` is ∂/∂ρ of dynamics.sam.head_step's update (fixed features)."""
    from dynamics.sam import head_step

    cfg, params, ref_params, batch = _micro()
    effects = _effects(cfg, params, batch, ref_params)
    loss_of_logps, logps, (ids, attn, mask) = _dpo_of(cfg, params, ref_params, batch)
    hidden = forward_hidden(cfg, params, ids, attn)
    head = output_head(cfg, params)
    head_loss = lambda h, w: loss_of_logps(losses.sequence_logps(h, w, ids, mask)[0].reshape(2, 2))
    step = jax.jit(lambda rho: head - head_step(head_loss, hidden, head, 1.0, rho))
    eps = 1e-3
    d_rho = (step(eps) - step(-eps)) / (2 * eps)
    grad_f = jax.grad(lambda w: jnp.mean(
        losses.sequence_logps(hidden, w, ids, mask)[0].reshape(2, 2)[:, 0]))(head)
    np.testing.assert_allclose(effects["sam/chosen"], -jnp.vdot(grad_f, d_rho), rtol=1e-2)


def _bf16_tiny(seed):
    """gpt2-tiny under bf16 compute, its random weights and a 2-pair batch (prompt 6 of 16)."""
    cfg = builtin_config("gpt2-tiny", dtype="bfloat16")
    rng = np.random.default_rng(seed)
    mask = np.zeros((2, 2, 16), np.int32)
    mask[..., 6:] = 1
    batch = {"input_ids": rng.integers(0, cfg.vocab_size, (2, 2, 16)).astype(np.int32),
             "attention_mask": np.ones((2, 2, 16), np.int32), "loss_mask": mask}
    return cfg, init_params(cfg, jax.random.key(0)), batch


def _float32_head_logps(cfg, params, batch):
    """Sequence log-probs (2B,) with the trunk's output in float32 through a float32 head."""
    ids, attn, m = flatten_pairs(batch)
    hidden = forward_hidden(cfg, params, ids, attn).astype(jnp.float32)
    return losses.sequence_logps(hidden, output_head(cfg, params).astype(jnp.float32), ids, m)[0]


def test_step_probe_reference_matches_its_float32_policy_under_bfloat16():
    """sam_step_effects scores the policy through a float32 head; with ref_params=None its
    reference must come out identical, so DPO's margin is exactly 0 (loss log 2)."""
    cfg, params, batch = _bf16_tiny(0)
    loss_of_logps = diagnostics._pair_objective(cfg, params, batch, None, "dpo", {"beta": 0.1},
                                                head_dtype="float32")
    assert float(loss_of_logps(_float32_head_logps(cfg, params, batch))) == pytest.approx(
        np.log(2), abs=1e-7)


def test_every_parameters_effects_under_bfloat16_go_through_the_float32_head():
    """``params/gd``: −∇θF_sᵀ ∇θL with both gradients through the float32 head, as the
    reference's log-probs, under bf16 compute (a bf16 head made the margin nonzero at
    ref_params = params and rounded both gradients' head products)."""
    from lm import objectives

    cfg, params, batch = _bf16_tiny(1)
    effects = jax.jit(lambda p, b: diagnostics.sam_step_effects(
        cfg, p, b, loss_kwargs={"beta": 0.1}))(params, batch)
    grad_fn = objectives.make_grad_fn(cfg, loss="dpo", loss_kwargs={"beta": 0.1},
                                      head_dtype="float32")
    grad_L = jax.flatten_util.ravel_pytree(jax.jit(grad_fn)(params, batch, params)[2])[0]

    def side(p, i):
        return jnp.mean(_float32_head_logps(cfg, p, batch).reshape(2, 2)[:, i])

    for i, name in enumerate(("chosen", "rejected")):
        grad_f = jax.flatten_util.ravel_pytree(jax.jit(jax.grad(side))(params, i))[0]
        np.testing.assert_allclose(effects[f"params/gd/{name}"], -jnp.vdot(grad_f, grad_L),
                                   rtol=1e-5)
