"""Autoregressive sampling with a KV cache: one prefill, then one token per scan step.

Prompts are left-padded [B, P] (``prompt_mask`` 1 on real tokens) so every row's last
prompt token sits in slot P - 1 and generated token t goes to slot P + t for all rows.
Positions come from the mask, so a row's tokens are numbered exactly as in
``forward_hidden`` on the unpadded sequence. Greedy at ``temperature == 0``; otherwise
softmax(z / temperature) restricted to the top-p nucleus.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm.models import (ModelConfig, forward_cached, init_cache, logits_from_hidden,
                       output_head, position_ids)


def top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set to -inf every logit outside the smallest set of top tokens with mass >= top_p.

    The most likely token is always kept, so ``top_p -> 0`` is greedy; ``top_p >= 1``
    keeps every token (the float32 running mass reaches 1 before the last tokens).
    """
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (mass_before < top_p) | (top_p >= 1.0)
    keep_sorted = keep_sorted.at[..., 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def _choose(logits: jax.Array, rng: jax.Array, temperature, top_p) -> jax.Array:
    greedy = jnp.argmax(logits, axis=-1)
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    sampled = jax.random.categorical(rng, top_p_filter(logits / safe_t, top_p), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def generate(cfg: ModelConfig, params, prompt_ids: jax.Array, prompt_mask: jax.Array, *,
             max_new_tokens: int, rng: jax.Array, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: Optional[int | Sequence[int]] = None,
             pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Sample ``max_new_tokens`` continuations of left-padded prompts (jitted).

    Args:
      prompt_ids, prompt_mask: int [B, P], left-padded (mask 1 on real tokens).
      rng: a PRNG key (unused when greedy).
      temperature, top_p: sampling controls (traced: no recompilation per value).
      eos_id: an id or tuple of ids; a row stops after emitting one (None: never).
      pad_id: the token written after a row has stopped.

    Returns:
      tokens int32 [B, max_new_tokens] and mask int32 [B, max_new_tokens], 1 for the
      generated tokens up to and including the first EOS, 0 (and ``pad_id``) after.

    Raises:
      ValueError: ``max_new_tokens < 1``, or the longest prompt's real tokens plus
        ``max_new_tokens`` exceed ``cfg.max_position_embeddings`` (checked before
        compiling; padding does not count, as positions come from the mask).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    # Past GPT-2's learned position table the embedding lookup silently yields NaN rows
    # (no error, just garbage tokens), and rotary models were never trained on such
    # positions; either way the prompt plus its continuation must be a sequence the
    # model can score again, as DPO does with sampled responses.
    host_mask = np.asarray(prompt_mask).astype(np.int64)
    right_padded = np.flatnonzero(np.any(np.diff(host_mask, axis=-1) < 0, axis=-1))
    if right_padded.size:
        raise ValueError(f"prompt_mask row {right_padded[0]}: padding after a real token; prompts "
                         "must be left-padded (generation continues from the last position)")
    longest = int(host_mask.sum(axis=-1).max(initial=0))
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt length {longest} + {max_new_tokens} new tokens exceeds the "
                         f"model's context of {cfg.max_position_embeddings} positions")
    eos = () if eos_id is None else tuple(np.atleast_1d(eos_id).tolist())
    # Every argument positional and every number an array: one compilation per shape,
    # whichever keywords the caller spelled out.
    return _generate(cfg, params, prompt_ids, prompt_mask, rng,
                     jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32),
                     max_new_tokens, tuple(map(int, eos)), int(pad_id))


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9))
def _generate(cfg, params, prompt_ids, prompt_mask, rng, temperature, top_p, max_new_tokens,
              eos_ids, pad_id):
    b, p = prompt_ids.shape
    total = p + max_new_tokens
    eos = jnp.asarray(eos_ids, jnp.int32)
    head = output_head(cfg, params)
    prompt_mask = prompt_mask.astype(jnp.int32)
    key_valid = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt_mask)
    key_pos = jnp.zeros((b, total), jnp.int32).at[:, :p].set(position_ids(prompt_mask))
    hidden, cache = forward_cached(cfg, params, prompt_ids, key_pos[:, :p],
                                   init_cache(cfg, b, total), 0, key_valid, key_pos)
    z = logits_from_hidden(hidden[:, -1], head)

    def choose(z, done, rng):
        """The next token of every row (``pad_id`` once a row is done) and the new state."""
        rng, sub = jax.random.split(rng)
        tok = jnp.where(done, pad_id, _choose(z, sub, temperature, top_p))
        return tok, done | jnp.any(tok[:, None] == eos[None, :], axis=-1), rng

    # Token 0 comes from the prefill; each scan step feeds token t and picks token t + 1,
    # so no forward pass is spent on the last token.
    first, done, rng = choose(z, jnp.zeros((b,), bool), rng)

    def step(carry, t):
        cache, key_valid, key_pos, tok, done, pos, rng = carry
        slot = p + t
        key_valid = key_valid.at[:, slot].set(1)
        key_pos = key_pos.at[:, slot].set(pos)
        hidden, cache = forward_cached(cfg, params, tok[:, None], pos[:, None], cache,
                                       slot, key_valid, key_pos)
        emitted = ~done
        tok, done, rng = choose(logits_from_hidden(hidden[:, 0], head), done, rng)
        return (cache, key_valid, key_pos, tok, done, pos + 1, rng), (tok, emitted)

    carry = (cache, key_valid, key_pos, first, done, jnp.sum(prompt_mask, axis=-1), rng)
    _, (rest, emitted) = jax.lax.scan(step, carry, jnp.arange(max_new_tokens - 1))
    tokens = jnp.concatenate([first[None], rest]).T
    emitted = jnp.concatenate([jnp.ones((1, b), bool), emitted]).T
    return tokens, emitted.astype(jnp.int32)
