"""Two real processes of one ``jax.distributed`` job on this host (2 CPU devices each,
gloo collectives): they assemble, train and checkpoint what one process does."""

import os
import sys

from train_helpers import ROOT, run_processes

BATCH_SCRIPT = os.path.join(ROOT, "tests", "lm", "multiprocess_batch.py")


def test_global_batch_rows_land_on_their_devices(tmp_path):
    done = run_processes(lambda flags: [sys.executable, BATCH_SCRIPT, *flags], tmp_path, timeout=90)
    for process in done:
        assert process.returncode == 0, process.stderr
        for spec in ("data=4", "data=2,fsdp=2", "fsdp=4"):
            assert f"BATCH OK {spec} alternating" in process.stdout
