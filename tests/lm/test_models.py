"""lm.models: configs, padding invariance, tied-head gradients, remat, dtypes, RoPE."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.models import (BUILTIN_NAMES, ConfigError, attention_for, builtin_config, config_from_hf,
                       config_to_hf, forward_hidden, init_params, logits, logits_from_hidden,
                       output_head)
from lm.models.layers import rope_frequencies
from matmuls import matmul_input_dtypes

TINY = ["gpt2-tiny", "pythia-tiny", "llama-tiny"]
IDS = jnp.array([[5, 6, 7, 8, 9, 0, 0], [0, 0, 5, 6, 7, 8, 9]], jnp.int32)
MASK = jnp.array([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]], jnp.int32)


fwd = jax.jit(forward_hidden, static_argnums=0, static_argnames=("remat", "right_padded"))
fwd_logits = jax.jit(logits, static_argnums=0, static_argnames="remat")


@functools.lru_cache(maxsize=None)
def _params(cfg, seed=0):
    return init_params(cfg, jax.random.key(seed))


def _cfg(name, **kw):
    if name == "mistral-tiny":
        return builtin_config("llama-tiny", model_type="mistral", sliding_window=3, **kw)
    return builtin_config(name, **kw)


def test_builtins_construct_and_are_hashable():
    assert {"gpt2-tiny", "gpt2-124m", "gpt2-medium", "gpt2-large", "gpt2-2.65b", "pythia-2.8b",
            "mistral-7b", "pythia-tiny", "llama-tiny"} <= set(BUILTIN_NAMES)
    big = builtin_config("gpt2-2.65b")
    assert (big.num_layers, big.hidden_size, big.num_heads) == (32, 2560, 32)
    tiny = builtin_config("gpt2-tiny")
    assert (tiny.num_layers, tiny.hidden_size, tiny.num_heads) == (2, 64, 4)
    assert tiny.vocab_size >= 256 and tiny.max_position_embeddings == 128
    assert hash(tiny) == hash(builtin_config("gpt2-tiny"))
    assert dataclasses.replace(tiny, dtype=jnp.bfloat16).dtype == "bfloat16"
    with pytest.raises(ConfigError, match="unknown built-in model 'gpt5'"):
        builtin_config("gpt5")


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_config_survives_hf_round_trip(name):
    cfg = builtin_config(name)
    assert config_from_hf(config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("head_dim,rotary_dim", [(44, 30), (88, 30), (100, 58), (64, 16)])
def test_neox_rotary_pct_round_trips_exactly(head_dim, rotary_dim):
    cfg = builtin_config("pythia-tiny", hidden_size=4 * head_dim, head_dim=head_dim,
                         rotary_dim=rotary_dim)
    assert config_from_hf(config_to_hf(cfg)) == cfg


def test_missing_keys_take_transformers_defaults_and_incomplete_rope_is_refused():
    neox = {k: v for k, v in config_to_hf(builtin_config("pythia-tiny")).items() if k != "rotary_pct"}
    assert config_from_hf(neox).rotary_dim == 16 // 4  # GPTNeoXConfig's rotary_pct = 0.25
    mistral = {k: v for k, v in config_to_hf(builtin_config("mistral-7b")).items()
               if k != "sliding_window"}
    assert config_from_hf(mistral).sliding_window == 4096
    assert config_from_hf({**mistral, "sliding_window": None}).sliding_window is None
    llama = config_to_hf(builtin_config("llama-tiny"))
    with pytest.raises(ConfigError, match="rope_scaling of type 'llama3' lacks 'low_freq_factor'"):
        config_from_hf({**llama, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


@pytest.mark.parametrize("name,change", [("llama-tiny", {"sliding_window": 4}),
                                         ("llama-tiny", {"parallel_residual": True}),
                                         ("gpt2-tiny", {"mlp_bias": False})])
def test_config_to_hf_refuses_what_config_json_cannot_hold(name, change):
    cfg = builtin_config(name, **change)
    key, value = next(iter(change.items()))
    with pytest.raises(ConfigError, match=f"config.json cannot express {key}={value!r}"):
        config_to_hf(cfg)


def test_unsupported_model_type_names_it():
    with pytest.raises(ConfigError, match="unsupported model_type 'bert'"):
        config_from_hf({"model_type": "bert"})


@pytest.mark.parametrize("name", TINY + ["mistral-tiny"])
def test_left_and_right_padding_agree_on_real_tokens(name):
    cfg = _cfg(name)
    params = _params(cfg, 0)
    hidden = fwd(cfg, params, IDS, MASK)
    assert hidden.shape == (2, 7, cfg.hidden_size) and hidden.dtype == jnp.float32
    np.testing.assert_allclose(hidden[0, :5], hidden[1, 2:], atol=2e-5)
    # Unpadded single sequence: the same again.
    alone = fwd(cfg, params, IDS[:1, :5], MASK[:1, :5])
    np.testing.assert_allclose(hidden[0, :5], alone[0], atol=2e-5)


@pytest.mark.parametrize("name", TINY + ["mistral-tiny"])
def test_right_padded_lengths_attend_as_the_mask_does(name):
    """``right_padded=True`` (sequence lengths, no mask array) against the mask path: the
    same hidden states on real tokens and the same gradient of a loss over real tokens,
    with rows shorter than the sliding window, longer, full and empty."""
    cfg = _cfg(name)
    params = _params(cfg, 2)
    lengths = np.array([9, 2, 5, 0])
    mask = jnp.asarray(np.arange(9)[None] < lengths[:, None], jnp.int32)
    ids = jax.random.randint(jax.random.key(3), mask.shape, 1, cfg.vocab_size) * mask
    weights = jax.random.normal(jax.random.key(4), (*mask.shape, cfg.hidden_size)) * mask[..., None]

    def loss(params, right_padded):
        hidden = forward_hidden(cfg, params, ids, mask, right_padded=right_padded)
        return jnp.sum(hidden * weights), hidden

    (loss_mask, hidden_mask), grads_mask = jax.jit(
        jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, False)
    (loss_len, hidden_len), grads_len = jax.jit(
        jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, True)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(hidden_len[real], hidden_mask[real], rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(hidden_len)).all()
    np.testing.assert_allclose(loss_len, loss_mask, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(grads_len), jax.tree_util.tree_leaves(grads_mask)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _attention_leaving_nan_in_padding(attention):
    """``jax.nn.dot_product_attention`` as cuDNN may run it: NaN in the padding rows of
    its output and of dQ, dK, dV (openxla/xla#46500)."""
    def fake(q, k, v, *, query_seq_lengths=None, **kwargs):
        if query_seq_lengths is None:
            return attention(q, k, v, **kwargs)

        def nan_padding(x):
            real = (jnp.arange(x.shape[1]) < query_seq_lengths[:, None])[:, :, None, None]
            return jnp.where(real, x, jnp.nan)

        def run(q, k, v):
            return attention(q, k, v, query_seq_lengths=query_seq_lengths, **kwargs)

        @jax.custom_vjp
        def attend(q, k, v):
            return nan_padding(run(q, k, v))

        def forward(q, k, v):
            out, vjp = jax.vjp(run, q, k, v)
            return nan_padding(out), vjp

        attend.defvjp(forward, lambda vjp, g: tuple(nan_padding(x) for x in vjp(g)))
        return attend(q, k, v)
    return fake


@pytest.mark.parametrize("name", ["gpt2-tiny", "mistral-tiny"])
def test_right_padded_attention_keeps_what_a_kernel_leaves_in_padding_out(name, monkeypatch):
    cfg = _cfg(name)
    params = _params(cfg, 2)
    targets = jnp.roll(IDS, -1, axis=1)
    right = jnp.array([[5, 6, 7, 8, 9, 0, 0], [5, 6, 7, 0, 0, 0, 0]], jnp.int32)
    mask = (right > 0).astype(jnp.int32)

    def loss(params, right_padded):
        hidden = forward_hidden(cfg, params, right, mask, right_padded=right_padded)
        logp = jax.nn.log_softmax(logits_from_hidden(hidden, output_head(cfg, params)))
        return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask)

    want = jax.jit(jax.grad(loss), static_argnums=1)(params, False)
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        _attention_leaving_nan_in_padding(jax.nn.dot_product_attention))
    got = jax.jit(jax.grad(loss), static_argnums=1)(params, True)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2-tiny", "mistral-tiny"])  # the scan is the blocks' own
