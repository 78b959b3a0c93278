"""Log-probs against a naive full-logits gather; every loss against numpy by hand."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import losses as L

N, T, D, V = 3, 7, 5, 11


def _inputs(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(N, T, D)), dtype)
    head = jnp.asarray(rng.normal(size=(V, D)), dtype)
    ids = jnp.asarray(rng.integers(0, V, size=(N, T)), jnp.int32)
    mask = np.zeros((N, T), np.int32)
    mask[0, 3:] = 1
    mask[1, 2:5] = 1  # right padding after the response
    mask[2, 6:] = 1
    return hidden, head, ids, jnp.asarray(mask)


def _naive_token_logps(hidden, head, ids, mask):
    """Full logits, jax.nn.log_softmax, a Python-loop gather."""
    logp = np.asarray(jax.nn.log_softmax(jnp.einsum("ntd,vd->ntv", hidden, head), axis=-1))
    out = np.zeros((N, T - 1))
    for n in range(N):
        for t in range(T - 1):
            if mask[n, t + 1]:
                out[n, t] = logp[n, t, int(ids[n, t + 1])]
    return out


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 18, 100])
def test_token_logps_match_naive_gather(chunk_size):
    hidden, head, ids, mask = _inputs()
    got = L.token_logps(hidden, head, ids, mask, chunk_size=chunk_size)
    np.testing.assert_allclose(got, _naive_token_logps(hidden, head, ids, mask), atol=1e-5)
    seq, counts = L.sequence_logps(hidden, head, ids, mask, chunk_size=chunk_size)
    np.testing.assert_allclose(seq, np.asarray(got).sum(-1), atol=1e-5)
    np.testing.assert_array_equal(counts, [4, 3, 1])


# Both backward paths of the chunked head, each forced (keeps_softmax_gradient chooses the
# kept one for bf16 features alone; float32 makes these comparisons exact), at chunk sizes
# with a partial last chunk (T = 7: 7, 3 and 2 chunks).
CHUNKINGS = [(path, c) for path in ("recomputed", "kept") for c in (1, 3, 4)]


@pytest.fixture(autouse=True)
def backward_path(request, monkeypatch):
    """Force the path of a test parametrized by ``path``."""
    path = request.node.callspec.params.get("path") if hasattr(request.node, "callspec") else None
    if path is not None:
        monkeypatch.setattr(L, "keeps_softmax_gradient", lambda *_: path == "kept")


def test_which_backward_the_chunked_head_runs():
    """Kept for at most KEPT_CHUNKS chunks of features narrower than float32 (whose kept
    softmax gradients would be the float32 logits whole); unchunked never."""
    assert [L.keeps_softmax_gradient(512, c, jnp.bfloat16) for c in (64, 128, 256, 511)] == \
        [False, True, True, False]
    assert not any(L.keeps_softmax_gradient(512, c, jnp.float32) for c in (128, 256))
    assert not L.keeps_softmax_gradient(512, None, jnp.bfloat16)


@pytest.mark.parametrize("path, chunk", CHUNKINGS)
def test_chunked_gradients_match_unchunked(path, chunk):
    hidden, head, ids, mask = _inputs(1)
    w = jnp.arange(N, dtype=jnp.float32) + 1.0

    def f(h, W, chunk):
        return jnp.sum(w * L.sequence_logps(h, W, ids, mask, chunk_size=chunk)[0])

    g_full = jax.grad(f, argnums=(0, 1))(hidden, head, None)
    g_chunk = jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=2)(hidden, head, chunk)
    for a, b in zip(g_full, g_chunk):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Positions whose next token is masked get no gradient.
    assert np.all(np.asarray(g_full[0])[2, :5] == 0)


@pytest.mark.parametrize("path, chunk", CHUNKINGS)
@pytest.mark.parametrize("wrt", ["hidden", "head", "perturbed head"])
def test_chunked_gradient_of_one_input_alone_matches_unchunked(wrt, path, chunk):
    """The chunked head's backward forms ∂h and ∂W only for the inputs that are
    differentiated (logits-SAM's inner gradient takes ∂W alone); each must still be the
    unchunked autodiff gradient, the other input held constant."""
    hidden, head, ids, mask = _inputs(4)
    e = 0.1 * jax.random.normal(jax.random.PRNGKey(5), head.shape)
    w = jnp.arange(N, dtype=jnp.float32) - 1.5

    def f(x, chunk):
        h, W = (x, head) if wrt == "hidden" else (hidden, x)
        if wrt == "perturbed head":
            W = L.PerturbedHead(W, e)
        return jnp.sum(w * L.sequence_logps(h, W, ids, mask, chunk_size=chunk)[0])

    x = hidden if wrt == "hidden" else head
    np.testing.assert_allclose(jax.jit(jax.grad(f), static_argnums=1)(x, chunk),
                               jax.grad(f)(x, None), atol=1e-5)


@pytest.mark.parametrize("path", ["recomputed", "kept"])
def test_chunked_log_probs_whose_cotangent_is_a_symbolic_zero(path):
    """An outer custom VJP may return no cotangent for the log-probs (None, a symbolic zero):
    the chunked head's backward then contributes nothing, as the unchunked one does."""
    hidden, head, ids, mask = _inputs(7)

    @jax.custom_vjp
    def uses(logps, x):
        return jnp.sum(logps) + jnp.sum(x)

    uses.defvjp(lambda logps, x: (uses(logps, x), x), lambda x, ct: (None, ct * jnp.ones_like(x)))

    def f(h, W, chunk):
        return uses(L.token_logps(h, W, ids, mask, chunk_size=chunk), h)

    for chunk in (3, 4):
        for a, b in zip(jax.grad(f, (0, 1))(hidden, head, chunk),
                        jax.grad(f, (0, 1))(hidden, head, None)):
            np.testing.assert_array_equal(a, b)


def _walk(jaxpr, inside_loop=False):
    """(equation, whether it runs inside a scan or while body) over a jaxpr and its sub-jaxprs."""
    from jax.extend.core import jaxprs_in_params
    for eqn in jaxpr.eqns:
        yield eqn, inside_loop
        loop = inside_loop or eqn.primitive.name in ("scan", "while")
        for sub in jaxprs_in_params(eqn.params):
            yield from _walk(sub, loop)


def _head_program(chunk, wrt=(0, 1)):
    """(equation, inside a loop) of the bf16 chunked head's gradient w.r.t. ``wrt``."""
    hidden, head, ids, mask = _inputs(6)

    def f(h, W):
        return jnp.sum(L.sequence_logps(h, W, ids, mask, chunk_size=chunk)[0])

    return list(_walk(jax.make_jaxpr(jax.grad(f, argnums=wrt))(
        hidden.astype(jnp.bfloat16), head).jaxpr))


def _check_head_program(eqns, matmuls, chunks=1):
    """``matmuls`` matmuls per chunk, each over V padded to HEAD_ALIGNMENT (the chunked
    log-probs and gradients match the unpadded ones: the tests above, V = 11); one
    max-reduction over the vocabulary per chunk (the CPU's branch of
    ``padded_logsumexp``; an autodiff backward of a rematerialised chunk reduces again); and the head cast to bf16 outside the chunk loops, where no GEMM
    re-reads it in float32 for each tile. ``chunks``: the chunks written out (unrolled),
    1 for a loop, whose body the program holds once."""
    aligned = L.HEAD_ALIGNMENT
    over_vocab = [e for e, _ in eqns if e.primitive.name == "reduce_max"]
    assert [e.invars[0].aval.shape[-1] for e in over_vocab] == [aligned] * chunks
    dots = [e for e, _ in eqns if e.primitive.name == "dot_general"]
    assert len(dots) == matmuls * chunks
    assert all(aligned in {d for v in (*e.invars, *e.outvars) for d in v.aval.shape}
               and V not in {d for v in (*e.invars, *e.outvars) for d in v.aval.shape}
               for e in dots)
    casts = [loop for e, loop in eqns if e.primitive.name == "convert_element_type"
             and e.invars[0].aval.shape == (V, D)]
    assert casts and not any(casts)


def test_chunked_backward_recomputes_the_logits_but_not_their_logsumexp():
    """Seven bf16 chunks (more than keeps_softmax_gradient allows): per chunk the forward's
    h Wᵀ and logsumexp, the backward's recomputed h Wᵀ, G W and Gᵀ h."""
    _check_head_program(_head_program(1), matmuls=4)
    _check_head_program(_head_program(1, wrt=1), matmuls=3)


def test_chunked_backward_reads_the_kept_softmax_gradients():
    """Three bf16 chunks, unrolled: per chunk the forward's h Wᵀ and U = Q W (Q the softmax
    gradient), and the backward's Qᵀ (c h): no logits recomputed; ∂W alone (logits-SAM's
    inner gradient) forms no U."""
    _check_head_program(_head_program(3), matmuls=3, chunks=3)
    _check_head_program(_head_program(3, wrt=1), matmuls=2, chunks=3)


@pytest.mark.parametrize("offset", [0.0, 1e3, -1e4])
def test_one_read_logsumexp_matches_float64(offset):
    """The accelerators' logsumexp of the chunked head (one reduction of (max, Σ exp) pairs)
    against float64, with padded columns left out (V = 300 of 384; every column real; one
    real column), at logit scales where exp(z) alone would overflow or underflow."""
    z = offset + 8.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 3, 384), jnp.float32)
    z64 = np.asarray(z, np.float64)
    for vocab in (300, 384, 1):
        want = np.log(np.exp(z64[..., :vocab] - z64.max()).sum(-1)) + z64.max()
        got = L.one_read_logsumexp(z, vocab)
        assert got.shape == (4, 3)
        np.testing.assert_allclose(got, want, rtol=2e-7, atol=2e-6 * max(1.0, abs(offset) / 100))
    # The pair reducer on two empty pairs, and an empty pair with a real one.
    m, s = L._max_and_scaled_sum((jnp.float32(-jnp.inf), jnp.float32(0)),
                                 (jnp.float32(-jnp.inf), jnp.float32(0)))
    assert m == -np.inf and s == 0
    m, s = L._max_and_scaled_sum((jnp.float32(-jnp.inf), jnp.float32(0)),
                                 (jnp.float32(2.0), jnp.float32(3.0)))
    assert (m, s) == (2.0, 3.0)
    with pytest.raises(ValueError, match="300 columns, not a multiple of 128"):
        L.one_read_logsumexp(z[..., :300], 200)


