"""Orbax checkpoints of the whole run: state pytree plus a JSON record of where it is.

Orbax writes each step into a temporary folder and renames it when complete, so a
folder named by a step is either whole or (if damaged afterwards) detected on restore;
``max_to_keep`` keeps the last k. The JSON item holds the data position (= step), the
seed, and the run's config echo, so a resumed run reads the same batches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from lm.train.state import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be restored; the message names it."""


class Checkpointer:
    """Save/restore :class:`TrainState` under ``directory`` (one sub-folder per step)."""

    def __init__(self, directory: str, *, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, state: TrainState, meta: dict[str, Any]) -> int:
        """Save ``state`` at its own step (asynchronously; :meth:`close` waits)."""
        step = int(jax.device_get(state.step))
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta, step=step))
            ),
            force=True,
        )
        return step

    def restore(self, target: Any, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """Restore into ``target``: a pytree of ``jax.ShapeDtypeStruct`` with shardings.

        Raises ``CheckpointError`` naming the folder when nothing restorable is there.
        """
        self._manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        path = self.step_dir(step)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                ),
            )
            state, meta = restored["state"], restored["meta"]
        except Exception as err:  # Orbax raises many types for damaged folders.
            raise CheckpointError(
                f"checkpoint folder {path} is corrupt or incomplete "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                f"remove it to resume from an earlier step"
            ) from err
        if int(meta.get("step", -1)) != step or int(jax.device_get(state.step)) != step:
            raise CheckpointError(f"checkpoint folder {path} does not hold step {step}")
        return state, meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct``s of ``tree`` carrying ``shardings`` (a restore target)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def restore_params(directory: str, step: int | None = None) -> tuple[Any, int]:
    """The policy parameters (host arrays) of the checkpoint at ``step`` (default: latest)
    under ``directory``, without rebuilding the optimizer state, and that step.

    Whatever devices and processes wrote it, it is read whole into this process's host
    memory (the CPU device; the first device where JAX runs without a CPU backend): the
    shardings recorded in the checkpoint name devices that need not exist here, and one
    accelerator need not hold the optimizer state that comes with the parameters.
    """
    checkpointer = Checkpointer(directory)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in {checkpointer.directory}")
        try:
            host = jax.local_devices(backend="cpu")[0]
        except RuntimeError:  # JAX_PLATFORMS names no cpu
            host = jax.local_devices()[0]
        one_device = jax.sharding.SingleDeviceSharding(host)
        try:
            saved = ocp.StandardCheckpointHandler().metadata(Path(checkpointer.step_dir(step)) / "state")
            target = jax.tree_util.tree_map(
                lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=one_device),
                getattr(saved, "tree", saved),  # orbax >= 0.12 wraps the tree
            )
            restored = checkpointer._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as err:  # Orbax raises many types for damaged folders.
            raise CheckpointError(
                f"checkpoint folder {checkpointer.step_dir(step)} is corrupt or incomplete "
                f"({type(err).__name__})") from err
        if int(restored["state"]["step"]) != step:
            raise CheckpointError(f"checkpoint folder {checkpointer.step_dir(step)} does not hold step {step}")
        return jax.device_get(restored["state"]["params"]), step
    finally:
        checkpointer.close()