def test_scanned_layers_match_the_unrolled_ones(name):
    """``scan_layers``: one ``lax.scan`` over the stacked blocks gives the unrolled blocks'
    hidden states and gradients in float32, with and without remat; under bf16 compute
    its gradients are as close to the float32 ones as the unrolled blocks' (bf16 rounding
    differs with the order of the sums). Params and gradients keep one subtree per layer."""
    cfg = _cfg(name)
    scanned = dataclasses.replace(cfg, scan_layers=True)
    params = _params(cfg, 2)
    assert jax.tree_util.tree_structure(init_params(scanned, jax.random.key(2))) == \
        jax.tree_util.tree_structure(params)
    weights = jax.random.normal(jax.random.key(4), (*IDS.shape, cfg.hidden_size)) * MASK[..., None]
    real = np.asarray(MASK, bool)

    def loss(params, cfg, remat):
        hidden = forward_hidden(cfg, params, IDS, MASK, remat=remat)
        return jnp.sum(hidden.astype(jnp.float32) * weights), hidden

    run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
    (_, want), truth = run(params, cfg, False)
    for remat in (False, True):
        (_, got), grads = run(params, scanned, remat)
        np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
        assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(truth)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())

    def error(grads):
        return np.sqrt(sum(np.sum((np.asarray(a, np.float32) - b) ** 2)
                           for a, b in zip(jax.tree_util.tree_leaves(grads),
                                           jax.tree_util.tree_leaves(truth))))

    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    (_, unrolled_hidden), unrolled = run(params, bf16, True)
    (_, scanned_hidden), scanned_grads = run(params, dataclasses.replace(bf16, scan_layers=True), True)
    np.testing.assert_allclose(np.asarray(scanned_hidden, np.float32)[real],
                               np.asarray(unrolled_hidden, np.float32)[real], rtol=2e-2, atol=2e-2)
    assert 0 < error(scanned_grads) <= 2 * error(unrolled)


