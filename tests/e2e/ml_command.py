"""``ml train`` in a subprocess: runs under the test's own ``RUN_DIR``, this folder's task modules
(``resume_task``, ``kill_logger``, ...) importable, one thread, no launcher's variables; forked from
a process that imported torch (``tests/forked_ml.py``): what these tests check is the run, not its
start-up."""

import os
import subprocess
from pathlib import Path

from tests.forked_ml import run_ml

TIMEOUT_S = 120


def ml_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``ml train ARGS`` with ``RUN_DIR=tmp_path/runs``, to completion (its output captured)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ML_EXP_NAME")
    }
    env.update(
        RUN_DIR=str(tmp_path / "runs"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return run_ml(["train", *args], env, timeout_s=TIMEOUT_S)