def test_padded_logsumexp_derivatives_are_the_softmax():
    """Gradient and Hessian-vector product of the chunked head's logsumexp (a custom JVP:
    the accelerators' pair reduction has no derivative rule) against ``jax.nn.logsumexp``
    of the real columns."""
    z = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (2, 5, 256), jnp.float32)
    v = jax.random.normal(jax.random.PRNGKey(2), z.shape, jnp.float32)

    def ours(z):
        return jnp.sum(jnp.sin(L.padded_logsumexp(z, 200)))

    def ref(z):
        return jnp.sum(jnp.sin(jax.nn.logsumexp(z[..., :200], axis=-1)))

    np.testing.assert_allclose(jax.grad(ours)(z), jax.grad(ref)(z), atol=1e-6)
    assert not np.any(np.asarray(jax.grad(ours)(z))[..., 200:])
    hvp = [jax.jvp(jax.grad(f), (z,), (v,))[1] for f in (ours, ref)]
    np.testing.assert_allclose(*hvp, atol=1e-5)
    # At logits near 1e4 the softmax keeps float32's precision (exp(z − lse) would not),
    # and a NaN tangent in a padded column stays out.
    far = z + 1e4
    np.testing.assert_allclose(jax.grad(ours)(far), jax.grad(ref)(far), atol=2e-6)
    nan_pad = v.at[..., 250].set(jnp.nan)
    tangent = jax.jvp(lambda z: L.padded_logsumexp(z, 200), (z,), (nan_pad,))[1]
    assert np.all(np.isfinite(tangent))


