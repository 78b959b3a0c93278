"""One process of a ``jax.distributed`` job checking ``put_batch``: over a mesh whose
devices alternate between the processes, the global batch holds the host batch's rows
in their places. Prints ``BATCH OK <mesh>`` per mesh; exits non-zero on a mismatch."""

import argparse
import sys

import jax
import numpy as np

from lm.train import mesh as mesh_lib


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    args = ap.parse_args()
    mesh_lib.maybe_initialize_distributed(
        coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    by_process = [jax.local_devices(process_index=i) for i in range(jax.process_count())]
    alternating = [d for group in zip(*by_process) for d in group]
    batch = {"x": np.arange(8 * 2 * 3, dtype=np.int32).reshape(8, 2, 3)}
    for spec in ("data=4", "data=2,fsdp=2", "fsdp=4"):
        for name, devices in (("process-major", None), ("alternating", alternating)):
            mesh = mesh_lib.make_mesh(spec, devices)
            got = mesh_lib.to_host(mesh_lib.put_batch(batch, mesh))
            if not np.array_equal(got["x"], batch["x"]):
                print(f"BATCH WRONG {spec} {name}: {got['x'][:, 0, 0]}", file=sys.stderr)
                return 1
            print(f"BATCH OK {spec} {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
