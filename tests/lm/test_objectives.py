"""Gradient modes against independent computations written out here.

The references never call ``dynamics.sam`` or ``lm.losses.sequence_logps``: log-probs
come from full logits and ``jax.nn.log_softmax``; logits-SAM is two explicit passes with
the perturbation added to the head *use* only (the tied embedding lookup keeps the
original matrix); full SAM perturbs every parameter by ρ g/‖g‖.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import losses
from lm import objectives as O
from lm.models import (abstract_params, builtin_config, forward_hidden, init_params, logits,
                       output_head)
from experiments import flops
from matmuls import matmul_input_dtypes

B, T, V, D = 2, 8, 32, 8
TM = jax.tree_util.tree_map


def _batch(seed=0, vocab=V):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(B, 2, T)).astype(np.int32)
    attn = np.ones((B, 2, T), np.int32)
    attn[0, 1, 6:] = 0  # right padding on one rejected response
    attn[1, 0, 7:] = 0
    loss = np.zeros((B, 2, T), np.int32)
    loss[0, :, 3:] = 1  # prompt of 3 tokens
    loss[1, :, 2:] = 1
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(attn),
            "loss_mask": jnp.asarray(loss * attn)}


# A hand-made trunk: embedding lookup, causal running mean, one tanh layer.
def _toy_params(seed, tied):
    k = jax.random.split(jax.random.key(seed), 3)
    p = {"embed": jax.random.normal(k[0], (V, D)), "w": jax.random.normal(k[1], (D, D)) / 3,
         "b": jnp.linspace(-0.5, 0.5, D)}
    if not tied:
        p["lm_head"] = jax.random.normal(k[2], (V, D))
    return p


def _toy_hidden(params, ids, attn):
    x = params["embed"][ids] * attn[..., None]
    run = jnp.cumsum(x, axis=1) / jnp.arange(1, ids.shape[1] + 1)[:, None]
    return jnp.tanh(run @ params["w"] + params["b"])


def _toy_head(params):
    return params["lm_head"] if "lm_head" in params else params["embed"]


# ------------------------------------------------------------------ independent references


def _gather_logps(z, batch):
    """[B, 2] summed response log-probs and counts from full logits z [2B, T, V]."""
    ids = batch["input_ids"].reshape(2 * B, T)
    mask = batch["loss_mask"].reshape(2 * B, T)[:, 1:]
    logp = jax.nn.log_softmax(z, axis=-1)
    tok = jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    return (jnp.sum(tok * mask, -1).reshape(B, 2),
            jnp.sum(mask, -1).astype(jnp.float32).reshape(B, 2))


def _naive_logps(hidden, head, batch):
    return _gather_logps(jnp.einsum("ntd,vd->ntv", hidden, head), batch)


def _reference_objective(hidden_fn, head_fn, loss, batch, ref_logps):
    """f(params, e) = mean loss with ``e`` added to the head use only."""
    ids, attn = (batch[k].reshape(2 * B, T) for k in ("input_ids", "attention_mask"))

    def f(params, e):
        logps, counts = _naive_logps(hidden_fn(params, ids, attn), head_fn(params) + e, batch)
        pairs = losses.PairLogps(logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1],
                                 counts[:, 0], counts[:, 1])
        return jnp.mean(loss(pairs))

    return f


def _two_pass_logits_sam(f, params, head, rho):
    g = jax.grad(f, argnums=1)(params, jnp.zeros_like(head))
    e = rho * g / jnp.sqrt(jnp.sum(g**2))
    return jax.grad(f)(params, e)


def _two_pass_sam(f, params, head, rho):
    zero = jnp.zeros_like(head)
    g = jax.grad(f)(params, zero)
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(g)))
    return jax.grad(f)(TM(lambda p, x: p + rho * x / norm, params, g), zero)


def _assert_trees_close(a, b, rtol=2e-4, atol=1e-6):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * float(jnp.max(jnp.abs(y))) + 1e-7)


def _tree_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ---------------------------------------------------------------------- hand-made trunk

RHO = 0.3


@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_toy_trunk_every_loss_every_mode_matches_references(name):
    batch = _batch()
    for tied in (True, False):
        params, ref_params = _toy_params(0, tied), _toy_params(1, tied)
        loss = losses.get_loss(name)
        ref_logps = _naive_logps(_toy_hidden(ref_params, *(batch[k].reshape(2 * B, T) for k in
                                 ("input_ids", "attention_mask"))), _toy_head(ref_params), batch)[0]
        if loss.reference_free:
            ref_logps = jnp.zeros_like(ref_logps)
        f = _reference_objective(_toy_hidden, _toy_head, loss, batch, ref_logps)
        head = _toy_head(params)
        plain = jax.grad(f)(params, jnp.zeros_like(head))
        want = {"plain": plain, "logits-sam": _two_pass_logits_sam(f, params, head, RHO),
                "sam": _two_pass_sam(f, params, head, RHO)}
        for mode, expected in want.items():
            grad_fn = O.make_model_grad_fn(_toy_hidden, _toy_head, loss=name, mode=mode,
                                           rho=RHO)
            value, metrics, grads = grad_fn(params, batch, ref_params)
            _assert_trees_close(grads, expected)
            np.testing.assert_allclose(value, f(params, jnp.zeros_like(head)), rtol=1e-5)
            if mode != "plain":
                assert _tree_diff(expected, plain) > 1e-3, (name, tied, mode)
                assert "sam/perturbed_loss" in metrics


def test_tied_head_perturbation_skips_the_embedding_lookup():
    """Perturbing the lookup too would be a different gradient: the test can tell."""
    batch, params = _batch(), _toy_params(0, True)
    loss = losses.get_loss("dpo")
    zeros = jnp.zeros((B, 2))
    f = _reference_objective(_toy_hidden, _toy_head, loss, batch, zeros)
    g = jax.grad(f, argnums=1)(params, jnp.zeros_like(params["embed"]))
    e = RHO * g / jnp.linalg.norm(g)
    both = jax.grad(lambda p: f({**p, "embed": p["embed"] + e}, jnp.zeros_like(e)))(params)
    grad_fn = O.make_model_grad_fn(_toy_hidden, _toy_head, mode="logits-sam", rho=RHO,
                                   reference="precomputed")
    _, _, grads = grad_fn(params, {**batch, "ref_logps": zeros})
    assert _tree_diff(grads, both) > 1e-4
    _assert_trees_close(grads, _two_pass_logits_sam(f, params, params["embed"], RHO))


def test_rho_zero_is_plain_and_metrics_are_unperturbed():
    batch, params, ref = _batch(2), _toy_params(3, False), _toy_params(4, False)
    plain = O.make_model_grad_fn(_toy_hidden, _toy_head, loss="ipo")(params, batch, ref)
    for mode in ("logits-sam", "sam"):
        zero = O.make_model_grad_fn(_toy_hidden, _toy_head, loss="ipo", mode=mode, rho=0.0)
        _assert_trees_close(zero(params, batch, ref)[2], plain[2], rtol=1e-6)
        out = O.make_model_grad_fn(_toy_hidden, _toy_head, loss="ipo", mode=mode, rho=RHO)(
            params, batch, ref)
        for key, value in plain[1].items():
            np.testing.assert_allclose(out[1][key], value, rtol=1e-6)
        assert abs(float(out[1]["sam/perturbed_loss"] - out[0])) > 1e-4


def test_chunked_equals_unchunked_and_precomputed_equals_frozen():
    batch, params, ref = _batch(5), _toy_params(5, True), _toy_params(6, True)
    frozen = O.make_model_grad_fn(_toy_hidden, _toy_head, mode="logits-sam", rho=RHO)
    chunked = O.make_model_grad_fn(_toy_hidden, _toy_head, mode="logits-sam", rho=RHO,
                                   chunk_size=3)
    pre = O.make_model_grad_fn(_toy_hidden, _toy_head, mode="logits-sam", rho=RHO,
                               reference="precomputed")
    ids, attn = (batch[k].reshape(2 * B, T) for k in ("input_ids", "attention_mask"))
    ref_logps = _naive_logps(_toy_hidden(ref, ids, attn), _toy_head(ref), batch)[0]
    a = frozen(params, batch, ref)
    for b in (chunked(params, batch, ref), pre(params, {**batch, "ref_logps": ref_logps}, None)):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
        _assert_trees_close(a[2], b[2], rtol=1e-5)


def test_missing_reference_weights_is_one_clear_error():
    params, batch = _toy_params(0, tied=False), _batch()
    grad_fn = O.make_model_grad_fn(_toy_hidden, _toy_head, loss="dpo")
    with pytest.raises(ValueError, match=r"^--reference frozen: loss 'dpo' needs the reference "
                                         r"model's weights \(ref_params\)"):
        grad_fn(params, batch)


def test_reference_free_loss_never_reads_the_reference():
    batch, params = _batch(7), _toy_params(7, False)
    none = O.make_model_grad_fn(_toy_hidden, _toy_head, loss="cpo", reference="none")
    frozen = O.make_model_grad_fn(_toy_hidden, _toy_head, loss="cpo", reference="frozen")
    a = none(params, batch, None)
    b = frozen(params, batch, _toy_params(8, False))
    _assert_trees_close(a[2], b[2], rtol=0)


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        ({"mode": "adam-sam"}, "--mode"),
        ({"reference": "live"}, "--reference"),
        ({"reference": "none"}, "--reference none"),
        ({"rho": float("inf")}, "--rho"),
        ({"loss": "kto"}, "--loss"),
        ({"loss_kwargs": {"beta": -1.0}}, "--beta"),
    ],
)
def test_bad_flags_name_the_culprit(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        O.make_model_grad_fn(_toy_hidden, _toy_head, **kwargs)


def test_precomputed_without_ref_logps_is_one_clear_error():
    fn = O.make_model_grad_fn(_toy_hidden, _toy_head, reference="precomputed")
    with pytest.raises(ValueError, match="ref_logps"):
        fn(_toy_params(0, True), _batch(), None)


# ---------------------------------------------------------------------- model families


def _family(name):
    cfg = builtin_config(name, num_layers=1, vocab_size=V)
    return cfg, init_params(cfg, jax.random.key(0)), init_params(cfg, jax.random.key(1))


def _check_family(name, loss_names):
    """In one jit: reference log-probs vs the model's full logits, and logits-SAM grads
    (frozen reference, chunked) vs the two-pass reference, for each loss. (That the
    perturbation changes the gradient at this ρ is shown on the hand-made trunk.)"""
    cfg, params, ref_params = _family(name)
    batch = _batch(11)
    hidden_fn = functools.partial(forward_hidden, cfg)
    head_fn = functools.partial(output_head, cfg)

    @jax.jit
    def run(params, ref_params, batch):
        ids, attn = (batch[k].reshape(2 * B, T) for k in ("input_ids", "attention_mask"))
        ref_logps = O.reference_logps(cfg, ref_params, batch, chunk_size=7)
        out = {"ref": (ref_logps, _gather_logps(logits(cfg, ref_params, ids, attn), batch)[0])}
        for name_ in loss_names:
            loss = losses.get_loss(name_)
            r = jnp.zeros_like(ref_logps) if loss.reference_free else ref_logps
            f = _reference_objective(hidden_fn, head_fn, loss, batch, r)
            got = O.make_grad_fn(cfg, loss=name_, mode="logits-sam", rho=RHO, chunk_size=6)(
                params, batch, ref_params)[2]
            out[name_] = (got, _two_pass_logits_sam(f, params, head_fn(params), RHO))
        return out

    out = run(params, ref_params, batch)
    np.testing.assert_allclose(*out.pop("ref"), rtol=1e-5, atol=1e-4)
    for got, want in out.values():
        _assert_trees_close(got, want, rtol=1e-3, atol=1e-5)


# Every family with DPO by default (every loss is covered on the toy trunk above); every
# loss on every family in the slow run, to keep this file's compile time small on CI.
@pytest.mark.parametrize("name", ["gpt2-tiny", "pythia-tiny", "llama-tiny"])
def test_family_logits_sam_matches_two_pass(name):
    _check_family(name, ["dpo"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2-tiny", "pythia-tiny", "llama-tiny"])
def test_family_logits_sam_matches_two_pass_every_loss(name):
    _check_family(name, list(losses.LOSSES))


@pytest.mark.slow
def test_full_sam_on_a_model_matches_its_definition():
    cfg, params, ref_params = _family("gpt2-tiny")
    batch = _batch(13)
    ref_logps = O.reference_logps(cfg, ref_params, batch)
    f = _reference_objective(functools.partial(forward_hidden, cfg),
                             functools.partial(output_head, cfg), losses.get_loss("dpo"),
                             batch, ref_logps)

    @jax.jit
    def run(params, batch):
        head = output_head(cfg, params)
        return (O.make_grad_fn(cfg, mode="sam", rho=RHO)(params, batch, ref_params)[2],
                _two_pass_sam(f, params, head, RHO), jax.grad(f)(params, jnp.zeros_like(head)))

    got, want, plain = run(params, batch)
    _assert_trees_close(got, want, rtol=1e-3, atol=1e-5)
    assert _tree_diff(want, plain) > 1e-4


def test_float32_head_keeps_logits_sam_exact_under_bfloat16_compute():
    """With a bf16 trunk, W + e rounds back to W (|e| ≈ ρ/√(V·d) ≪ bf16's step at |W| ≈ 1)
    and the SAM correction of the head gradient drowns in rounding; ``head_dtype="float32"``
    restores it: it matches the float32 computation on the same (bf16-valued) features."""
    params, batch, rho = _toy_params(5, tied=False), _batch(5), 1e-3

    def trunk(dtype):
        return lambda p, ids, attn: _toy_hidden(p, ids, attn).astype(jnp.bfloat16).astype(dtype)

    def correction(dtype, head_dtype=None):
        """logits-SAM head gradient minus the plain one: the SAM correction."""
        grads = [O.make_model_grad_fn(trunk(dtype), _toy_head, mode=mode, rho=rho,
                                      reference="none", loss="cpo",
                                      head_dtype=head_dtype)(params, batch, None)[2]["lm_head"]
                 for mode in ("logits-sam", "plain")]
        return np.ravel(grads[0] - grads[1])

    def cosine(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    exact = correction(jnp.float32)
    assert np.linalg.norm(exact) > 0
    np.testing.assert_allclose(correction(jnp.bfloat16, "float32"), exact, rtol=1e-4,
                               atol=1e-5 * np.abs(exact).max())
    assert cosine(correction(jnp.bfloat16), exact) < 0.9  # what the option fixes


def _bf16_features(dtype):
    """The toy trunk with bf16-valued features; only ``dtype=bfloat16`` rounds ∂L/∂h to
    bf16 on its way back into the trunk, as a bf16 trunk's backward pass does."""
    def hidden(params, ids, attn):
        h = _toy_hidden(params, ids, attn)
        return (h + jax.lax.stop_gradient(h.astype(jnp.bfloat16).astype(h.dtype) - h)).astype(dtype)
    return hidden


@pytest.mark.parametrize("rho", [1e-4, 1e-3])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_split_head_keeps_the_whole_logits_sam_correction_under_bfloat16(rho, chunk_size):
    """``head_dtype="split"`` computes the correction (logits-SAM minus plain gradient) of
    the head *and* the trunk as the float32 computation does, in bf16 matmuls; the float32
    head only fixes the head's: the trunk gets ∂L/∂h rounded to bf16, correction and all."""
    params, batch = _toy_params(5, tied=False), _batch(5)

    def correction(dtype, head_dtype=None):
        grads = [O.make_model_grad_fn(_bf16_features(dtype), _toy_head, mode=mode, rho=rho,
                                      reference="none", loss="cpo", chunk_size=chunk_size,
                                      head_dtype=head_dtype)(params, batch, None)[2]
                 for mode in ("logits-sam", "plain")]
        diff = TM(lambda a, b: np.ravel(a - b), *grads)
        return diff["lm_head"], np.concatenate([diff[k] for k in ("embed", "w", "b")])

    def cosine(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    exact = correction(jnp.float32)
    split = correction(jnp.bfloat16, "split")
    float32_head = correction(jnp.bfloat16, "float32")
    for got, want in zip(split, exact):
        assert cosine(got, want) >= 0.99
    assert cosine(np.concatenate(split), np.concatenate(exact)) >= 0.99
    assert cosine(float32_head[0], exact[0]) >= 0.99
    assert cosine(float32_head[1], exact[1]) < 0.9


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("loss,reference", [("dpo", "frozen"), ("ipo", "frozen"), ("cpo", "none")])
def test_split_head_in_float32_is_plain_logits_sam(tied, loss, reference):
    """Same math: in float32 the split head gives logits-SAM's gradient and metrics."""
    params, batch = _toy_params(6, tied), _batch(6)
    ref_params = TM(lambda p: p * 0.9, params)
    for chunk_size in (None, 3):
        got, want = (O.make_model_grad_fn(_toy_hidden, _toy_head, loss=loss, mode="logits-sam",
                                          rho=RHO, chunk_size=chunk_size, reference=reference,
                                          head_dtype=h)(params, batch, ref_params)
                     for h in ("split", None))
        _assert_trees_close(got[2], want[2], rtol=1e-5, atol=1e-6)
        _assert_trees_close(got[1], want[1], rtol=1e-6, atol=1e-7)
        assert _tree_diff(want[2], O.make_model_grad_fn(
            _toy_hidden, _toy_head, loss=loss, reference=reference)(params, batch, ref_params)[2]) > 1e-4


def test_unknown_head_dtype_is_one_clear_error():
    with pytest.raises(ValueError, match=r"^--head-dtype: unknown head dtype 'bf16-split'"):
        O.make_model_grad_fn(_toy_hidden, _toy_head, head_dtype="bf16-split")


def test_split_head_on_a_bfloat16_gpt2_matches_the_float32_correction():
    """The whole model in bf16 (trunk backward included, tied head): the split head's
    logits-SAM correction of every parameter is the float32 model's; the float32 head's is
    not (the tied embedding and the trunk receive ∂L/∂h rounded to bf16)."""
    pairs, length = 2, 24
    cfg = builtin_config("gpt2-tiny")
    ref_params = init_params(cfg, jax.random.key(0))
    params = TM(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), ref_params)
    rng = np.random.default_rng(0)
    loss_mask = np.zeros((pairs, 2, length), np.int32)
    loss_mask[..., 6:] = 1
    batch = {"input_ids": rng.integers(0, cfg.vocab_size, (pairs, 2, length)).astype(np.int32),
             "attention_mask": np.ones((pairs, 2, length), np.int32), "loss_mask": loss_mask}

    def correction(dtype, head_dtype):
        # logits-SAM at ρ minus the same program at ρ = 0: a separately compiled plain step
        # need not round its bf16 matmuls alike (jaxlib 0.11's CPU YNNPACK dots do not),
        # and one bf16 unit of the plain gradient is far larger than the correction.
        model = builtin_config("gpt2-tiny", dtype=dtype)
        grads = [jax.jit(O.make_grad_fn(model, mode="logits-sam", rho=rho, chunk_size=8,
                                        head_dtype=head_dtype))(params, batch, ref_params)[2]
                 for rho in (1e-4, 0.0)]
        return np.concatenate([np.ravel(a - b) for a, b in zip(*map(jax.tree_util.tree_leaves,
                                                                    grads))])

    def cosine(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    exact = correction("float32", None)
    assert cosine(correction("bfloat16", "split"), exact) >= 0.99
    assert cosine(correction("bfloat16", "float32"), exact) < 0.9


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_bfloat16_compute_multiplies_in_bfloat16(name):
    """Every matmul of every mode's gradient (forward, backward, the reference, logits-SAM's
    inner gradient, the split head's shares) takes bf16 inputs under bf16 compute: a float32
    matmul would run at a fraction of the GPU's bf16 throughput. Only the float32 head asks
    for float32 matmuls, and only those of the head."""
    cfg = builtin_config(name, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    batch = _batch(vocab=cfg.vocab_size)
    for mode in O.MODES:
        for chunk_size in (None, 4):
            grad_fn = O.make_grad_fn(cfg, mode=mode, chunk_size=chunk_size, remat=True)
            assert matmul_input_dtypes(grad_fn, params, batch, params) == {"bfloat16"}, (mode, chunk_size)
    split = O.make_grad_fn(cfg, mode="logits-sam", head_dtype="split")
    assert matmul_input_dtypes(split, params, batch, params) == {"bfloat16"}
    float32_head = O.make_grad_fn(cfg, mode="logits-sam", head_dtype="float32")
    assert matmul_input_dtypes(float32_head, params, batch, params) == {"bfloat16", "float32"}


def test_training_step_reaches_cudnn_as_causal_flash_attention(monkeypatch):
    """Lowered for a GPU (possible on any machine), every mode's bf16 gradient runs cuDNN's
    fused attention with a causal + padding mask and no bias. A [B, 1, T, T] mask array
    reaches cuDNN as a dense bias instead: read in the forward pass, its gradient written
    in the backward, and the masked half of every score matrix computed anyway."""
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    if not hasattr(fused, "check_cudnn_version"):
        pytest.skip("this jax asks cuDNN's version elsewhere")
    # Without a GPU jax cannot ask cuDNN its version; any recent one lowers the same.
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    cfg = builtin_config("gpt2-tiny", dtype="bfloat16", attention_impl="cudnn")
    params = abstract_params(cfg)
    batch = {k: jax.ShapeDtypeStruct((B, 2, 64), jnp.int32)
             for k in ("input_ids", "attention_mask", "loss_mask")}
    for mode in O.MODES:
        grad_fn = O.make_grad_fn(cfg, mode=mode, chunk_size=16, remat=True)
        text = jax.jit(grad_fn).trace(params, batch, params).lower(
            lowering_platforms=("cuda",)).as_text()
        assert set(re.findall(r"custom_call @__cudnn\$(\w+)", text)) == {
            "fmhaSoftmax", "fmhaSoftmaxBackward"}, mode
        assert set(re.findall(r"mask_type\\22: \\22(\w+)", text)) == {"PADDING_CAUSAL"}, mode


@pytest.mark.parametrize("name", ["gpt2-tiny", "pythia-tiny", "llama-tiny"])
def test_frozen_reference_in_the_compute_dtype_scores_bit_for_bit_the_same(name):
    """A float32-stored reference and its bf16 copy (:func:`O.frozen_reference`) give the
    same log-probs exactly under bf16 compute, for every head; matrices are stored in bf16,
    vectors and a float32 head keep float32, and float32 compute changes nothing."""
    cfg = builtin_config(name, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(5))
    batch = _batch(vocab=cfg.vocab_size)
    for head_dtype in (None, "float32", "split"):
        ref = O.frozen_reference(cfg, params, head_dtype=head_dtype)
        stored = {jnp.dtype(x.dtype).name for x in jax.tree_util.tree_leaves(ref) if x.ndim >= 2}
        assert stored == ({"bfloat16", "float32"} if head_dtype == "float32" else {"bfloat16"})
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(ref) if x.ndim < 2)
        assert output_head(cfg, ref).dtype == (jnp.float32 if head_dtype == "float32"
                                               else jnp.bfloat16)
        score = O.make_reference_fn(cfg, head_dtype=head_dtype)
        np.testing.assert_array_equal(score(ref, batch), score(params, batch))
    f32 = builtin_config(name)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(O.frozen_reference(f32, params)),
                                      jax.tree_util.tree_leaves(params)))


