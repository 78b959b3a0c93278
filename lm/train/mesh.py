"""Device mesh, sharding rules and global-batch assembly.

The mesh has two axes, ``("data", "fsdp")``. A batch is split along its leading pair axis
B over *both* axes (every device holds ``B / (data * fsdp)`` pairs); parameters and the
optimizer state are FSDP-sharded: each leaf with ≥2 dims is split over ``"fsdp"`` along
its largest dimension divisible by the ``fsdp`` size, everything else is replicated. Under
``jit`` XLA all-gathers a layer's weights where it is used and reduce-scatters gradients,
so the sharded step computes the same function as the single-device one.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
DISTRIBUTED_ENV = "SQUEEZE_DISTRIBUTED"


class ConfigError(ValueError):
    """A configuration that cannot run (mesh, batch size, paths); the message says which."""


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=4"`` → ``{"data": 2, "fsdp": 4}``; default: every device on ``data``.

    One axis may be ``-1`` (takes the remaining devices). Raises ``ConfigError`` when the
    spec is malformed or its product is not ``num_devices``.
    """
    sizes: dict[str, int] = {}
    seen: set[str] = set()
    if spec:
        for part in spec.split(","):
            name, sep, value = part.strip().partition("=")
            name = name.strip()
            if not sep or name not in AXES or name in seen:
                raise ConfigError(
                    f"--mesh {spec!r}: expected 'data=N,fsdp=M' (axes {', '.join(AXES)}), got {part!r}"
                )
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ConfigError(f"--mesh {spec!r}: size of {name!r} is not an integer: {value!r}") from None
            if sizes[name] == 0 or sizes[name] < -1:
                raise ConfigError(f"--mesh {spec!r}: size of {name!r} must be positive or -1")
            seen.add(name)
    sizes.setdefault("fsdp", 1)
    sizes.setdefault("data", 1 if sizes["fsdp"] == -1 else -1)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"--mesh {spec!r}: at most one axis may be -1")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"--mesh {spec!r}: {num_devices} devices are not divisible by {fixed}"
            )
        sizes[free[0]] = num_devices // fixed
    if sizes["data"] * sizes["fsdp"] != num_devices:
        raise ConfigError(
            f"--mesh {spec!r}: data={sizes['data']} x fsdp={sizes['fsdp']} = "
            f"{sizes['data'] * sizes['fsdp']} devices, but {num_devices} are available"
        )
    return sizes


