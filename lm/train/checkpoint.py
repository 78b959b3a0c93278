"""Orbax checkpoints of the whole run: state pytree plus a JSON record of where it is.

Orbax writes each step into a temporary folder and renames it when complete, so a
folder named by a step is either whole or (if damaged afterwards) detected on restore;
``max_to_keep`` keeps the last k. The JSON item holds the data position (= step), the
settings that decide the run's trajectory (seed, batch size, the caller's ``meta``), which a
resume must repeat, and the logging window in progress, so a resumed run reads the same
batches and logs the same rows. A restore first compares the saved arrays' shapes and dtypes
with the target's, so another model's folder is reported as such, not as damaged.
"""

from __future__ import annotations

import dataclasses
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
        """Save ``state`` at its own step (asynchronously; :meth:`close` waits), without
        ``state.multiplied`` (:func:`_saved_fields`)."""
        step = int(jax.device_get(state.step))
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_saved_fields(state)),
                meta=ocp.args.JsonSave(dict(meta, step=step))
            ),
            force=True,
        )
        return step

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON record saved with the checkpoint at ``step``.

        Raises ``CheckpointError`` naming the folder when it cannot be read.
        """
        self._manager.wait_until_finished()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(restored["meta"])
        except Exception as err:  # Orbax raises many types for damaged folders.
            raise _corrupt(self.step_dir(step), err) from err

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """Restore into ``target``: a :class:`TrainState` of ``jax.ShapeDtypeStruct`` with
        shardings; the state comes back with ``multiplied`` None (see :meth:`save`).

        Raises ``CheckpointError`` naming the folder when nothing restorable is there, and
        before reading any array, when the arrays saved there are not ``target``'s
        (another model or optimizer: the folder is intact but belongs to another run).
        """
        target = target.replace(multiplied=None)
        self._manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        path = self.step_dir(step)
        try:
            saved = _leaf_specs(_saved_tree(path))
        except Exception as err:  # Orbax raises many types for damaged folders.
            raise _corrupt(path, err) from err
        differences = _describe_differences(saved, _leaf_specs(target))
        if differences:
            raise CheckpointError(
                f"checkpoint folder {path} holds a different model or optimizer state than this "
                f"run ({differences}); it is intact: resume with the model and flags it was "
                f"trained with, or train in a new folder")
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_saved_fields(target)),
                    meta=ocp.args.JsonRestore()
                ),
            )
            state, meta = TrainState(**restored["state"]), restored["meta"]
        except Exception as err:  # Orbax raises many types for damaged folders.
            raise _corrupt(path, err) from err
        if int(meta.get("step", -1)) != step or int(jax.device_get(state.step)) != step:
            raise CheckpointError(f"checkpoint folder {path} does not hold step {step}")
        return state, meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _saved_fields(state: TrainState) -> dict[str, Any]:
    """What a checkpoint holds of ``state``: every field but ``multiplied``, a function of
    the parameters (:func:`lm.train.state.with_multiplied` writes it again on resume).
    Orbax stores a dataclass as the dict of its fields, so this is the layout of the
    checkpoints written before the state had ``multiplied``, which therefore restore."""
    return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)
            if field.name != "multiplied"}


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct``s of ``tree`` carrying ``shardings`` (a restore target)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _corrupt(path: str, err: Exception) -> CheckpointError:
    first = str(err).splitlines()[0] if str(err) else ""
    return CheckpointError(f"checkpoint folder {path} is corrupt or incomplete "
                           f"({type(err).__name__}: {first}); remove it to resume from an earlier step")


def _saved_tree(step_dir: str) -> Any:
    """The tree of array metadata (shape, dtype) saved under ``step_dir/state``."""
    saved = ocp.StandardCheckpointHandler().metadata(Path(step_dir) / "state")
    return getattr(saved, "tree", saved)  # orbax >= 0.12 wraps the tree


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``"opt_state/0/mu/w1" -> (shape, dtype)`` for every array of ``tree``.

    Orbax saves a state's dataclasses and tuples as dicts and lists, so the paths are
    compared by their names alone.
    """
    return {
        "/".join(_key_name(k) for k in path): (tuple(leaf.shape), str(jax.numpy.dtype(leaf.dtype)))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _describe_differences(saved: dict, wanted: dict, *, shown: int = 3) -> str:
    """The first ``shown`` arrays (in ``wanted``'s order: the parameters before their
    optimizer state) that differ between two :func:`_leaf_specs`, in words ("" when none do)."""
    spec = lambda s: f"{s[0]} {s[1]}" if s else "absent"
    names = [*wanted, *(name for name in saved if name not in wanted)]
    lines = [f"{name}: {spec(saved.get(name))} there, {spec(wanted.get(name))} here"
             for name in names if saved.get(name) != wanted.get(name)]
    more = f"; {len(lines) - shown} more differ" if len(lines) > shown else ""
    return "; ".join(lines[:shown]) + more


def restore_params(directory: str, step: int | None = None) -> tuple[Any, int]:
    """The policy parameters (host arrays) of the checkpoint at ``step`` (default: latest)
    under ``directory``, and that step: the parameters and the step alone are read (a
    partial restore), not the optimizer state saved with them (twice the parameters'
    bytes under AdamW).

    Whatever devices and processes wrote it, it is read into this process's host memory
    (the CPU device; the first device where JAX runs without a CPU backend): the shardings
    recorded in the checkpoint name devices that need not exist here.
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
        state_dir = Path(checkpointer.step_dir(step)) / "state"
        try:
            saved = _saved_tree(checkpointer.step_dir(step))
            target = {part: jax.tree_util.tree_map(
                lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=one_device),
                saved[part]) for part in ("params", "step")}
            restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
                item=target, partial_restore=True,
                restore_args=jax.tree_util.tree_map(
                    lambda _: ocp.ArrayRestoreArgs(sharding=one_device), target)))
        except Exception as err:  # Orbax raises many types for damaged folders.
            raise CheckpointError(
                f"checkpoint folder {checkpointer.step_dir(step)} is corrupt or incomplete "
                f"({type(err).__name__})") from err
        if int(restored["step"]) != step:
            raise CheckpointError(f"checkpoint folder {checkpointer.step_dir(step)} does not hold step {step}")
        return jax.device_get(restored["params"]), step
    finally:
        checkpointer.close()
