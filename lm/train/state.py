"""The training state: one explicit pytree that the jitted step takes and returns."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; checkpointing it is checkpointing the run.

    Attributes:
      step: int32 scalar, the number of batches consumed so far, which is also the data
        position (batch k is a pure function of (seed, k)).
      params: the policy parameters.
      opt_state: the optax state of ``params``.
      rng: a raw ``uint32[2]`` key, split once per step for stochastic objectives.
      skipped: int32, updates skipped because loss or gradients were non-finite.
      halted_at: int32, the first step with a non-finite loss or gradient when the run
        stops on faults (-1: none). Once set, the state stops changing, so the state the
        host sees is the last good one.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array
    halted_at: jax.Array


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state at step 0 (``params`` is not copied; pass arrays you may donate)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
        skipped=jnp.zeros((), jnp.int32),
        halted_at=jnp.full((), -1, jnp.int32),
    )