def make_mesh(spec: str | None = None, devices: Any = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over ``devices`` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    grid = np.asarray(devices, dtype=object).reshape(sizes["data"], sizes["fsdp"])
    return Mesh(grid, AXES)


def check_batch_size(batch_size: int, mesh_shape: Mapping[str, int], grad_accum: int = 1) -> None:
    """The pair axis is split over every device: ``batch_size`` must divide evenly, and so
    must each of its ``grad_accum`` micro-batches (each is spread over all devices).

    ``mesh_shape`` is ``Mesh.shape`` (or :func:`parse_mesh`'s dict).
    """
    shards = mesh_shape["data"] * mesh_shape["fsdp"]
    mesh = f"the {shards} batch shards of the mesh (data={mesh_shape['data']} x fsdp={mesh_shape['fsdp']})"
    if grad_accum > 1 and batch_size % grad_accum:
        raise ConfigError(f"--batch-size {batch_size} is not divisible by --grad-accum {grad_accum}")
    if grad_accum > 1 and (batch_size // grad_accum) % shards:
        raise ConfigError(
            f"--batch-size {batch_size} / --grad-accum {grad_accum} = {batch_size // grad_accum} pairs "
            f"per micro-batch, not divisible by {mesh}"
        )
    if batch_size <= 0 or batch_size % shards:
        raise ConfigError(f"--batch-size {batch_size} is not divisible by {mesh}")


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest dim divisible by ``fsdp`` (ties: the first); replicate <2-D leaves."""
    if fsdp == 1 or len(shape) < 2:
        return P()
    candidates = [(d, -i) for i, d in enumerate(shape) if d % fsdp == 0]
    if not candidates:
        return P()
    _, neg_axis = max(candidates)
    axes: list[str | None] = [None] * len(shape)
    axes[-neg_axis] = "fsdp"
    return P(*axes)


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` for every leaf of a params/optimizer-state pytree (arrays or
    ``ShapeDtypeStruct``s) under the FSDP rule."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp)), tree
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (pair) axis over both mesh axes; the rest replicated."""
    return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def rows_in(batch: Any) -> int:
    """A batch's rows (pairs): the leading dimension, which every array of the pytree shares."""
    shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(batch)]
    rows = {shape[0] if shape else None for shape in shapes}
    if len(rows) != 1 or None in rows:
        raise ValueError(f"a batch's arrays must share a leading (row) dimension; got shapes {shapes}")
    return rows.pop()


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, *,
              replicate_uneven: bool = False) -> dict[str, jax.Array]:
    """Assemble the global batch from host arrays.

    Every process computes the same global batch (batch k is a pure function of the
    seed and k) and hands over all of it: with ``global_shape`` equal to the local
    shape, ``jax.make_array_from_process_local_data`` copies to each local device the
    rows that device holds, so no assumption about which rows a process's devices
    cover (they need not be contiguous in the mesh) can put a row in the wrong place.

    Rows that do not split evenly over the devices are an error, or with
    ``replicate_uneven`` (an eval's smaller last batch) the whole batch goes to every
    device, each computing all of it.
    """
    sharding = batch_sharding(mesh)
    if replicate_uneven and rows_in(batch) % mesh.size:  # the rows are split over every device
        sharding = replicated(mesh)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        out[name] = jax.make_array_from_process_local_data(sharding, value, value.shape)
    return out


def maybe_initialize_distributed(
    flag: bool = False,
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> bool:
    """Join a multi-process job when asked: ``flag``, ``SQUEEZE_DISTRIBUTED=1``, or any
    explicit setting.

    What is left ``None`` ``jax.distributed.initialize()`` detects from the cluster
    (SLURM, Open MPI, TPU pods; the coordinator also from ``JAX_COORDINATOR_ADDRESS``).
    Elsewhere, e.g. on hosts started by hand, all three must be given. Must run before
    any JAX computation; on a single host it is never called. ``timeout_s``: how long to
    wait for every process to reach the coordinator before failing.
    """
    explicit = (coordinator, num_processes, process_id)
    if flag or any(v is not None for v in explicit) or os.environ.get(DISTRIBUTED_ENV, "") not in ("", "0"):
        if coordinator is not None and process_id:
            wait_for_coordinator(coordinator, timeout_s)
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
            initialization_timeout=timeout_s,
        )
        return True
    return False


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once something listens at ``address`` (HOST:PORT), else raise ConnectionError
    after ``timeout_s``: XLA's own client aborts the whole process when the coordinator
    never answers, with a stack trace that names neither the address nor the cause."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"nothing listens at {address} after {timeout_s:g} s ({err}); "
                                      "is process 0 running there?") from None
            time.sleep(0.2)


def to_host(tree: Any) -> Any:
    """Host (numpy) copies of a pytree of arrays that may be sharded over several
    processes. Every process must call it (it gathers); every process gets the whole tree."""
    return multihost_utils.process_allgather(tree, tiled=True)


def from_primary(value: bool) -> bool:
    """Process 0's ``value``, on every process (a collective: all must call it)."""
    if jax.process_count() == 1:
        return value
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def on_every_process(value: bool) -> bool:
    """Whether ``value`` holds on every process (a collective: all must call it)."""
    if jax.process_count() == 1:
        return value
    return bool(np.all(multihost_utils.process_allgather(np.asarray(value))))