def test_auto_attention_is_cudnn_only_where_cudnn_runs(monkeypatch):
    bf16 = builtin_config("gpt2-tiny", dtype="bfloat16")
    assert attention_for("auto", bf16) is None  # this machine has no GPU
    assert attention_for("xla", bf16) == "xla"
    with pytest.raises(ConfigError, match="--attention cudnn: cuDNN needs an NVIDIA GPU"):
        attention_for("cudnn", bf16)
    h100 = types.SimpleNamespace(platform="gpu", compute_capability="9.0",
                                 client=types.SimpleNamespace(platform_version="cuda 12080"))
    # The device to compile for, where it is not this host's (bench --target).
    assert attention_for("auto", bf16, device=h100) == "cudnn"
    monkeypatch.setattr(jax, "devices", lambda *a: [h100])
    monkeypatch.setattr(jax, "__version_info__", (0, 11, 2))
    assert attention_for("auto", bf16) == attention_for("cudnn", bf16) == "cudnn"
    assert attention_for("auto", bf16, vmapped_backward=True) == "cudnn"
    assert attention_for("auto", builtin_config("gpt2-tiny")) is None  # float32
    with pytest.raises(ConfigError, match="16-bit compute only"):
        attention_for("cudnn", builtin_config("gpt2-tiny"))
    odd = dataclasses.replace(bf16, head_dim=20)
    assert attention_for("auto", odd) is None
    assert attention_for("auto", dataclasses.replace(bf16, head_dim=256)) == "cudnn"
    monkeypatch.setattr(h100, "compute_capability", "8.0")
    assert attention_for("auto", dataclasses.replace(bf16, head_dim=256)) is None
    monkeypatch.setattr(jax, "__version_info__", (0, 10, 2))
    assert attention_for("auto", bf16, vmapped_backward=True) is None
    with pytest.raises(ConfigError, match="cannot vmap cuDNN's backward"):
        attention_for("cudnn", bf16, vmapped_backward=True)
    monkeypatch.setattr(h100.client, "platform_version", "rocm 6.2")
    assert attention_for("auto", bf16) is None


