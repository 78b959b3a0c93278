"""experiments.step_parts: each part is the step's own work (the parts of every mode and
what is left of the step are checked on the bench's own run, tests/experiments/test_bench.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import step_parts
from lm import models
from lm import objectives as O


@pytest.fixture(scope="module")
def tiny():
    cfg = models.builtin_config("gpt2-tiny")
    params = models.init_params(cfg, jax.random.key(3))
    rng = np.random.default_rng(3)
    ids = rng.integers(0, cfg.vocab_size, (2, 2, 32), np.int32)
    loss_mask = np.ones_like(ids)
    loss_mask[..., :8] = 0
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids),
             "loss_mask": jnp.asarray(loss_mask)}
    return cfg, params, batch


@pytest.mark.parametrize("mode", ["adamw", "logits-sam"])
def test_the_head_part_is_the_steps_head(tiny, mode):
    """The head part's program (make_model_grad_fn on fixed hidden states) gives the step's
    loss, and its gradients are the step's head share: with the trunk's, the whole."""
    cfg, params, batch = tiny
    ref = O.reference_logps(cfg, params, batch)
    step = O.make_grad_fn(cfg, mode=mode, reference="precomputed", chunk_size=8)
    loss, _, grads = step(params, {**batch, "ref_logps": ref}, None)
    ids, attn, _ = O.flatten_pairs(batch)
    hidden = O.decoder_trunk(cfg)(params, ids, attn)
    head_part = O.make_model_grad_fn(lambda p, _i, _a: p["hidden"], lambda p: p["head"],
                                     mode=mode, reference="precomputed", chunk_size=8)
    head = models.output_head(cfg, params)
    head_loss, _, head_grads = head_part({"hidden": hidden, "head": head},
                                         {**batch, "ref_logps": ref}, None)
    np.testing.assert_allclose(head_loss, loss, rtol=1e-6)
    # The chain rule puts the step back together: the hidden states' gradient through the
    # trunk plus the head's through the output layer (here the tied embedding).
    _, trunk_vjp = jax.vjp(lambda p: O.decoder_trunk(cfg)(p, ids, attn), params)
    _, head_vjp = jax.vjp(lambda p: models.output_head(cfg, p), params)
    rebuilt = jax.tree_util.tree_map(jnp.add, trunk_vjp(head_grads["hidden"])[0],
                                     head_vjp(head_grads["head"])[0])
    for got, want in zip(jax.tree_util.tree_leaves(rebuilt), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)


def test_median_ms_blocks_on_every_call():
    calls = []

    def call():
        calls.append(1)
        return jnp.ones(3) * len(calls)

    assert step_parts.median_ms(call, steps=3, warmup=2) > 0
    assert len(calls) == 5
