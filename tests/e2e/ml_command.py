"""``ml train`` in a subprocess, as a user runs it: runs under the test's own ``RUN_DIR``, this folder's
task modules (``resume_task``, ``kill_logger``, ...) importable, one thread, no launcher's variables."""

import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.entry"]
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
    cmd = [*ML, "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