def test_sliding_window_limits_the_receptive_field():
    cfg = _cfg("mistral-tiny")  # window 3, 2 layers: position q sees q-4 .. q
    params = _params(cfg, 1)
    ids = jnp.arange(3, 13, dtype=jnp.int32)[None]
    mask = jnp.ones_like(ids)
    base = fwd(cfg, params, ids, mask)[0, -1]
    far = fwd(cfg, params, ids.at[0, 4].set(99), mask)[0, -1]   # 5 back
    near = fwd(cfg, params, ids.at[0, 5].set(99), mask)[0, -1]  # 4 back
    np.testing.assert_allclose(base, far, atol=1e-6)
    assert np.abs(base - near).max() > 1e-3


def test_tied_head_gradient_has_both_uses():
    cfg = _cfg("gpt2-tiny")
    params = _params(cfg, 0)
    targets = jnp.roll(IDS, -1, axis=1)

    def loss(params, stop_trunk=False, stop_head=False):
        h = fwd(cfg, params, IDS, MASK)
        w = output_head(cfg, params)
        h = jax.lax.stop_gradient(h) if stop_trunk else h
        w = jax.lax.stop_gradient(w) if stop_head else w
        logp = jax.nn.log_softmax(logits_from_hidden(h, w))
        return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * MASK)

    full = jax.grad(loss)(params)["embed"]["embedding"]
    head_only = jax.grad(loss)(params, stop_trunk=True)["embed"]["embedding"]
    trunk_only = jax.grad(loss)(params, stop_head=True)["embed"]["embedding"]
    assert np.abs(head_only).max() > 0 and np.abs(trunk_only).max() > 0
    np.testing.assert_allclose(full, head_only + trunk_only, atol=1e-5)
    assert output_head(cfg, params) is params["embed"]["embedding"]


def test_remat_changes_nothing_numerically():
    cfg = _cfg("pythia-tiny", remat_policy="dots_with_no_batch_dims_saveable")
    params = _params(cfg, 0)

    def loss(params, remat):
        z = fwd_logits(cfg, params, IDS, MASK, remat=remat)
        return jnp.sum(jnp.sin(z) * MASK[..., None])

    g0 = jax.jit(jax.grad(loss), static_argnums=1)(params, False)
    g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, True)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_remat_saves_only_block_inputs_for_the_backward_pass():
    """What the backward pass keeps (the residuals in ``jax.vjp``'s closure): with remat,
    each block's input, not its attention scores and MLP activations. XLA:CPU's memory
    estimate does not show this (it is the same with and without), so this is the check.
    A policy that saves the projections' and MLP's outputs keeps more, and still less than
    no remat; a policy jax does not have is refused by name."""
    cfg = dataclasses.replace(_cfg("gpt2-tiny"), num_layers=4)
    params = _params(cfg, 0)
    ids = jnp.ones((4, 32), jnp.int32)

    def residual_bytes(remat, policy=None):
        policy_cfg = dataclasses.replace(cfg, remat_policy=policy)
        _, vjp_fn = jax.vjp(lambda p: fwd(policy_cfg, p, ids, jnp.ones_like(ids), remat=remat), params)
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(vjp_fn))

    nothing, everything = residual_bytes(True), residual_bytes(False)
    assert nothing < everything / 4
    assert residual_bytes(True, "nothing_saveable") == nothing
    assert nothing < residual_bytes(True, "dots_with_no_batch_dims_saveable") < everything
    with pytest.raises(ConfigError, match="remat_policy must be one of .* got 'save_all'"):
        dataclasses.replace(cfg, remat_policy="save_all")


def test_untied_head_is_lm_head_of_shape_v_by_d():
    cfg = _cfg("llama-tiny")
    params = _params(cfg, 0)
    assert output_head(cfg, params).shape == (cfg.vocab_size, cfg.hidden_size)
    assert output_head(cfg, params) is params["lm_head"]


