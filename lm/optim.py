"""AdamW with warmup and decay, global-norm clipping, and gradient accumulation.

The paper trains with AdamW (lr 1e-6 for Pythia-2.8B, 5e-7 for Mistral-7B, §4.1). The
chain here is

    clip_by_global_norm(clip_norm) → adamw(schedule, b1, b2, eps, weight_decay, mask)

with optax's transformations, the clipping's norm excepted: :func:`global_norm`, the same
norm in fewer GPU kernels, which the train step also logs (``grad_norm``).

The first moment is stored in ``mu_dtype`` (default: the parameters' dtype). bfloat16
halves its bytes, which every step reads and writes (4 of the 28–32 bytes a float32 AdamW
step moves per parameter). Each step rounds the running mean of the gradients to bf16's 8
bits, and the errors decay by β₁ rather than vanish: after 60 steps of noisy gradients the
updates differ from float32's by 1.5% (relative, in norm; tests/lm/test_optim.py). The
second moment, whose square root sets the step size, keeps the parameters' dtype.

Weight decay (decoupled, AdamW) applies to matrices only: every leaf with ``ndim ≥ 2``
(kernels, embeddings, the output layer) decays; biases and norm scales (``ndim ≤ 1``) do
not, the Hugging Face Trainer convention. The default ``weight_decay`` is 0 (TRL's).

Gradient accumulation (:func:`accumulate_gradients`) splits a batch of pairs into k equal,
strided micro-batches (pairs j, j + k, …: each stays spread over a data-parallel mesh's
devices) and averages their (loss, metrics, grads) with ``lax.scan``. The SAM and
logits-SAM perturbations are therefore computed *per micro-batch*: ‖g‖ is the norm of
one micro-batch's gradient, as in the paper's per-device PyTorch implementation, not of
the accumulated gradient.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dynamics.sam import sum_of_squares

SCHEDULES = ("cosine", "linear", "constant")
MU_DTYPES = (None, "float32", "bfloat16")


def make_schedule(
    learning_rate: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    final_lr_ratio: float = 0.0,
) -> optax.Schedule:
    """Linear warmup 0 → ``learning_rate`` over ``warmup_steps``, then decay to
    ``final_lr_ratio · learning_rate`` at ``total_steps`` (cosine or linear) or stay
    constant.

    Raises:
      ValueError: one line naming the flag for a bad value.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule: unknown schedule {schedule!r}; choose from "
                         f"{', '.join(SCHEDULES)}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"--lr must be a positive number, got {learning_rate}")
    if not (isinstance(total_steps, numbers.Integral) and total_steps >= 1):
        raise ValueError(f"--steps must be a positive integer, got {total_steps!r}")
    if not (isinstance(warmup_steps, numbers.Integral) and 0 <= warmup_steps <= total_steps):
        raise ValueError(f"--warmup-steps must be an integer in [0, --steps = {total_steps}], "
                         f"got {warmup_steps!r}")
    if not 0.0 <= final_lr_ratio <= 1.0:
        raise ValueError(f"--final-lr-ratio must be in [0, 1], got {final_lr_ratio}")
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=final_lr_ratio)
    elif schedule == "linear":
        decay = optax.linear_schedule(learning_rate, learning_rate * final_lr_ratio,
                                      decay_steps)
    else:
        decay = optax.constant_schedule(learning_rate)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True on the leaves that weight decay applies to: matrices (``ndim ≥ 2``)."""
    return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
    learning_rate: float = 1e-6,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    final_lr_ratio: float = 0.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
    mu_dtype: str | None = None,
) -> optax.GradientTransformation:
    """Clipped AdamW on :func:`make_schedule` (see the module docstring).

    ``clip_norm`` None turns clipping off; ``mu_dtype`` ("float32", "bfloat16"; None: the
    parameters') stores the first moment. Raises ValueError naming the flag.
    """
    lr = make_schedule(learning_rate, total_steps=total_steps, warmup_steps=warmup_steps,
                       schedule=schedule, final_lr_ratio=final_lr_ratio)
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"--weight-decay must be >= 0, got {weight_decay}")
    for flag, v in (("--b1", b1), ("--b2", b2)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{flag} must be in [0, 1), got {v}")
    if not eps > 0:
        raise ValueError(f"--eps must be > 0, got {eps}")
    if mu_dtype not in MU_DTYPES:
        raise ValueError(f"--mu-dtype must be one of {', '.join(map(str, MU_DTYPES))}, "
                         f"got {mu_dtype!r}")
    adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask,
                        mu_dtype=None if mu_dtype is None else jnp.dtype(mu_dtype))
    if clip_norm is None:
        return adamw
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"--clip-norm must be > 0 (or unset), got {clip_norm}")
    return optax.chain(clip_by_global_norm(clip_norm), adamw)


def global_norm(tree: Any) -> jax.Array:
    """‖tree‖₂ over every entry of every leaf, summed in float32 (or wider) by
    :func:`dynamics.sam.sum_of_squares` (few GPU kernels): the norm ``optax.tree.norm``
    computes, to float32 rounding (the order of the sums differs). Unscaled, unlike SAM's
    ``global_norm``: a norm past the float range is inf, which the train step treats as a
    blow-up, and it reads the gradients once (no pass for their largest entry)."""
    return jnp.sqrt(sum_of_squares(tree))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` on :func:`global_norm`: updates scaled by
    max_norm / ‖u‖ where ‖u‖ ≥ max_norm, its empty state and its arithmetic. The train
    step's ``grad_norm`` metric is the same :func:`global_norm` of the same gradients, which
    XLA computes once for both."""
    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        keep = norm < max_norm
        return jax.tree_util.tree_map(
            lambda u: jax.lax.select(keep, u, (u / norm.astype(u.dtype)) * max_norm),
            updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def split_micro_batches(batch: Any, num_micro_batches: int, batch_sharding: Any = None) -> Any:
    """Every leaf [B, ...] → [k, B/k, ...], strided: micro-batch j holds pairs j, j + k,
    j + 2k, …

    A batch sharded along B gives each device a block of consecutive pairs; micro-batch j
    takes every k-th pair of each block, so it stays spread over all the devices (when
    its B/k pairs divide over them, as ``lm.train.mesh.check_batch_size`` requires) and
    no pair moves. Consecutive micro-batches would each sit on 1/k of the devices, and
    XLA would all-gather the whole batch so that every device computes every micro-batch.
    ``batch_sharding`` (the batch's ``NamedSharding``) pins the spread layout on the
    micro-batches rather than leaving it to XLA's sharding propagation.
    """
    sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves disagree on the number of pairs: {sorted(sizes)}")
    (size,) = sizes
    k = num_micro_batches
    if not (isinstance(k, numbers.Integral) and k >= 1 and size % k == 0):
        raise ValueError(f"--grad-accum {k!r} must be a positive integer dividing the batch "
                         f"of {size} pairs")

    def split(x):
        micro = x.reshape(size // k, k, *x.shape[1:]).swapaxes(0, 1)
        if batch_sharding is None:
            return micro
        spec = NamedSharding(batch_sharding.mesh, P(None, *batch_sharding.spec))
        return jax.lax.with_sharding_constraint(micro, spec)

    return jax.tree_util.tree_map(split, batch)


def accumulate_gradients(grad_fn: Callable, num_micro_batches: int, *,
                         batch_sharding: Any = None) -> Callable:
    """``grad_fn(params, batch, ref_params)`` averaged over ``num_micro_batches`` equal
    micro-batches (:func:`split_micro_batches`; ``batch_sharding`` as there) with
    ``lax.scan`` (sums in float32; each gradient returned in the dtype it was summed in,
    the loss and metrics in their own).

    Equal micro-batches make the average of the per-micro-batch means the full-batch
    mean, so for plain gradients the result equals ``grad_fn`` on the whole batch.
    ``num_micro_batches = 1`` returns ``grad_fn`` itself.
    """
    if num_micro_batches == 1:
        return grad_fn

    def accumulated(params, batch, ref_params=None):
        micro = split_micro_batches(batch, num_micro_batches, batch_sharding)

        def body(total, mb):
            out = grad_fn(params, mb, ref_params)
            return jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), total, out), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grad_fn, params, first, ref_params)
        zeros = jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes)
        total, _ = jax.lax.scan(body, zeros, micro)
        loss, metrics, grads = total
        loss, metrics = jax.tree_util.tree_map(
            lambda t, s: (t / num_micro_batches).astype(s.dtype), (loss, metrics), shapes[:2])
        # A gradient computed in bf16 for a float32 master weight
        # (lm.objectives.multiplied_params) keeps its average in float32: ``params`` may
        # hold the bf16 copies (lm.train.make_train_step's multiply), not the master's dtype.
        grads = jax.tree_util.tree_map(lambda t: t / num_micro_batches, grads)
        return loss, metrics, grads

    return accumulated
