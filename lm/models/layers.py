"""The pieces of a decoder block, shared by the GPT-2, GPT-NeoX and Llama families.

Shapes: B batch, T query tokens, S key tokens (S = T without a cache), d model width,
N query heads, K key/value heads (N % K == 0, grouped-query attention), h head dim,
r rotary dims (r <= h), I MLP width. Linear kernels are stored [in, out] (flax).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.models.config import ModelConfig

KVCache = tuple[jax.Array, jax.Array]  # keys, values: [B, S, K, h] each


class RightPadded(NamedTuple):
    """Causal attention over right-padded rows: row b's real tokens are slots
    ``0 .. lengths[b] - 1`` (int32 [B]), its padding follows.

    Passed where a boolean mask would be, it says the same as :func:`make_attention_mask` on
    every real query, but as sequence lengths: cuDNN's flash attention then skips the masked
    blocks, where a mask reaches it as a dense [B, 1, T, S] bias that it reads and whose
    gradient it writes. Padding slots are zeroed in q, k, v and the output
    (:func:`_right_padded_attention`), so their outputs are zero on every kernel.
    """

    lengths: jax.Array

_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}

#: GPT-2's N(0, 0.02²) for every weight matrix (the position table: N(0, 0.01²)).
weight_init = nn.initializers.normal(stddev=0.02)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``theta^(-2i/r)``, i < r/2, with HF's rope_scaling applied.

    "linear" divides every frequency by ``factor`` (positions / factor); "llama3"
    divides only the low frequencies and interpolates the middle band
    (transformers ``_compute_llama3_parameters``). Computed once in float64 numpy.
    """
    r = cfg.rotary_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, r, 2, dtype=np.float64) / r)
    scaling = dict(cfg.rope_scaling or ())
    if cfg.rope_type == "linear":
        inv = inv / scaling["factor"]
    elif cfg.rope_type == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotate the first ``r`` dims of ``x`` [B, T, H, h] by angle ``pos * inv_freq``.

    HF's rotate_half convention (Llama, GPT-NeoX): the rotated half-pairs are
    (i, i + r/2), ``x' = x * cos + rotate_half(x) * sin`` with
    ``rotate_half([a, b]) = [-b, a]``; dims r..h pass through (GPT-NeoX rotary_pct).
    """
    r = cfg.rotary_dim
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(cfg)  # [B, T, r/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    rot, rest = x[..., :r], x[..., r:]
    half = jnp.concatenate([-rot[..., r // 2:], rot[..., : r // 2]], axis=-1)
    return jnp.concatenate([rot * cos + half * sin, rest], axis=-1)


def make_attention_mask(q_index: jax.Array, k_index: jax.Array, key_valid: jax.Array,
                   q_pos: jax.Array, k_pos: jax.Array, window: Optional[int]) -> jax.Array:
    """Boolean mask [B, 1, T, S]: causal (by slot index) & key is a real token (& window).

    q_index [B|1, T] and k_index [S] are slot indices in the (cache) sequence; q_pos
    [B, T], k_pos [B, S] token positions (real-token counts). The sliding window keeps
    ``q_pos - window < k_pos``. Every query also sees its own slot so that padding
    queries never get an empty softmax row (their outputs are never read).
    """
    q_index = jnp.broadcast_to(q_index, q_pos.shape)
    causal = k_index[None, None, :] <= q_index[:, :, None]
    mask = causal & key_valid[:, None, :].astype(bool)
    if window is not None:
        mask &= k_pos[:, None, :] > q_pos[:, :, None] - window
    mask |= k_index[None, None, :] == q_index[:, :, None]
    return mask[:, None]


class RMSNorm(nn.Module):
    """``scale * x / sqrt(mean(x^2) + eps)``, statistics in float32 (HF LlamaRMSNorm)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.cfg.params_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.cfg.norm_eps)
        return scale.astype(self.cfg.compute_dtype) * y.astype(self.cfg.compute_dtype)


def Norm(cfg: ModelConfig, name: str) -> nn.Module:
    if cfg.family == "llama":
        return RMSNorm(cfg, name=name)
    return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype,
                        param_dtype=cfg.params_dtype, name=name)


