"""What a run records of itself agrees with what happened, when a signal lands at an awkward moment.

Each test runs ``ml train`` in a subprocess (the task and model of ``resume_task.py``), with the
signal sent by the task itself at an exact moment (see ``resume_task.IndexedTask``):

- Ctrl-C during the validation due at a checkpointed step: the resumed run validates that step
  first, so the curve has every point (no gap at that step);
- SIGINT or SIGTERM during the teardown of a run that completed every step: ``status.json`` and
  ``ml runs`` say ``finished`` and the exit code is 0;
- SIGTERM as the interpreter exits, after training: the exit code stays the run's (not -15).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ml.tools.experiments import describe_run

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.entry"]
TIMEOUT_S = 120

CONFIG = """\
model: {name: "resume_task:DropoutBNModel", hidden: 16, dropout: 0.2}
task:
  name: "resume_task:IndexedTask"
  num_samples: 48
  max_steps: 8
  train_dl: {batch_size: 8, shuffle: true, drop_last: true}
  valid_dl: {batch_size: 8}  # 3 batches: a signal in the first abandons the pass
  test_dl: {batch_size: 24}
optimizer: {name: adamw, lr: 1e-2}
trainer:
  name: sl
  exp_name: book
  valid_every_n_steps: 2
  checkpoint: {save_every_n_steps: 2}
logger:
  - {name: jsonl, write_every_n_steps: 1}
"""


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
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


def _exp_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "book" / "run_0"


def _valid_steps(exp_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["phase"] == "valid"]


def test_a_ctrl_c_during_a_validation_is_made_good_when_the_run_continues(tmp_path: Path) -> None:
    marker = tmp_path / "sent"
    first = _train(
        tmp_path,
        _write(tmp_path),
        "task.signal_phase=valid",
        "task.signal_step=4",
        f"task.signal_marker={marker}",
    )
    assert first.returncode == 130, first.stderr[-3000:]
    exp_dir = _exp_dir(tmp_path)
    assert marker.exists() and os.readlink(exp_dir / "checkpoints" / "ckpt.pt") == "ckpt.4.pt"
    assert _valid_steps(exp_dir) == [2]  # the validation at step 4 was abandoned, not logged

    second = _train(tmp_path, str(exp_dir / "config.yaml"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resumed from" in second.stderr
    assert _valid_steps(exp_dir) == [2, 4, 6, 8]  # step 4's validation was run on resuming


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_in_the_teardown_of_a_completed_run_leaves_it_finished(tmp_path: Path, sig: str) -> None:
    result = _train(tmp_path, _write(tmp_path), "task.signal_phase=end", f"task.signal_name={sig}")
    assert result.returncode == 0, result.stderr[-3000:]
    exp_dir = _exp_dir(tmp_path)
    status = json.loads((exp_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 8, status
    assert describe_run(exp_dir).state == "finished"
    assert not (exp_dir / ".lock_running").exists()


def test_a_sigterm_as_the_process_exits_does_not_change_its_exit_code(tmp_path: Path) -> None:
    result = _train(tmp_path, _write(tmp_path), "task.signal_phase=exit", "task.signal_name=SIGTERM")
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert result.returncode != -signal.SIGTERM
    assert json.loads((_exp_dir(tmp_path) / "status.json").read_text())["state"] == "finished"


def _write(tmp_path: Path) -> str:
    config = tmp_path / "book.yaml"
    config.write_text(CONFIG)
    return str(config)
