"""The training state: one explicit pytree that the jitted step takes and returns."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

Multiply = Callable[[Any], Any]


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
      multiplied: ``multiply(params)`` where it differs from ``params`` (the matrices cast
        to the compute dtype, :func:`lm.objectives.multiplied_params`), None at the other
        leaves, or None altogether when the step keeps no such copy (see
        :func:`multiplied_copies`). A function of ``params``: checkpoints leave it out.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array
    halted_at: jax.Array
    multiplied: Any = None


def multiplied_copies(multiply: Multiply | None, params: Any) -> Any:
    """The leaves of ``multiply(params)`` whose dtype differs from their parameter's, None
    at the others (None when ``multiply`` is None).

    Why the step keeps them: the objective multiplies bf16 matrices whose master copy is
    float32. Cast at the start of every step, they cost a pass that reads 4 and writes 2
    bytes a parameter (4.0 ms of a 110 ms 2.65B step on the H200); written by the update
    that writes the float32 parameters, in the same fusion, 2 bytes a parameter.
    ``multiply`` must change leaves by casting them alone, so that a leaf whose dtype it
    keeps is the parameter itself.
    """
    if multiply is None:
        return None
    return jax.tree_util.tree_map(lambda m, p: m if m.dtype != p.dtype else None,
                                  multiply(params), params)


def with_multiplied(state: TrainState, multiply: Multiply | None) -> TrainState:
    """``state`` with the copies of ``multiply`` written from its parameters."""
    return state.replace(multiplied=multiplied_copies(multiply, state.params))


def objective_params(state: TrainState) -> Any:
    """What the step's objective takes: ``state.params`` with the kept copies in their
    place, which is ``multiply(params)`` (``params`` when there are none)."""
    if state.multiplied is None:
        return state.params
    return jax.tree_util.tree_map(lambda copy, p: p if copy is None else copy,
                                  state.multiplied, state.params, is_leaf=lambda x: x is None)


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int,
                       multiply: Multiply | None = None) -> TrainState:
    """A fresh state at step 0 (``params`` is not copied; pass arrays you may donate), with
    the copies of ``multiply`` when given (:func:`multiplied_copies`)."""
    return with_multiplied(TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
        skipped=jnp.zeros((), jnp.int32),
        halted_at=jnp.full((), -1, jnp.int32),
    ), multiply)
