"""The decoder and its functional API: params in, hidden states / output layer out.

The trunk (``forward_hidden``) and the output layer (``output_head``) are separate so a
head-only transform (logits-SAM, ``dynamics.sam.logits_sam_loss``) sees both:
``logits = forward_hidden(...) @ output_head(...).T``. A tied head is the token
embedding leaf itself, so ``jax.grad`` sums both of its uses with no extra code.

Params are the plain nested dict ``{"embed": {"embedding": [V, d]}, "layers_0": {...},
..., "final_norm": {...}, ["pos_embed": {"embedding": [P, d]}], ["lm_head": [V, d]]}``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.models.config import ModelConfig
from lm.models.layers import Block, KVCache, Norm, RightPadded, make_attention_mask, weight_init

Params = dict[str, Any]


class Decoder(nn.Module):
    """Token (+ learned position) embedding, ``num_layers`` blocks, final norm.

    Returns hidden states [B, T, d] after the final norm and the per-layer caches.
    """

    cfg: ModelConfig
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, positions, mask, caches: Optional[Sequence[KVCache]] = None,
                 cache_index=None):
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                         param_dtype=cfg.params_dtype, embedding_init=weight_init, name="embed")
        x = embed(input_ids)
        if cfg.family == "gpt2":
            x = x + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                             dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                             embedding_init=nn.initializers.normal(0.01),
                             name="pos_embed")(positions)
        if not cfg.tie_word_embeddings:
            self.param("lm_head", weight_init, (cfg.vocab_size, cfg.hidden_size), cfg.params_dtype)
        block = Block
        scan = cfg.scan_layers and caches is None
        if self.remat:
            policy = (getattr(jax.checkpoint_policies, cfg.remat_policy)
                      if cfg.remat_policy else None)
            # Inside a scan the recomputation cannot be CSE'd with the forward pass, so the
            # optimization barrier that prevents it is not needed (jax.checkpoint's docs).
            block = nn.remat(Block, policy=policy, prevent_cse=not scan)
        if scan:
            layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers)
            x, _ = layers(cfg, name="layers")(x, positions, mask)
            return Norm(cfg, "final_norm")(x), None
        new_caches = []
        for i in range(cfg.num_layers):
            x, kv = block(cfg, name=f"layers_{i}")(
                x, positions, mask, None if caches is None else caches[i], cache_index)
            new_caches.append(kv)
        return Norm(cfg, "final_norm")(x), (None if caches is None else new_caches)


def position_ids(attention_mask: jax.Array) -> jax.Array:
    """Token positions from a padding mask: ``max(cumsum(mask) - 1, 0)`` [B, T].

    Real tokens are numbered 0, 1, ... whatever the padding side, so left- and
    right-padded batches see the same positions on their real tokens.
    """
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters (GPT-2 style N(0, 0.02) kernels) in ``cfg.param_dtype``, one
    subtree ``layers_{i}`` per block whatever ``cfg.scan_layers`` says. The init's forward
    pass runs XLA's attention: the parameters do not depend on which attention runs, and
    an init need not compile cuDNN's."""
    ids = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1, 1, 1), bool)
    unrolled = dataclasses.replace(cfg, scan_layers=False, attention_impl=None)
    return jax.jit(Decoder(unrolled).init)(rng, ids, ids, mask)["params"]


def matrices_in(dtype: Any, tree: Params, keep: Any = None) -> Params:
    """``tree`` with every matrix (leaf of 2 or more dimensions) stored in more bits than
    ``dtype`` cast to it; vectors and the leaf ``keep`` (identity) as they are.

    Exact wherever the decoder casts each matrix to the compute dtype at its use (flax
    ``Dense``/``Embed``, :func:`logits_from_hidden`) and ``dtype`` is that dtype. Vectors
    stay: LayerNorm applies its scale in float32.
    """
    bits = jnp.finfo(dtype).bits

    def stored(x):
        if x is keep or x.ndim < 2 or jnp.finfo(x.dtype).bits <= bits:
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map(stored, tree)


