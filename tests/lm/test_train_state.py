"""The step's kept copies of the multiplied weights (lm.train.state): the same training,
bit for bit, as casting the weights at each step's start, on one device and FSDP-sharded;
left out of checkpoints and written again on resume."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import struct

from lm import objectives as O
from lm import optim
from lm.models import builtin_config, init_params, output_head
from lm.train import Checkpointer, TrainConfig, create_train_state, make_train_step, train
from lm.train.checkpoint import _saved_tree
from lm.train.loop import CHECKPOINTS
from lm.train.state import multiplied_copies
from train_helpers import env

TM = jax.tree_util.tree_map
CFG = builtin_config("gpt2-tiny", dtype="bfloat16")
TX = optim.make_optimizer(1e-2, total_steps=10, schedule="constant")


def _batch_at(k, pairs=2, seq=8):
    rng = np.random.default_rng(k)
    ids = rng.integers(0, CFG.vocab_size, size=(pairs, 2, seq)).astype(np.int32)
    attn = np.ones((pairs, 2, seq), np.int32)
    attn[0, 1, 6:] = 0
    loss = np.zeros((pairs, 2, seq), np.int32)
    loss[:, :, 3:] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss * attn}


def _assert_same(a, b, what):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("mode", ["plain", "logits-sam"])
def test_kept_copies_train_bit_for_bit_like_casting_every_step(mode):
    """Three steps, the second non-finite (halted: the state keeps its copies of the last
    good parameters); the copies are the cast matrices alone and always ``multiply(params)``."""
    multiply = O.kept_multiply(CFG, mode)
    grad_fn = O.make_grad_fn(CFG, mode=mode, rho=0.05, chunk_size=4)

    def scaled(params, batch, ref):  # batch["scale"] = inf makes the loss non-finite
        loss, metrics, grads = grad_fn(params, batch, ref)
        return loss * batch["scale"], metrics, grads

    params = init_params(CFG, jax.random.key(3))
    ref = O.frozen_reference(CFG, params)
    head = output_head(CFG, params)
    kept = create_train_state(TM(jnp.copy, params), TX, 0, multiply)
    for (path, copy), p in zip(jax.tree_util.tree_leaves_with_path(
            kept.multiplied, is_leaf=lambda x: x is None), jax.tree_util.tree_leaves(params)):
        cast = p.ndim >= 2 and p is not head
        assert (copy is not None) == cast, jax.tree_util.keystr(path)
        assert copy is None or copy.dtype == jnp.bfloat16
    cast = create_train_state(TM(jnp.copy, params), TX, 0)
    assert cast.multiplied is None
    with_copies = jax.jit(make_train_step(scaled, TX, multiply=multiply))
    casting = jax.jit(make_train_step(scaled, TX))
    for k, scale in enumerate((1.0, np.inf, 1.0)):
        batch = dict(_batch_at(k), scale=np.float32(scale))
        kept, kept_metrics = with_copies(kept, batch, ref)
        cast, cast_metrics = casting(cast, batch, ref)
        _assert_same(kept.params, cast.params, f"step {k} params")
        _assert_same(kept.opt_state, cast.opt_state, f"step {k} opt_state")
        _assert_same(kept_metrics, cast_metrics, f"step {k} metrics")
        _assert_same(kept.multiplied, multiplied_copies(multiply, kept.params), f"step {k} copies")
    assert int(kept.halted_at) == 1 and int(kept.step) == 1


def test_a_state_and_a_step_that_disagree_on_the_copies_are_refused():
    """A SAM step given a state with copies would differentiate the bf16 copies."""
    params = init_params(CFG, jax.random.key(3))
    multiply = O.kept_multiply(CFG, "plain")
    for state_multiply, step_multiply in ((multiply, None), (None, multiply)):
        state = create_train_state(params, TX, 0, state_multiply)
        step = make_train_step(O.make_grad_fn(CFG), TX, multiply=step_multiply)
        with pytest.raises(ValueError, match="create the state with the step's multiply"):
            jax.eval_shape(step, state, _batch_at(0), params)


def test_a_checkpoint_leaves_the_copies_out_and_a_resume_writes_them_again(tmp_path):
    multiply = O.kept_multiply(CFG, "plain")
    grad_fn = O.make_grad_fn(CFG, chunk_size=4)
    params = init_params(CFG, jax.random.key(4))
    ref = O.frozen_reference(CFG, params)

    class Stopped(Exception):
        pass

    def run(out, stop_at=None, resume=False):
        def batch_at(k):
            if k == stop_at:
                raise Stopped
            return _batch_at(k)

        config = TrainConfig(steps=4, batch_size=2, checkpoint_every=2, progress=False, plots=False)
        return train(grad_fn, TX, TM(jnp.copy, params), batch_at, config, str(out),
                     ref_params=ref, resume=resume, multiply=multiply)

    whole = run(tmp_path / "whole")
    with pytest.raises(Stopped):
        run(tmp_path / "cut", stop_at=3)
    saved = _saved_tree(str(tmp_path / "cut" / CHECKPOINTS / "2"))
    assert not jax.tree_util.tree_leaves(saved.get("multiplied"))
    assert jax.tree_util.tree_leaves(saved["params"])
    resumed = run(tmp_path / "cut", resume=True)
    _assert_same(resumed.state.params, whole.state.params, "params")
    _assert_same(resumed.state.multiplied, multiplied_copies(multiply, resumed.state.params),
                 "copies")
    # A checkpoint of the copies' run restores into a state that keeps none.
    ckpt = Checkpointer(str(tmp_path / "cut" / CHECKPOINTS))
    try:
        abstract = jax.eval_shape(lambda p: create_train_state(p, TX, 0), params)
        state, _ = ckpt.restore(TM(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
            abstract))
    finally:
        ckpt.close()
    _assert_same(state.params, whole.state.params, "restored params")


def test_kept_copies_shard_as_their_parameters_and_train_alike_over_4_devices(tmp_path):
    """FSDP over 4 forced host devices (tests/lm/sharded_kept_copies.py): the copies are
    split like their parameters, and the training is the one that casts, bit for bit."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_kept_copies.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path)], env=env(4), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["copies"] > 0
    assert result["sharded_alike"] and result["some_split"]
    assert result["kept_vs_cast"] == 0.0