@pytest.mark.parametrize("path, chunk", [("recomputed", 3), ("kept", 3), ("kept", 4)])
def test_chunked_head_with_the_one_read_logsumexp(path, chunk, monkeypatch):
    """The chunked head's log-probs and both gradients with the accelerators' logsumexp
    forced on the CPU (float32: against the unchunked head, as above)."""
    monkeypatch.setattr(L, "_two_pass_logsumexp", L.one_read_logsumexp)
    hidden, head, ids, mask = _inputs(7)
    w = jnp.arange(N, dtype=jnp.float32) + 0.5

    def f(h, W, chunk):
        return jnp.sum(w * L.sequence_logps(h, W, ids, mask, chunk_size=chunk)[0])

    np.testing.assert_allclose(jax.jit(f, static_argnums=2)(hidden, head, chunk),
                               f(hidden, head, None), rtol=1e-6)
    g_chunk = jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=2)(hidden, head, chunk)
    for a, b in zip(jax.grad(f, argnums=(0, 1))(hidden, head, None), g_chunk):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_chunked_head_reads_its_logits_once_for_the_logsumexp_on_a_gpu():
    """Lowered for a GPU (on the CPU), the chunks' logsumexp is a reduction of pairs, no
    max-reduction of its own; lowered for the CPU, a max-reduction and an exp-sum."""
    hidden, head, ids, mask = _inputs(8)
    f = jax.jit(lambda h, W: L.sequence_logps(h, W, ids, mask, chunk_size=3)[0])
    pair = re.compile(r"stablehlo\.reduce\(%\S+ init: %\S+\), \(%\S+ init: %\S+\)")
    cuda = f.trace(hidden, head).lower(lowering_platforms=("cuda",)).as_text()
    cpu = f.trace(hidden, head).lower(lowering_platforms=("cpu",)).as_text()
    # The chunk loop's body once: the pairs reduced in blocks of 128 columns, then across.
    assert len(pair.findall(cuda)) == 2 and "applies stablehlo.maximum" not in cuda
    assert not pair.findall(cpu) and "applies stablehlo.maximum" in cpu