def test_bfloat16_compute_and_params():
    cfg32 = _cfg("llama-tiny")
    params = _params(cfg32, 0)
    cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
    hidden = fwd(cfg16, params, IDS, MASK)
    assert hidden.dtype == jnp.bfloat16
    z16, z32 = fwd_logits(cfg16, params, IDS, MASK), fwd_logits(cfg32, params, IDS, MASK)
    assert z16.dtype == jnp.float32
    real = MASK.astype(bool)
    assert np.abs(np.asarray(z16 - z32))[real].max() < 0.1 * np.abs(np.asarray(z32)).max()
    p16 = init_params(dataclasses.replace(cfg32, param_dtype="bfloat16"), jax.random.key(3))
    assert {x.dtype for x in jax.tree_util.tree_leaves(p16)} == {jnp.dtype(jnp.bfloat16)}


def test_bfloat16_head_backward_runs_bfloat16_matmuls():
    """Under bf16 features the head's backward takes the logit cotangent in bf16 (not W
    upcast to float32, as JAX's transpose of a float32-result matmul would), and its
    gradients match a float64 computation to bf16 accuracy, forward mode too."""
    kh, kw, kt, kd = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(kh, (2, 6, 16)).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (40, 16)) * 0.3
    targets = jax.random.randint(kt, (2, 6), 0, 40)

    def loss(h, w):
        logp = jax.nn.log_softmax(logits_from_hidden(h, w))
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

    grad = jax.grad(loss, argnums=(0, 1))
    assert matmul_input_dtypes(grad, h, w) == {"bfloat16"}
    assert matmul_input_dtypes(grad, h.astype(jnp.float32), w) == {"float32"}

    with jax.enable_x64():
        want = jax.grad(loss, argnums=(0, 1))(h.astype(jnp.float64), w.astype(jnp.float64))
        direction = jax.random.normal(kd, w.shape, jnp.float64)
        want_jvp = jax.jvp(lambda w_: loss(h.astype(jnp.float64), w_), (w.astype(jnp.float64),),
                           (direction,))[1]
    got = grad(h, w)
    assert (got[0].dtype, got[1].dtype) == (jnp.bfloat16, jnp.float32)
    for g, ref in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float64), ref, rtol=0.02,
                                   atol=0.02 * float(np.abs(ref).max()))
    got_jvp = jax.jvp(lambda w_: loss(h, w_), (w,), (direction.astype(jnp.float32),))[1]
    np.testing.assert_allclose(float(got_jvp), float(want_jvp), rtol=0.02)


def test_llama3_rope_frequencies_match_transformers():
    # transformers 5.24 ROPE_INIT_FUNCTIONS["llama3"] for head_dim 16, theta 1e4,
    # factor 8, low 1, high 4, original context 64.
    expected = [1.0, 0.24438458681106567, 0.013042256236076355, 0.0039528473280370235,
                0.0012499999720603228, 0.00039528473280370235, 0.0001250000059371814,
                3.9528473280370235e-05]
    cfg = config_from_hf({
        "model_type": "llama", "vocab_size": 8, "hidden_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "intermediate_size": 8, "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64}})
    np.testing.assert_allclose(rope_frequencies(cfg), expected, rtol=1e-6)


def test_x64_mode_runs_and_keeps_float32_default():
    jax.config.update("jax_enable_x64", True)
    try:
        cfg = _cfg("llama-tiny")
        params = _params(cfg, 0)
        z = fwd_logits(cfg, params, IDS, MASK)
        assert z.dtype == jnp.float32 and np.isfinite(np.asarray(z)).all()
    finally:
        jax.config.update("jax_enable_x64", False)


def test_legacy_rope_scaling_keys_and_unsupported_types():
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 8, "max_position_embeddings": 64,
            "rope_theta": 100.0}
    plain = config_from_hf(base)
    linear = config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert linear.rope_type == "linear" and plain.rope_type == "default"
    np.testing.assert_allclose(rope_frequencies(linear), rope_frequencies(plain) / 4.0)
    with pytest.raises(ConfigError, match="unsupported rope_scaling type 'dynamic'"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