# lm.train.TrainState before it had ``multiplied`` (a checkpoint written by c3b2fa5's code
# resumed the same way).
FIELDS_BEFORE_COPIES = ("step", "params", "opt_state", "rng", "skipped", "halted_at")
StateBeforeCopies = struct.dataclass(type("StateBeforeCopies", (), {
    "__annotations__": {name: object for name in FIELDS_BEFORE_COPIES}}))


def test_a_checkpoint_written_before_the_copies_resumes_with_them(tmp_path):
    multiply = O.kept_multiply(CFG, "plain")
    grad_fn = O.make_grad_fn(CFG, chunk_size=4)
    params = init_params(CFG, jax.random.key(5))
    ref = O.frozen_reference(CFG, params)
    config = TrainConfig(steps=4, batch_size=2, checkpoint_every=2, progress=False, plots=False)

    def run(out, steps=4):
        return train(grad_fn, TX, TM(jnp.copy, params), _batch_at,
                     dataclasses.replace(config, steps=steps), str(out), ref_params=ref,
                     resume=True, multiply=multiply)

    whole = run(tmp_path / "whole")
    at_2 = run(tmp_path / "two", steps=2).state
    old = Checkpointer(str(tmp_path / "old" / CHECKPOINTS))
    try:
        old._manager.save(2, args=ocp.args.Composite(
            state=ocp.args.StandardSave(StateBeforeCopies(
                **{name: getattr(at_2, name) for name in FIELDS_BEFORE_COPIES})),
            meta=ocp.args.JsonSave({"step": 2, "seed": 0, "batch_size": 2})))
    finally:
        old.close()
    resumed = run(tmp_path / "old")
    _assert_same(resumed.state.params, whole.state.params, "params")
    _assert_same(resumed.state.opt_state, whole.state.opt_state, "opt_state")
    assert set(_saved_tree(str(tmp_path / "old" / CHECKPOINTS / "4"))) == set(FIELDS_BEFORE_COPIES)