@pytest.mark.parametrize("name, scan", [("gpt2-tiny", False), ("llama-tiny", True)])
def test_gradients_of_the_multiplied_matrices_are_the_stored_ones_bit_for_bit(name, scan):
    """Under bf16 compute, plain and logits-SAM gradients are taken with respect to the
    matrices as the decoder multiplies them (:func:`O.multiplied_params`): each comes back
    in bf16 with exactly the value that its float32 parameter's gradient has; vectors and
    the head (summed over chunks, perturbed by logits-SAM) stay float32 and equal."""
    cfg = builtin_config(name, dtype="bfloat16", scan_layers=scan)
    params = init_params(cfg, jax.random.key(7))
    batch = _batch(vocab=cfg.vocab_size)
    head = output_head(cfg, params)
    for mode, chunk_size, remat in (("plain", None, False), ("logits-sam", 4, True)):
        kwargs = dict(mode=mode, rho=0.05, chunk_size=chunk_size)
        loss, _, grads = jax.jit(O.make_grad_fn(cfg, remat=remat, **kwargs))(
            params, batch, params)
        stored_loss, _, stored = jax.jit(O.make_model_grad_fn(
            O.decoder_trunk(cfg, remat=remat), functools.partial(output_head, cfg), **kwargs))(
                params, batch, params)
        assert loss == stored_loss
        for (path, g), p, want in zip(jax.tree_util.tree_leaves_with_path(grads),
                                      jax.tree_util.tree_leaves(params),
                                      jax.tree_util.tree_leaves(stored)):
            name_ = jax.tree_util.keystr(path)
            multiplied = p.ndim >= 2 and p is not head
            assert g.dtype == (jnp.bfloat16 if multiplied else jnp.float32), (mode, name_)
            assert want.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(want),
                                          err_msg=f"{mode} {name_}")