def test_logps_are_float32_from_bfloat16():
    hidden, head, ids, mask = _inputs(2, jnp.bfloat16)
    seq, _ = L.sequence_logps(hidden, head, ids, mask, chunk_size=5)
    assert seq.dtype == jnp.float32
    ref = _naive_token_logps(hidden.astype(jnp.float32), head.astype(jnp.float32), ids, mask)
    np.testing.assert_allclose(seq, ref.sum(-1), atol=1e-4)


def test_bad_chunk_size():
    hidden, head, ids, mask = _inputs()
    with pytest.raises(ValueError, match="--chunk-size"):
        L.token_logps(hidden, head, ids, mask, chunk_size=0)


# ------------------------------------------------------------------------------- losses

RNG = np.random.default_rng(3)
PC, PR, RC, RR = (-RNG.uniform(1, 30, size=6) for _ in range(4))
LC, LR = RNG.integers(1, 20, size=6).astype(float), RNG.integers(1, 20, size=6).astype(float)
PAIRS = L.PairLogps(*(jnp.asarray(x, jnp.float32) for x in (PC, PR, RC, RR, LC, LR)))


def _logsig(x):
    return -np.log1p(np.exp(-x))


def _hand(name, hp):
    d = (PC - RC) - (PR - RR)
    b = hp.get("beta")
    if name == "dpo":
        return -_logsig(b * d)
    if name == "cdpo":
        e = hp["label_smoothing"]
        return -(1 - e) * _logsig(b * d) - e * _logsig(-b * d)
    if name == "robust":
        e = hp["label_smoothing"]
        return (-(1 - e) * _logsig(b * d) + e * _logsig(-b * d)) / (1 - 2 * e)
    if name == "ipo":
        dn = (PC / LC - RC / LC) - (PR / LR - RR / LR)
        return (dn - 1 / (2 * b)) ** 2
    if name == "hinge":
        return np.maximum(0, 1 - b * d)
    if name == "dpop":
        return -_logsig(b * (d - hp["lam"] * np.maximum(0, RC - PC)))
    if name == "slic":
        return np.maximum(0, hp["delta"] - PC + PR) - hp["lam"] * PC
    if name == "cpo":
        return -_logsig(b * PC - b * PR) - hp["lam"] * PC
    if name == "simpo":
        return -_logsig(b / LC * PC - b / LR * PR - hp["gamma"])
    raise AssertionError(name)


CASES = [
    ("dpo", {"beta": 0.3}),
    ("cdpo", {"beta": 0.2, "label_smoothing": 0.2}),
    ("robust", {"beta": 0.2, "label_smoothing": 0.2}),
    ("ipo", {"beta": 0.5}),
    ("hinge", {"beta": 0.05}),
    ("dpop", {"beta": 0.1, "lam": 5.0}),
    ("slic", {"delta": 2.0, "lam": 0.5}),
    ("cpo", {"beta": 0.05, "lam": 1.0}),
    ("simpo", {"beta": 2.0, "gamma": 0.5}),
]


def test_registry_covers_every_case():
    assert {c[0] for c in CASES} == set(L.LOSSES)


@pytest.mark.parametrize("name,hp", CASES)
def test_loss_equals_hand_computation(name, hp):
    loss = L.get_loss(name, **hp)
    np.testing.assert_allclose(loss(PAIRS), _hand(name, hp), rtol=1e-5, atol=1e-5)


def test_dpop_penalty_is_active_in_the_test_data():
    assert np.any(RC > PC) and np.any(RC < PC)


@pytest.mark.parametrize("name", ["slic", "cpo", "simpo"])
def test_reference_free_losses_ignore_the_reference(name):
    loss = L.get_loss(name)
    moved = PAIRS._replace(ref_chosen=PAIRS.ref_chosen + 7.0, ref_rejected=PAIRS.ref_rejected * 3)
    np.testing.assert_array_equal(loss(PAIRS), loss(moved))
    assert loss.reference_free
    np.testing.assert_array_equal(
        list(loss.metrics(PAIRS, loss(PAIRS)).values()),
        list(loss.metrics(moved, loss(moved)).values()),
    )


