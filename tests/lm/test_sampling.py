"""lm.sampling: the KV-cache sampler agrees with the full forward; EOS, top-p, GPT-2 124M."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.hf import load_pretrained
from lm.models import abstract_params, builtin_config, logits
from lm.sampling import generate, top_p_filter

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
PROMPTS = np.array([[0, 0, 0, 11, 12, 13], [21, 22, 23, 24, 25, 26], [0, 0, 0, 0, 0, 31]],
                   np.int32)
PROMPT_MASK = (np.arange(6)[None] >= np.array([[3], [0], [5]])).astype(np.int32)
fwd_logits = jax.jit(logits, static_argnums=0)


def _greedy_by_full_forward(cfg, params, steps):
    """Re-run the whole sequence each step; right-pad to one static shape (one compile)."""
    b, p = PROMPTS.shape
    seq = np.concatenate([PROMPTS, np.zeros((b, steps), np.int32)], 1)
    mask = np.concatenate([PROMPT_MASK, np.zeros((b, steps), np.int32)], 1)
    for t in range(steps):
        z = fwd_logits(cfg, params, seq, mask)[:, p + t - 1]
        seq[:, p + t], mask[:, p + t] = np.asarray(jnp.argmax(z, -1)), 1
    return seq[:, p:]


# mistral_window: window 4 < prompt + generation, so the cache must apply the window too.
@pytest.mark.parametrize("name", ["gpt2", "neox_parallel", "mistral_window"])
def test_cached_greedy_equals_full_forward(name):
    cfg, params = load_pretrained(FIXTURES / name)
    tokens, mask = generate(cfg, params, PROMPTS, PROMPT_MASK, max_new_tokens=7,
                            rng=jax.random.key(0))
    np.testing.assert_array_equal(tokens, _greedy_by_full_forward(cfg, params, 7))
    assert np.all(np.asarray(mask) == 1)


def test_eos_stops_each_row_and_pads_after():
    cfg, params = load_pretrained(FIXTURES / "llama_gqa")
    free, _ = generate(cfg, params, PROMPTS, PROMPT_MASK, max_new_tokens=8,
                       rng=jax.random.key(0))
    free = np.asarray(free)
    eos = int(free[0, 2])
    tokens, mask = generate(cfg, params, PROMPTS, PROMPT_MASK, max_new_tokens=8,
                            rng=jax.random.key(0), eos_id=eos, pad_id=-1)
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    for row in range(3):
        hits = np.flatnonzero(free[row] == eos)
        stop = hits[0] + 1 if hits.size else 8
        np.testing.assert_array_equal(tokens[row, :stop], free[row, :stop])
        assert np.all(tokens[row, stop:] == -1) and mask[row].sum() == stop
        assert np.all(mask[row, :stop] == 1)
    assert mask[0].sum() <= 3


def test_sampling_is_seeded_and_tiny_top_p_is_greedy():
    cfg, params = load_pretrained(FIXTURES / "neox_sequential")
    kw = dict(max_new_tokens=6, temperature=1.5)
    a, _ = generate(cfg, params, PROMPTS, PROMPT_MASK, rng=jax.random.key(1), **kw)
    b, _ = generate(cfg, params, PROMPTS, PROMPT_MASK, rng=jax.random.key(1), **kw)
    c, _ = generate(cfg, params, PROMPTS, PROMPT_MASK, rng=jax.random.key(2), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    g, _ = generate(cfg, params, PROMPTS, PROMPT_MASK, rng=jax.random.key(0), max_new_tokens=6)
    t, _ = generate(cfg, params, PROMPTS, PROMPT_MASK, rng=jax.random.key(3), max_new_tokens=6,
                    temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(g, t)


def test_top_p_filter_keeps_the_smallest_nucleus():
    z = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25], [0.25, 0.25, 0.25, 0.25]]))
    kept = np.isfinite(np.asarray(top_p_filter(z, 0.7)))
    # Row 0: 0.5 + 0.25 >= 0.7 -> {1, 3}; row 1: three of four tokens needed.
    np.testing.assert_array_equal(kept[0], [False, True, False, True])
    assert kept[1].sum() == 3
    assert np.isfinite(np.asarray(top_p_filter(z, 1.0))).all()


def test_gpt2_124m_forward_and_sampler_step():
    cfg = builtin_config("gpt2-124m")
    # numpy's generator fills 124M weights far faster than threefry on a busy CPU.
    gen = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: 0.02 * gen.standard_normal(s.shape, dtype=np.float32), abstract_params(cfg))
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert 124e6 < n < 125e6
    ids = np.array([[464, 2068, 7586, 21831]], np.int32)
    mask = np.ones_like(ids)
    z = fwd_logits(cfg, params, ids, mask)
    assert z.shape == (1, 4, 50257) and np.isfinite(np.asarray(z)).all()
    tokens, _ = generate(cfg, params, ids, mask, max_new_tokens=1, rng=jax.random.key(0))
    assert tokens.shape == (1, 1) and int(tokens[0, 0]) == int(jnp.argmax(z[0, -1]))


def test_max_new_tokens_must_be_positive():
    cfg = builtin_config("gpt2-tiny")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        generate(cfg, {}, PROMPTS, PROMPT_MASK, max_new_tokens=0, rng=jax.random.key(0))


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_prompt_plus_new_tokens_over_the_context_is_refused_before_compiling(name):
    cfg = builtin_config(name)  # 128 positions; the longest prompt has 6 real tokens
    # Empty params: any tracing would fail with a KeyError, not this message.
    with pytest.raises(ValueError, match=r"^prompt length 6 \+ 123 new tokens exceeds the "
                                         r"model's context of 128 positions$"):
        generate(cfg, {}, PROMPTS, PROMPT_MASK, max_new_tokens=123, rng=jax.random.key(0))


def test_left_padding_does_not_count_against_the_context():
    cfg, params = load_pretrained(FIXTURES / "gpt2")
    assert cfg.max_position_embeddings == 32
    pad = np.zeros((3, 24), np.int32)
    ids, mask = np.concatenate([pad, PROMPTS], 1), np.concatenate([pad, PROMPT_MASK], 1)
    # 6 real tokens + 26 new ones fill the 32 positions exactly, though 30 + 26 slots > 32.
    wide, _ = generate(cfg, params, ids, mask, max_new_tokens=26, rng=jax.random.key(0))
    narrow, _ = generate(cfg, params, PROMPTS, PROMPT_MASK, max_new_tokens=26,
                         rng=jax.random.key(0))
    np.testing.assert_array_equal(wide, narrow)
    with pytest.raises(ValueError, match="prompt length 6 \\+ 27 new tokens"):
        generate(cfg, params, ids, mask, max_new_tokens=27, rng=jax.random.key(0))


def test_right_padded_prompts_and_numpy_eos_ids():
    cfg = builtin_config("gpt2-tiny")
    right = PROMPT_MASK[:, ::-1]  # rows 0 and 2 padded on the right
    with pytest.raises(ValueError, match=r"^prompt_mask row 0: padding after a real token; "
                                         r"prompts must be left-padded"):
        generate(cfg, {}, PROMPTS, right, max_new_tokens=2, rng=jax.random.key(0))
    cfg, params = load_pretrained(FIXTURES / "llama_gqa")
    free, _ = generate(cfg, params, PROMPTS, PROMPT_MASK, max_new_tokens=4, rng=jax.random.key(0))
    eos = np.asarray(free)[0, 1]
    by_int = generate(cfg, params, PROMPTS, PROMPT_MASK, max_new_tokens=4, rng=jax.random.key(0),
                      eos_id=int(eos))
    by_numpy = generate(cfg, params, PROMPTS, PROMPT_MASK, max_new_tokens=4, rng=jax.random.key(0),
                        eos_id=np.int64(eos))
    np.testing.assert_array_equal(by_int[1], by_numpy[1])
    assert np.asarray(by_int[1])[0].sum() == 2


def test_top_p_one_keeps_every_token():
    z = 3 * jax.random.normal(jax.random.key(0), (4, 50257))
    assert bool(jnp.all(jnp.isfinite(top_p_filter(z, jnp.float32(1.0)))))
