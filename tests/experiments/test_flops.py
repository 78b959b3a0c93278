"""experiments.flops: the formulas against a hand count, the jaxpr count against hand
counts of small programs, cuDNN's attention against XLA's, and XLA's own cost analysis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import flops
from lm import models
from lm import objectives as O


def gpt2_tiny_params_by_hand() -> int:
    """GPT-2 (tied head) with L = 2, d = 64, V = 512, 128 positions, counted by hand."""
    L, d, V, ctx = 2, 64, 512, 128
    block = (2 * d            # ln_1
             + d * 3 * d + 3 * d  # c_attn
             + d * d + d      # attn c_proj
             + 2 * d          # ln_2
             + d * 4 * d + 4 * d  # c_fc
             + 4 * d * d + d)  # mlp c_proj
    return V * d + ctx * d + L * block + 2 * d


def test_formulas_match_a_hand_count():
    cfg = models.builtin_config("gpt2-tiny")
    params = jax.eval_shape(lambda k: models.init_params(cfg, k), jax.random.PRNGKey(0))
    n = flops.count_params(params)
    assert n == gpt2_tiny_params_by_hand() == 141056
    tokens = flops.tokens_per_step(pairs=2, seq=64)
    assert tokens == 256
    assert flops.model_flops(n, tokens, "frozen") == 8 * 141056 * 256
    assert flops.model_flops(n, tokens, "precomputed") == 6 * 141056 * 256
    assert flops.head_positions(pairs=2, seq=64, prompt=16, chunk_size=None) == 2 * 2 * 63
    # 512 = 4 chunks of 128; the first holds only prompt targets (1..127) and is skipped.
    assert flops.head_positions(pairs=8, seq=512, prompt=128, chunk_size=128) == 8 * 2 * 384
    assert flops.head_chunk_share(seq=512, prompt=128, chunk_size=128) == 0.75
    assert flops.head_positions(pairs=8, seq=512, prompt=100, chunk_size=128) == 8 * 2 * 512
    assert flops.head_chunk_share(seq=512, prompt=100, chunk_size=128) == 1.0
    assert flops.head_chunk_share(seq=512, prompt=300, chunk_size=None) == 1.0
    assert flops.logits_sam_extra_flops(252, 512, 64) == 4 * 252 * 512 * 64
    assert flops.logits_sam_extra_flops(256, 512, 64, chunked=True) == 4 * 256 * 512 * 64
    assert flops.logits_sam_extra_flops(256, 512, 64, chunked=True, recomputed=True) == (
        6 * 256 * 512 * 64)
    for recomputed in (False, True):
        assert flops.logits_sam_extra_flops(256, 512, 64, chunked=True, recomputed=recomputed,
                                            split=True) == 14 * 256 * 512 * 64
    assert flops.is_chunked(64, 16) and not flops.is_chunked(64, 63)
    assert not flops.is_chunked(64, None)
    # Four bf16 chunks keep their softmax gradients, eight do not; float32 never does.
    assert not flops.recomputes_head_logits(512, 128, "bfloat16")
    assert flops.recomputes_head_logits(512, 64, "bfloat16")
    assert flops.recomputes_head_logits(512, 256, "float32")
    assert not flops.recomputes_head_logits(512, None, "float32")
    # Split head: 14 N·V·d for the head against plain's 6, and a second trunk backward.
    assert flops.logits_sam_extra_flops(252, 512, 64, split=True, trunk_params=n - 512 * 64,
                                        tokens=tokens) == (8 * 252 * 512 * 64
                                                           + 4 * (n - 512 * 64) * tokens)


def test_matmul_count_of_loops_conds_and_remat():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    one = 2 * 4 * 8 * 8

    def looped(x, w):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

    assert flops.matmul_flops(looped, x, w) == 5 * one

    def branchy(x, w):  # one branch multiplies twice, the other not at all
        return jax.lax.cond(x[0, 0] > 0, lambda: x @ w @ w, lambda: x)

    for share in (0.0, 0.25, 1.0):
        assert flops.matmul_flops(branchy, x, w, cond_share=share) == share * 2 * one

    # Remat's recomputation counts: the backward of a checkpointed x @ w @ w recomputes
    # x @ w, the one residual its transposes need.
    def loss(w, x):
        return jnp.sum(x @ w @ w)

    plain = flops.matmul_flops(jax.grad(loss), w, x)
    remat = flops.matmul_flops(jax.grad(jax.checkpoint(loss)), w, x)
    assert remat - plain == one
    traced = jax.jit(looped).trace(x, w)
    assert flops.jaxpr_matmul_flops(traced.jaxpr) == 5 * one


@pytest.fixture
def cudnn_traceable(monkeypatch):
    """jax.nn.dot_product_attention(implementation="cudnn") traced on a CPU: its version and
    compute-capability checks answer as on an H100, so the primitives reach the jaxpr."""
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    for name in ("check_cudnn_version", "check_compute_capability"):
        if not hasattr(fused, name):
            pytest.skip(f"jax {jax.__version__} has no {name} to stand in for")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cudnn_attention_counts_as_xlas(cudnn_traceable, kv_heads):
    """Forward and backward of causal attention (grouped-query too): the cuDNN primitives'
    count equals the matmuls of XLA's attention, so HFU does not depend on the kernel."""
    b, t, n, h = 2, 64, 4, 32
    q = jnp.ones((b, t, n, h), jnp.bfloat16)
    kv = jnp.ones((b, t, kv_heads, h), jnp.bfloat16)

    def loss(q, k, v, implementation):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                           implementation=implementation)
        return jnp.sum(out.astype(jnp.float32))

    def counted(implementation):
        forward = flops.matmul_flops(lambda *a: loss(*a, implementation), q, kv, kv)
        both = flops.matmul_flops(jax.grad(lambda *a: loss(*a, implementation),
                                           argnums=(0, 1, 2)), q, kv, kv)
        return forward, both

    xla, cudnn = counted("xla"), counted("cudnn")
    assert xla[0] == 4 * b * n * t * t * h
    assert xla[1] == 3 * xla[0]  # the forward again, then 4 transposes
    assert cudnn == xla


def test_an_attention_layout_the_count_does_not_know_is_an_error():
    from types import SimpleNamespace
    eqn = SimpleNamespace(primitive=SimpleNamespace(name="dot_product_attention_fwd_wrapper"),
                          params={"layout": 1}, invars=[])
    with pytest.raises(ValueError, match="layout 1, not BTNH"):
        flops._attention_flops(eqn, backward=False)


@pytest.fixture(scope="module")
def tiny_step():
    cfg = models.builtin_config("gpt2-tiny")
    params = models.init_params(cfg, jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 2, 64), np.int32)
    loss_mask = np.ones_like(ids)
    loss_mask[..., :16] = 0
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}
    return cfg, params, batch


@pytest.mark.parametrize("mode", ["adamw", "logits-sam", "sam"])
def test_matmul_count_agrees_with_xlas_cost_analysis(tiny_step, mode):
    """With no loops (XLA's analysis counts a loop body once) the two independent counts
    differ only by XLA's elementwise FLOPs: a few percent at gpt2-tiny."""
    cfg, params, batch = tiny_step
    grad_fn = O.make_grad_fn(cfg, mode=mode)
    cost = jax.jit(grad_fn).lower(params, batch, params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    counted = flops.matmul_flops(grad_fn, params, batch, params)
    assert counted < cost["flops"] < 1.1 * counted