def test_reference_losses_read_the_reference():
    for name, spec in L.LOSSES.items():
        if spec.reference_free:
            continue
        loss = L.get_loss(name)
        moved = PAIRS._replace(ref_chosen=PAIRS.ref_chosen + 3.0)
        assert not np.allclose(loss(PAIRS), loss(moved)), name


def test_label_smoothing_zero_is_dpo():
    for name in ("cdpo", "robust"):
        np.testing.assert_allclose(
            L.get_loss(name, beta=0.3, label_smoothing=0.0)(PAIRS),
            L.get_loss("dpo", beta=0.3)(PAIRS),
            rtol=1e-6,
        )


def test_metrics_by_hand():
    beta = 0.3
    loss = L.get_loss("dpo", beta=beta)
    m = loss.metrics(PAIRS, loss(PAIRS))
    rc, rr = beta * (PC - RC), beta * (PR - RR)
    np.testing.assert_allclose(m["rewards/chosen"], rc.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/rejected"], rr.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/margins"], (rc - rr).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/accuracies"], (rc > rr).mean())
    np.testing.assert_allclose(m["logps/chosen"], PC.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["logps/rejected"], PR.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["loss"], _hand("dpo", {"beta": beta}).mean(), rtol=1e-5)
    cpo = L.get_loss("cpo", beta=0.05)
    m = cpo.metrics(PAIRS, cpo(PAIRS))
    np.testing.assert_allclose(m["rewards/chosen"], 0.05 * PC.mean(), rtol=1e-5)
    simpo = L.get_loss("simpo", beta=2.0)
    m = simpo.metrics(PAIRS, simpo(PAIRS))
    np.testing.assert_allclose(m["rewards/rejected"], 2.0 * (PR / LR).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["logps/rejected"], PR.mean(), rtol=1e-6)


@pytest.mark.parametrize(
    "name,hp,flag",
    [
        ("nope", {}, "--loss"),
        ("dpo", {"beta": -0.1}, "--beta"),
        ("dpo", {"beta": 0.0}, "--beta"),
        ("ipo", {"beta": float("nan")}, "--beta"),
        ("dpo", {"gamma": 1.0}, "--gamma"),
        ("slic", {"lam": -1.0}, "--lam"),
        ("robust", {"label_smoothing": 0.5}, "--label-smoothing"),
        ("cdpo", {"label_smoothing": 0.7}, "--label-smoothing"),
        ("simpo", {"gamma": "x"}, "--gamma"),
    ],
)
def test_bad_hyper_parameters_name_the_flag(name, hp, flag):
    with pytest.raises(ValueError, match=flag) as err:
        L.get_loss(name, **hp)
    assert "\n" not in str(err.value)


def test_chunks_of_prompt_or_padding_are_skipped_without_changing_anything():
    """The DPO layout: prompts longer than a chunk and bucket padding, so whole chunks
    have no counted target and skip their head matmul; values and gradients must not
    notice (a skipped chunk that dropped a counted token would change both)."""
    rng = np.random.default_rng(3)
    n, t, prompt = 4, 16, 8
    hidden = jnp.asarray(rng.normal(size=(n, t, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, size=(n, t)), jnp.int32)
    mask = np.zeros((n, t), np.int32)
    mask[:, prompt:12] = 1  # targets 8..11 counted: chunks [0, 4), [4, 8) and [12, 16) skip
    mask[1, 12] = 1  # except one row reaching into the last chunk
    mask = jnp.asarray(mask)

    def f(h, W, chunk):
        return jnp.sum(L.sequence_logps(h, W, ids, mask, chunk_size=chunk)[0] ** 2)

    for chunk in (4, 3):
        np.testing.assert_allclose(
            L.token_logps(hidden, head, ids, mask, chunk_size=chunk),
            L.token_logps(hidden, head, ids, mask), atol=1e-5)
        for a, b in zip(jax.grad(f, argnums=(0, 1))(hidden, head, None),
                        jax.grad(f, argnums=(0, 1))(hidden, head, chunk)):
            np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("e_dtype", [jnp.float32, jnp.bfloat16])
def test_a_perturbed_head_is_its_sum_in_value_and_gradient(chunk_size, e_dtype):
    """PerturbedHead(W, e) is the head W + e (logits-SAM's), formed inside each chunk in
    W's dtype; the gradient reaches W as it would the stored sum."""
    hidden, head, ids, mask = _inputs(2)
    e = (0.1 * jax.random.normal(jax.random.PRNGKey(3), head.shape)).astype(e_dtype)

    def f(W, perturbed):
        h = L.PerturbedHead(W, e) if perturbed else W + e.astype(W.dtype)
        return jnp.sum(L.token_logps(hidden, h, ids, mask, chunk_size=chunk_size))

    np.testing.assert_allclose(f(head, True), f(head, False), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(f)(head, True), jax.grad(f)(head, False), atol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 3, 4])