def stacked_layers(cfg: ModelConfig, params: Params) -> Params:
    """``params`` with the blocks' subtrees stacked on a leading layer axis under ``layers``
    (the layout ``nn.scan`` reads), their matrices in the compute dtype first: the blocks
    cast them there at their use anyway, and stacking half the bytes halves the copy.
    Stacked ``params`` come back as they are, so a tree that never changes (the frozen
    reference) is stacked once instead of at every forward pass. A tree held on the host
    (NumPy leaves, as a loaded checkpoint is) is stacked there, not on one device before
    it is sharded."""
    if "layers" in params:
        return params
    blocks = [matrices_in(cfg.compute_dtype, params[f"layers_{i}"])
              for i in range(cfg.num_layers)]
    rest = {key: value for key, value in params.items() if not key.startswith("layers_")}
    return {**rest, "layers": jax.tree_util.tree_map(_stack, *blocks)}


def _stack(*xs):
    return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)


def abstract_params(cfg: ModelConfig) -> Params:
    """``init_params``' shapes and dtypes as ``jax.ShapeDtypeStruct`` leaves (no allocation)."""
    return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def forward_hidden(cfg: ModelConfig, params: Params, input_ids: jax.Array,
                   attention_mask: jax.Array, *, positions: Optional[jax.Array] = None,
                   remat: bool = False, right_padded: bool = False) -> jax.Array:
    """Final hidden states (after the final norm) [B, T, d] in ``cfg.dtype``.

    ``input_ids`` int [B, T]; ``attention_mask`` [B, T], 1 for real tokens and 0 for
    padding on either side. Attention is causal, skips padding keys and, when
    ``cfg.sliding_window`` is set, keys more than ``window - 1`` positions back.
    ``remat`` rematerialises each block in the backward pass (``cfg.remat_policy``).
    Hidden states at padding slots are finite but meaningless.

    ``right_padded`` promises that every row's real tokens come first (``lm.data``'s batch
    layout): attention then takes each row's length instead of a [B, 1, T, T] mask, which
    lets cuDNN skip the masked blocks (:class:`lm.models.layers.RightPadded`). The real
    tokens' hidden states are the same either way; under the promise, a left-padded row's
    are wrong.

    ``params`` has one subtree ``layers_{i}`` per block or, under ``cfg.scan_layers``, may
    come stacked already (:func:`stacked_layers`).
    """
    if positions is None:
        positions = position_ids(attention_mask)
    if right_padded:
        mask = RightPadded(jnp.sum(attention_mask, axis=-1, dtype=jnp.int32))
    else:
        index = jnp.arange(input_ids.shape[1])
        mask = make_attention_mask(index[None], index, attention_mask, positions, positions,
                                   cfg.sliding_window)
    if cfg.scan_layers:
        params = stacked_layers(cfg, params)
    hidden, _ = Decoder(cfg, remat=remat).apply({"params": params}, input_ids, positions, mask)
    return hidden


def output_head(cfg: ModelConfig, params: Params) -> jax.Array:
    """The output layer W [V, d]: the token embedding when tied, else ``lm_head``."""
    if cfg.tie_word_embeddings:
        return params["embed"]["embedding"]
    return params["lm_head"]


def matmul_precision(x: jax.Array):
    """Full float32 precision for float32 operands (no TF32 on GPU), the default else."""
    return jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def logits_from_hidden(hidden: jax.Array, head: jax.Array) -> jax.Array:
    """``hidden @ head.T`` [..., V] in float32: the matmul in ``hidden``'s dtype (the head
    cast to it) with float32 accumulation and output.

    Float32 features get full float32 precision (:func:`matmul_precision`). Low-precision
    (bf16) features also get low-precision derivatives: the tangent, hence the backward
    pass's two matmuls ∂L/∂h = G W and ∂L/∂W = Gᵀ h (each as large as the forward), take
    the float32 logit cotangent G rounded to bf16, as mixed-precision training does. JAX's
    own transpose of a matmul with a float32 ``preferred_element_type`` would instead run
    both as float32 matmuls with W upcast (jax-ml/jax#34330): float32 throughput on GPU for
    about two thirds of the head's work, and twice the bytes of G. The results reach the
    parameters as before, ∂L/∂h and ∂L/∂W in bf16.
    """
    if jnp.finfo(hidden.dtype).bits >= 32:
        return jnp.einsum("...d,vd->...v", hidden, head.astype(hidden.dtype),
                          preferred_element_type=jnp.float32, precision=matmul_precision(hidden))
    return _low_precision_logits(hidden, head.astype(hidden.dtype))