def _dense(cfg: ModelConfig, features: int, bias: bool, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=cfg.compute_dtype,
                    param_dtype=cfg.params_dtype, kernel_init=weight_init, name=name)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with optional RoPE and KV cache.

    ``kv_cache`` (keys, values [B, S, K, h]) and ``cache_index`` (slot of the first new
    token) make this a cached step: the new keys/values are written at
    ``cache_index``, queries attend over all S slots under ``mask`` [B, 1, T, S]. Without a
    cache ``mask`` may instead be :class:`RightPadded`.
    Returns the output [B, T, d] and the updated cache (None without one).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, kv_cache: Optional[KVCache] = None,
                 cache_index=None):
        cfg = self.cfg
        b, t, _ = x.shape
        n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = _dense(cfg, n * h, cfg.attention_bias, "q")(x).reshape(b, t, n, h)
        key = _dense(cfg, k * h, cfg.attention_bias, "k")(x).reshape(b, t, k, h)
        val = _dense(cfg, k * h, cfg.attention_bias, "v")(x).reshape(b, t, k, h)
        if cfg.rotary_dim:
            q, key = apply_rope(q, positions, cfg), apply_rope(key, positions, cfg)
        if kv_cache is not None:
            start = (0, cache_index, 0, 0)
            key = jax.lax.dynamic_update_slice(kv_cache[0], key.astype(kv_cache[0].dtype), start)
            val = jax.lax.dynamic_update_slice(kv_cache[1], val.astype(kv_cache[1].dtype), start)
            kv_cache = (key, val)
        key, val = key.astype(q.dtype), val.astype(q.dtype)
        common = dict(scale=h ** -0.5, implementation=cfg.attention_impl)
        if isinstance(mask, RightPadded):
            out = _right_padded_attention(q, key, val, mask.lengths, cfg.sliding_window, **common)
        else:
            out = jax.nn.dot_product_attention(q, key, val, mask=mask, **common)
        out = _dense(cfg, cfg.hidden_size, cfg.attention_bias, "o")(out.reshape(b, t, n * h))
        return out, kv_cache


def _right_padded_attention(q, key, val, lengths, window, **kwargs):
    """Causal attention of right-padded rows [B, T, ·, h] by their ``lengths`` [B].

    cuDNN leaves the padding rows of its output, and of dQ, dK and dV in the backward pass,
    unwritten where XLA zero-fills them, and the fill is dropped under CUDA graphs
    (openxla/xla#46500): stale memory, NaN included, that would reach the projections'
    weight gradients through Xᵀ dK. Selecting zeros at padding slots on the way in and out
    keeps whatever the kernel leaves there out of every real token's value and gradient.
    """
    real = (jnp.arange(q.shape[1]) < lengths[:, None])[:, :, None, None]

    def zero_padding(x):
        return jnp.where(real, x, jnp.zeros((), x.dtype))

    # jax's window keeps keys k >= q - left; ours keeps q - window < k.
    out = jax.nn.dot_product_attention(
        zero_padding(q), zero_padding(key), zero_padding(val), is_causal=True,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        local_window_size=None if window is None else (window - 1, 0), **kwargs)
    return zero_padding(out)


class MLP(nn.Module):
    """GELU MLP ``W_out act(W_in x)`` or, for Llama, SwiGLU ``W_down(silu(W_gate x) * W_up x)``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        act = _ACTIVATIONS[cfg.activation]
        if cfg.family == "llama":
            gate = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate")(x)
            up = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up")(x)
            return _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down")(act(gate) * up)
        hidden = act(_dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "fc_in")(x))
        return _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "fc_out")(hidden)


class Block(nn.Module):
    """Pre-norm residual block.

    sequential: ``x += attn(norm1(x)); x += mlp(norm2(x))``;
    parallel (GPT-NeoX use_parallel_residual): ``x += attn(norm1(x)) + mlp(norm2(x))``.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, kv_cache=None, cache_index=None):
        cfg = self.cfg
        a, kv_cache = Attention(cfg, name="attn")(
            Norm(cfg, "attn_norm")(x), positions, mask, kv_cache, cache_index)
        mlp, mlp_norm = MLP(cfg, name="mlp"), Norm(cfg, "mlp_norm")
        if cfg.parallel_residual:
            return x + a + mlp(mlp_norm(x)), kv_cache
        x = x + a
        return x + mlp(mlp_norm(x)), kv_cache
