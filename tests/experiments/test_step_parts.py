"""experiments.step_parts: the head part is the step's head, each step has its parts, and
every timed call is waited for. (The bench's own run checks its rows' parts and rest:
tests/experiments/test_bench.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import step_parts
from lm import models
from lm import objectives as O
from lm import optim


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
    """step_parts.head_call on the trunk's real output gives the step's loss, and its
    gradients are the step's head share: with the trunk's, the whole gradient."""
    cfg, params, batch = tiny
    batch = {**batch, "ref_logps": O.reference_logps(cfg, params, batch)}
    step = O.make_grad_fn(cfg, mode=mode, reference="precomputed", chunk_size=8)
    loss, _, grads = step(params, batch, None)
    ids, attn, _ = O.flatten_pairs(batch)
    trunk = O.decoder_trunk(cfg)
    hidden = trunk(params, ids, attn)
    options = step_parts.StepOptions(mode=mode, rho=1e-4, chunk_size=8, head_dtype=None,
                                     remat=False, reference="precomputed")
    head_loss, _, head_grads = step_parts.head_call(cfg, options, params, hidden, batch)()
    np.testing.assert_allclose(head_loss, loss, rtol=1e-6)
    # The chain rule puts the step back together: the hidden states' gradient through the
    # trunk plus the head's through the output layer (here the tied embedding).
    _, trunk_vjp = jax.vjp(lambda p: trunk(p, ids, attn), params)
    _, head_vjp = jax.vjp(lambda p: models.output_head(cfg, p), params)
    rebuilt = jax.tree_util.tree_map(jnp.add, trunk_vjp(head_grads["hidden"])[0],
                                     head_vjp(head_grads["head"])[0])
    # Two programs, so float32 rounding apart: ~1e-6 of a leaf's largest entry (as far as
    # the chunked step is from the unchunked one), and ~1e-10 in the keys' bias, whose
    # gradient is zero but for rounding. A wrong share would be off by the leaf's size.
    for got, want in zip(jax.tree_util.tree_leaves(rebuilt), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4,
                                   atol=1e-9 + 1e-5 * float(np.max(np.abs(want))))


def test_a_step_without_a_reference_forward_has_no_reference_part(tiny):
    cfg, params, batch = tiny
    tx = optim.make_optimizer(1e-6, total_steps=1, schedule="constant")
    options = step_parts.StepOptions(mode="adamw", rho=1e-4, chunk_size=8, head_dtype=None,
                                     remat=True, reference="precomputed")
    parts = step_parts.time_parts(cfg, options, tx, jax.tree_util.tree_map(jnp.copy, params),
                                  None, batch, steps=1, step_ms=50.0)
    assert list(parts) == ["trunk", "head", "optimizer", "rest"]
    assert parts["rest"] == pytest.approx(50.0 - parts["trunk"] - parts["head"]
                                          - parts["optimizer"])
    frozen = step_parts.StepOptions(mode="adamw", rho=1e-4, chunk_size=8, head_dtype=None,
                                    remat=True)
    assert step_parts.part_names(frozen) == ("reference", "trunk", "head", "optimizer")
    assert step_parts.part_names(step_parts.StepOptions("sam", 1e-4, None, None, False)) == ()


def test_pipelined_ms_waits_for_the_warmup_calls_and_the_last_one(monkeypatch):
    """The parts are timed as the pipelined step is: warm-up calls waited for one by one,
    then the timed calls dispatched back to back and only the last one waited for."""
    waited, results = [], []

    def call():
        results.append(jnp.ones(3) * len(results))
        return results[-1]

    monkeypatch.setattr(step_parts.jax, "block_until_ready", lambda x: waited.append(x) or x)
    assert step_parts.pipelined_ms(call, steps=3, warmup=2) >= 0
    assert len(results) == 5
    assert [id(w) for w in waited] == [id(results[0]), id(results[1]), id(results[4])]


def test_calls_that_hold_their_results_are_waited_for_in_groups(monkeypatch):
    """Calls that do not consume each other's results hold them until they run: waited for
    every IN_FLIGHT_BYTES of results (here 2 calls' worth, 12 bytes each); chained calls
    only at the end."""
    waited = []
    monkeypatch.setattr(step_parts, "IN_FLIGHT_BYTES", 24)
    monkeypatch.setattr(step_parts.jax, "block_until_ready", lambda x: waited.append(x) or x)
    step_parts.pipelined_ms(lambda: jnp.ones(3), steps=5, warmup=1)
    assert len(waited) == 1 + 2 + 1  # the warm-up, after calls 2 and 4, the last
    waited.clear()
    step_parts.pipelined_ms(lambda: jnp.ones(3), steps=5, warmup=1, chained=True)
    assert len(waited) == 1 + 1