def test_kept_multiply_names_the_modes_whose_gradients_take_the_bf16_copies():
    """Where :func:`O.kept_multiply` gives a function, ``grad_fn`` of the multiplied tree
    (the bf16 copies a step keeps) is ``grad_fn`` of the float32 parameters bit for bit;
    where it gives None (full SAM, the split head: their perturbations and corrections
    reach the stored weights), the copies would change the gradients."""
    cfg = builtin_config("gpt2-tiny", dtype="bfloat16")
    params = init_params(cfg, jax.random.key(8))
    batch = _batch(vocab=cfg.vocab_size)
    copies = O.multiplied_params(cfg, params)
    for mode, head_dtype in (("plain", None), ("logits-sam", None), ("logits-sam", "float32"),
                             ("sam", None), ("logits-sam", "split")):
        grad_fn = jax.jit(O.make_grad_fn(cfg, mode=mode, rho=0.05, chunk_size=4,
                                         head_dtype=head_dtype))
        stored, kept = grad_fn(params, batch, params), grad_fn(copies, batch, params)
        same = all(np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
                   for a, b in zip(jax.tree_util.tree_leaves(stored),
                                   jax.tree_util.tree_leaves(kept)))
        assert same == (O.kept_multiply(cfg, mode, head_dtype) is not None), (mode, head_dtype)
    # Scanned blocks are stacked in the compute dtype at every step: no copies to keep.
    assert O.kept_multiply(builtin_config("gpt2-tiny", dtype="bfloat16", scan_layers=True),
                           "plain") is None