def test_with_lse_is_each_targets_logsumexp(chunk_size):
    """``with_lse``: logsumexp of the logits at every target position, counted or not,
    without derivative; 0 where a chunk without counted targets skipped its matmul."""
    hidden, head, ids, _ = _inputs(9)
    mask = jnp.zeros((N, T), jnp.int32).at[:, 4:].set(1).at[1, 6].set(0)
    logps, lse = L.token_logps(hidden, head, ids, mask, chunk_size=chunk_size, with_lse=True)
    np.testing.assert_allclose(logps, L.token_logps(hidden, head, ids, mask), atol=1e-5)
    full = np.array(jax.nn.logsumexp(jnp.einsum("ntd,vd->ntv", hidden[:, :-1], head), axis=-1))
    if chunk_size is not None:  # the first chunk's targets, 0 .. c − 1 < 4, all uncounted
        full[:, :chunk_size - 1] = 0.0
    np.testing.assert_allclose(lse, full, atol=1e-5)
    grad = jax.grad(lambda h: jnp.sum(L.token_logps(h, head, ids, mask, chunk_size=chunk_size,
                                                    with_lse=True)[1]))(hidden)
    assert not np.any(np.asarray(grad))


def _perturbed_inputs(scale, seed=10):
    hidden, head, ids, mask = _inputs(seed)
    e = scale * jax.random.normal(jax.random.PRNGKey(seed), head.shape)
    return hidden, head, e, ids, mask


def _perturbed_objective(head, e, ids, mask, chunk, lse):
    """Σ_n w_n log π(y_n) under the perturbed head, shifted by ``lse`` when given."""
    w = jnp.arange(N, dtype=jnp.float32) - 0.7

    def f(h, W):
        return jnp.sum(w * L.sequence_logps(h, L.PerturbedHead(W, e, lse), ids, mask,
                                            chunk_size=chunk)[0])

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