def hidden_cotangent(g: jax.Array, head: jax.Array, dtype: Any) -> jax.Array:
    """∂L/∂hidden = g W [..., d] in ``dtype`` (the features' dtype) for the float32 logit
    cotangent g [..., V] of :func:`logits_from_hidden`: g rounded to ``dtype`` as its
    derivative rounds it, the very matmul its transpose runs."""
    g = g.astype(dtype)
    return jnp.einsum("...v,vd->...d", g, head.astype(dtype), preferred_element_type=dtype,
                      precision=matmul_precision(g))


def head_cotangent(g: jax.Array, hidden: jax.Array) -> jax.Array:
    """∂L/∂head = gᵀ h [V, d] in float32 for the float32 logit cotangent g [..., V] of
    :func:`logits_from_hidden` (g rounded to ``hidden``'s dtype): float32 so that a sum of
    chunks' gradients rounds once, where the parameter's dtype asks it to."""
    g = g.astype(hidden.dtype)
    return jnp.einsum("...v,...d->vd", g, hidden, preferred_element_type=jnp.float32,
                      precision=matmul_precision(hidden))


@jax.custom_jvp
def _low_precision_logits(hidden: jax.Array, head: jax.Array) -> jax.Array:
    return jnp.einsum("...d,vd->...v", hidden, head, preferred_element_type=jnp.float32)


@functools.partial(_low_precision_logits.defjvp, symbolic_zeros=True)
def _low_precision_logits_jvp(primals, tangents):
    hidden, head = primals
    d_hidden, d_head = tangents
    out = _low_precision_logits(hidden, head)
    tangent = jnp.zeros(out.shape, jnp.float32)
    # Each term in the compute dtype so that its transpose (the backward pass) is too.
    if not isinstance(d_hidden, jax.custom_derivatives.SymbolicZero):
        tangent += jnp.einsum("...d,vd->...v", d_hidden, head, preferred_element_type=hidden.dtype)
    if not isinstance(d_head, jax.custom_derivatives.SymbolicZero):
        tangent += jnp.einsum("...d,vd->...v", hidden, d_head, preferred_element_type=hidden.dtype)
    return out, tangent


def logits(cfg: ModelConfig, params: Params, input_ids: jax.Array,
           attention_mask: jax.Array, *, positions: Optional[jax.Array] = None,
           remat: bool = False) -> jax.Array:
    """Next-token logits [B, T, V] (float32) = ``forward_hidden @ output_head.T``."""
    hidden = forward_hidden(cfg, params, input_ids, attention_mask, positions=positions,
                            remat=remat)
    return logits_from_hidden(hidden, output_head(cfg, params))


def init_cache(cfg: ModelConfig, batch: int, length: int) -> list[KVCache]:
    """Zero KV cache: per layer (keys, values) [batch, length, K, h] in ``cfg.dtype``."""
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    return [(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
            for _ in range(cfg.num_layers)]


def forward_cached(cfg: ModelConfig, params: Params, input_ids: jax.Array,
                   positions: jax.Array, cache: list[KVCache], cache_index: jax.Array,
                   key_valid: jax.Array, key_positions: jax.Array):
    """Run T new tokens at cache slots ``cache_index .. cache_index + T - 1``.

    ``key_valid`` / ``key_positions`` [B, S] describe every cache slot (including the
    new ones). Returns (hidden [B, T, d], updated cache). Used by ``lm.sampling``.
    """
    t, s = input_ids.shape[1], key_valid.shape[1]
    q_index = cache_index + jnp.arange(t)
    mask = make_attention_mask(q_index[None], jnp.arange(s), key_valid, positions,
                               key_positions, cfg.sliding_window)
    return Decoder(cfg).apply({"params": params}, input_ids, positions, mask, cache,
                              cache_index)