def test_scanned_frozen_reference_is_stacked_once_not_every_step():
    """Under ``scan_layers`` the frozen reference comes stacked: its log-probs are those of
    the per-layer tree bit for bit, and the step's program stacks only the policy."""
    cfg = builtin_config("gpt2-tiny", dtype="bfloat16", scan_layers=True)
    params = init_params(cfg, jax.random.key(6))
    batch = _batch(vocab=cfg.vocab_size)
    ref = O.frozen_reference(cfg, params)
    assert "layers" in ref and not any(key.startswith("layers_") for key in ref)
    # A reference loaded on the host is stacked there, not on one device before sharding.
    host = O.frozen_reference(cfg, jax.device_get(params))
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(host["layers"]))
    for a, b in zip(jax.tree_util.tree_leaves(host), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    score = O.make_reference_fn(cfg)
    np.testing.assert_array_equal(score(ref, batch), score(params, batch))

    def stacks(*args):
        return jax.jit(O.make_grad_fn(cfg, chunk_size=16)).lower(*args).as_text().count(
            "stablehlo.concatenate")

    per_tree = stacks(params, batch, ref)
    assert per_tree > 0 and stacks(params, batch, params) == 2 * per_tree


def test_logits_sam_hands_the_inner_lse_to_the_perturbed_head(monkeypatch):
    """make_grad_fn's logits-SAM step, bf16 with the kept chunked head, gives the perturbed
    pass the inner pass's logsumexp: it traces the shifted one-read pass, adamw's step does
    not; the gradients are those of the two-read pass at bf16 rounding."""
    cfg = builtin_config("gpt2-tiny", dtype="bfloat16")
    params = init_params(cfg, jax.random.key(7))
    batch = _batch(vocab=cfg.vocab_size)
    traced = []
    shifted_chunk = losses._shifted_chunk
    monkeypatch.setattr(losses, "_shifted_chunk",
                        lambda *a: traced.append(1) or shifted_chunk(*a))

    def step(mode):
        return O.make_grad_fn(cfg, mode=mode, chunk_size=3, rho=0.05)

    def grads(mode):
        return jax.jit(step(mode))(params, batch, params)[2]

    length = batch["input_ids"].shape[-1]
    assert losses.keeps_softmax_gradient(length, 3, jnp.bfloat16)
    jax.make_jaxpr(step("adamw"))(params, batch, params)
    assert not traced
    one_read = grads("logits-sam")
    assert traced  # the chunks' switch traces it once, for all of them
    monkeypatch.setattr(losses, "SHIFT_RANGE", -1.0)  # no chunk in reach: the two-read pass
    two_reads = grads("logits-sam")
    flat = [np.ravel(np.asarray(x, np.float32)) for x in jax.tree_util.tree_leaves(
        (one_read, two_reads))]
    a, b = np.concatenate(flat[:len(flat) // 2]), np.concatenate(flat[len(flat) // 2:])
    assert 0 < np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)


def test_chunked_logits_sam_stores_no_float32_perturbed_head():
    """Under bf16 compute logits-SAM's e is added to W where the head is cast, and the
    perturbed head's bound (lm.losses._perturbation_bound) reads W and e without holding a
    cast of its own: the step needs at most a tenth of a float32 (V, d) array more than
    adamw's (a stored W + e in float32 was one whole; the bound's cast of W merged with the
    inner pass's, half). A chunk's float32 logits are an eighth of that array here: the
    CPU holds the perturbed head's shifted exponentials beside them (a GPU fuses them into
    the pass that reads the logits)."""
    cfg = builtin_config("gpt2-tiny", dtype="bfloat16", vocab_size=8192, num_layers=1,
                         hidden_size=256)
    params = abstract_params(cfg)
    batch = {k: jax.ShapeDtypeStruct((1, 2, 64), jnp.int32)
             for k in ("input_ids", "attention_mask", "loss_mask")}

    def temp_bytes(mode):
        step = jax.jit(O.make_grad_fn(cfg, mode=mode, chunk_size=16))
        return step.lower(params, batch, params).compile().memory_analysis().temp_size_in_bytes

    float32_head = cfg.vocab_size * cfg.hidden_size * 4
    assert temp_bytes("logits-sam") - temp_bytes("adamw") <= 0.1 * float32_head


@pytest.mark.parametrize("chunk_size,prompt,dtype", [
    (None, 3, "float32"), (16, 3, "float32"), (16, 40, "float32"), (16, 3, "bfloat16"),
    (16, 40, "bfloat16"), (8, 3, "bfloat16")])
def test_logits_sams_extra_matmul_work_is_the_benchs_bound(chunk_size, prompt, dtype):
    """Every matmul of the logits-SAM step less adamw's, counted from the jaxpr (loops by
    their trip count): 4·N·V·d unchunked and where the chunked backward reads its kept
    softmax gradients (4 bf16 chunks), 6·N·V·d where it recomputes each chunk's logits
    (float32, or 8 bf16 chunks), as experiments.flops.logits_sam_extra_flops says. With a
    40-token prompt the first 2 of 4 chunks skip the head: the count's cond share."""
    cfg = builtin_config("gpt2-tiny", dtype=dtype)
    params = init_params(cfg, jax.random.key(7))
    pairs, seq = 2, 64
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (pairs, 2, seq), np.int32)
    loss_mask = np.ones_like(ids)
    loss_mask[..., :prompt] = 0
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}
    share = flops.head_chunk_share(seq, prompt, chunk_size)
    work = {mode: flops.matmul_flops(O.make_grad_fn(cfg, mode=mode, chunk_size=chunk_size),
                                     params, batch, params, cond_share=share)
            for mode in ("adamw", "logits-sam")}
    positions = flops.head_positions(pairs, seq, prompt, chunk_size)
    assert work["logits-sam"] - work["adamw"] == flops.logits_sam_extra_flops(
        positions, cfg.vocab_size, cfg.hidden_size, chunked=flops.is_chunked(seq, chunk_size),
        recomputed=flops.recomputes_head_logits(seq, chunk_size, cfg.dtype))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_split_heads_extra_matmul_work_is_the_benchs_bound(dtype):
    """The split head's extra work that scales with the vocabulary, counted from the jaxpr
    at two vocabulary sizes: 14·N·d per token of V, as the bench counts it, whether the
    chunked head recomputes its logits (4 float32 chunks) or keeps its softmax gradients
    (4 bf16 chunks)."""
    chunk = 8
    pairs, seq, prompt = 2, 32, 3
    ids = np.random.default_rng(8).integers(0, 64, (pairs, 2, seq), np.int32)
    loss_mask = np.ones_like(ids)
    loss_mask[..., :prompt] = 0
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}

    def extra(vocab):
        cfg = builtin_config("gpt2-tiny", vocab_size=vocab, num_layers=1, dtype=dtype)
        params = init_params(cfg, jax.random.key(9))
        split = flops.matmul_flops(O.make_grad_fn(cfg, mode="logits-sam", chunk_size=chunk,
                                            head_dtype="split"), params, batch, params)
        plain = flops.matmul_flops(O.make_grad_fn(cfg, mode="adamw", chunk_size=chunk),
                             params, batch, params)
        return split - plain, cfg.hidden_size

    (small, d), (large, _) = extra(128), extra(256)
    assert flops.recomputes_head_logits(seq, chunk, dtype) == (dtype == "float32")
    positions = flops.head_positions(pairs, seq, prompt, chunk)
    bound = (flops.logits_sam_extra_flops(positions, 256, d, chunked=True, split=True)
             - flops.logits_sam_extra_flops(positions, 128, d, chunked=True, split=True))
    assert large - small == bound