@pytest.mark.parametrize("path, chunk", [("kept", 3), ("kept", 4), ("recomputed", 3)])
def test_a_perturbed_head_shifted_by_the_unperturbed_lse_is_unchanged(path, chunk):
    """Given the unperturbed lse, a kept chunk of the perturbed head reads its logits once
    (E = exp(z − lse₀), lse = lse₀ + log Σ E, Q = onehot − E/Σ E): its log-probs and both
    gradients are those computed without the shift, to float32 rounding. The recomputed
    path does not read the shift."""
    hidden, head, e, ids, mask = _perturbed_inputs(0.05)
    _, lse = L.token_logps(hidden, head, ids, mask, chunk_size=chunk, with_lse=True)
    plain = _perturbed_objective(head, e, ids, mask, chunk, None)(hidden, head)
    shifted = _perturbed_objective(head, e, ids, mask, chunk, lse)(hidden, head)
    for a, b in zip(jax.tree_util.tree_leaves(shifted), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # It was the shifted pass: a shift off by more than SHIFT_RANGE makes the kept chunks'
    # lse NaN (what the bound rules out for the unperturbed lse), not a wrong number.
    wrong = _perturbed_objective(head, e, ids, mask, chunk, lse + 2 * L.SHIFT_RANGE)
    value, _ = wrong(hidden, head)
    assert np.isnan(value) == (path == "kept")


@pytest.mark.parametrize("path", ["kept"])
def test_a_perturbed_head_out_of_the_shifts_reach_reads_its_logits_twice(path):
    """Where the bound cannot promise that the perturbed lse lies within SHIFT_RANGE of the
    shift (a large e), the chunk runs the exact pass: the same numbers, whatever the shift."""
    hidden, head, e, ids, mask = _perturbed_inputs(50.0)
    _, lse = L.token_logps(hidden, head, ids, mask, chunk_size=3, with_lse=True)
    bound = L._perturbation_bound(L.PerturbedHead(head, e), hidden.dtype)
    assert np.max(np.linalg.norm(hidden, axis=-1)) * bound + 1 > L.SHIFT_RANGE
    plain = _perturbed_objective(head, e, ids, mask, 3, None)(hidden, head)
    for shift in (lse, lse + 2 * L.SHIFT_RANGE):
        shifted = _perturbed_objective(head, e, ids, mask, 3, shift)(hidden, head)
        for a, b in zip(jax.tree_util.tree_leaves(shifted), jax.tree_util.tree_leaves(plain)):
            np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_perturbation_bound_bounds_the_change_of_every_rows_lse(dtype):
    """|lse(h w′ᵀ) − lse(h wᵀ)| ≤ ‖h‖ B for the heads as the logits multiply them (cast to
    the features' dtype), with w′ − w from a tiny e whose bf16 sum rounds W's entries too."""
    rng = np.random.default_rng(11)
    head = jnp.asarray(rng.normal(size=(300, 16)), jnp.float32)
    e = jnp.asarray(1e-3 * rng.normal(size=head.shape), jnp.float32)
    h = jnp.asarray(rng.normal(size=(500, 16)) * rng.uniform(0.1, 30, size=(500, 1)), dtype)
    bound = L._perturbation_bound(L.PerturbedHead(head, e), dtype)

    def lse(w):
        return jax.nn.logsumexp(jnp.einsum("nd,vd->nv", h, w.astype(dtype),
                                           preferred_element_type=jnp.float32), axis=-1)

    change = np.abs(np.asarray(lse(head + e) - lse(head)))
    norms = np.linalg.norm(np.asarray(h, np.float32), axis=-1)
    assert np.all(change <= norms * float(bound))
    assert float(bound) < 10 * float(jnp.max(jnp.linalg.norm(
        (head + e).astype(dtype).astype(jnp.float32) - head.astype(dtype).astype(jnp.float32),
        axis=-1)))


def test_the_slot_past_the_last_target_holds_no_features():
    """T not a multiple of the chunk: the chunk layout's slot T, which predicts no target,
    holds zeros, not h_{T−1}. The unperturbed lse, which has no entry there, shifts it by 0:
    with h_{T−1}'s logits (|lse| ≈ 115) there, the perturbed pass's exponentials overflowed
    and the gradients came out NaN (the value, masked, did not show it). bf16: the kept path
    by default."""
    rng = np.random.default_rng(0)
    n, t, d, v = 2, 7, 16, 11
    hidden = rng.normal(size=(n, t, d))
    hidden[:, -1] *= 60
    hidden = jnp.asarray(hidden, jnp.bfloat16)
    head = jnp.asarray(rng.normal(size=(v, d)) / 4, jnp.float32)
    e = jnp.asarray(1e-5 * rng.normal(size=(v, d)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, v, size=(n, t)), jnp.int32)
    mask = jnp.zeros((n, t), jnp.int32).at[:, 3:].set(1)
    assert L.keeps_softmax_gradient(t, 3, jnp.bfloat16)
    _, lse = L.token_logps(hidden, head, ids, mask, chunk_size=3, with_lse=True)

    def f(h, W, shift):
        return jnp.sum(L.sequence_logps(h, L.PerturbedHead(W, e, shift), ids, mask,
                                        chunk_size=3)[0])

    plain = jax.value_and_grad(f, argnums=(0, 1))(hidden, head, None)
    shifted = jax.value_and_grad(f, argnums=(0, 1))(hidden, head, lse)
    for a, b in zip(jax.tree_util.tree_leaves(shifted), jax.tree_util.tree_leaves(plain)):
        assert np.all(np.isfinite(np.asarray(a, np.float32)))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=2e-2, atol=1e-3)
    _, _, (h_prev,), _ = L._chunk_layout((hidden,), (), ids, mask, 3)
    slots = np.asarray(jnp.moveaxis(h_prev, 0, 1).reshape(n, -1, d), np.float32)
    assert not np.any(slots[:, t]) and np.array_equal(slots[:, 1:t], np.asarray(hidden[:, :-1],
                                                                               np.float32))


@pytest.mark.parametrize("path", ["kept"])
def test_uncounted_rows_whatever_their_shift_add_nothing(path):
    """Rows whose target does not count (the prompt's here) have cotangent 0: the shifted
    pass writes them no Q̃ and no r, so a shift far off there (exp(z − shift) out of range,
    their lse NaN, masked) leaves the log-probs and gradients as they are."""
    hidden, head, e, ids, mask = _perturbed_inputs(0.05, seed=15)
    _, lse = L.token_logps(hidden, head, ids, mask, chunk_size=3, with_lse=True)
    uncounted = np.asarray(mask[:, 1:]) == 0
    off = jnp.where(uncounted, lse - 200.0, lse)
    plain = _perturbed_objective(head, e, ids, mask, 3, None)(hidden, head)
    shifted = _perturbed_objective(head, e, ids, mask, 3, off)(hidden, head)
    for a, b in zip(jax.tree_util.tree_leaves(shifted), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["kept"])
def test_each_row_is_shifted_by_its_own_unperturbed_lse(path):
    """Logsumexps 32 nats apart from one position to the next, a tiny e: the perturbed
    pass takes the shift everywhere, and only each row's own lse keeps it in range (a
    shift off by one position makes the counted rows NaN)."""
    _, head, ids, mask = _inputs(12)
    head = head.at[0].multiply(3.0)  # the longest row: its logit leads, lse ≈ c ‖w_0‖
    along = head[0] / jnp.linalg.norm(head[0])
    noise = 0.01 * jax.random.normal(jax.random.PRNGKey(11), (N, T, D))
    hidden = (5.0 + 10.0 * jnp.arange(T, dtype=jnp.float32))[None, :, None] * along + noise
    e = 1e-7 * jax.random.normal(jax.random.PRNGKey(12), head.shape)
    _, lse = L.token_logps(hidden, head, ids, mask, chunk_size=3, with_lse=True)
    assert np.min(np.abs(np.diff(np.asarray(lse), axis=1))) > L.SHIFT_RANGE
    bound = L._perturbation_bound(L.PerturbedHead(head, e), hidden.dtype)
    assert np.max(np.linalg.norm(hidden, axis=-1)) * bound + 1 <= L.SHIFT_RANGE
    plain = _perturbed_objective(head, e, ids, mask, 3, None)(hidden, head)
    shifted = _perturbed_objective(head, e, ids, mask, 3, lse)(hidden, head)
    for a, b in zip(jax.tree_util.tree_leaves(shifted), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    off_by_one = jnp.pad(lse[:, 1:], ((0, 0), (0, 1)))
    value, _ = _perturbed_objective(head, e, ids, mask, 3, off_by_one)(hidden, head)
    assert np.isnan(value)


@pytest.mark.parametrize("path", ["kept"])
def test_a_chunk_out_of_reach_runs_the_exact_pass_beside_chunks_that_shift(path):
    """The bound is taken chunk by chunk: one chunk of very long feature rows runs the
    two-read pass (a shift wrong by 2·SHIFT_RANGE there changes nothing), the others the
    shifted one (the same wrong shift there gives NaN)."""
    hidden, head, ids, mask = _inputs(13)
    e = 1e-4 * jax.random.normal(jax.random.PRNGKey(13), head.shape)
    far = jnp.zeros(T).at[2:5].set(1.0)  # features of slots 3..5: the second chunk of 3
    hidden = hidden * (1.0 + 1e6 * far)[None, :, None]
    _, lse = L.token_logps(hidden, head, ids, mask, chunk_size=3, with_lse=True)
    plain = _perturbed_objective(head, e, ids, mask, 3, None)(hidden, head)
    in_far_chunk = jnp.zeros(T - 1).at[2:5].set(2 * L.SHIFT_RANGE)
    shifted = _perturbed_objective(head, e, ids, mask, 3, lse + in_far_chunk)(hidden, head)
    for a, b in zip(jax.tree_util.tree_leaves(shifted), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
    elsewhere = jnp.zeros(T - 1).at[5:].set(2 * L.SHIFT_RANGE)
    value, _ = _perturbed_objective(head, e, ids, mask, 3, lse + elsewhere)(hidden, head)
    assert np.isnan(value)


def test_perturbation_bound_counts_the_rounding_of_both_products():
    """With e = 0 the heads are equal, and the bound is what float32 accumulation can
    move each logit by: 2 d ε max_v ‖w_v‖ (both products, with a factor of 2 to spare)."""
    rng = np.random.default_rng(14)
    head = jnp.asarray(rng.normal(size=(40, 24)), jnp.float32)
    bound = L._perturbation_bound(L.PerturbedHead(head, jnp.zeros_like(head)), jnp.float32)
    largest = float(np.max(np.linalg.norm(np.asarray(head), axis=-1)))
    np.testing.assert_allclose(float(bound), 2 * 24 * np.finfo(np.float32).eps * largest,
                               rtol=1e-6)
