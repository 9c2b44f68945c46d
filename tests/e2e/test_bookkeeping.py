"""What a run records of itself agrees with what happened, when a signal lands at an awkward moment.

Each test runs ``ml train`` in a subprocess (the task and model of ``resume_task.py``), with the
signal sent by the task itself at an exact moment (see ``resume_task.IndexedTask``):

- Ctrl-C during the validation due at a checkpointed step (by steps or by time): the resumed run
  validates that step first, so the curve has every point (no gap at that step);
- Ctrl-C during the final test: each evaluation is logged once, whether the test was abandoned (and
  run when the run continues) or completed (the run finished);
- ``kill -9`` after a validation that came after its step's checkpoint (one redone on continuing,
  the final one): the next start does not validate that step again;
- a time-based validation cadence counts on across sessions;
- SIGINT or SIGTERM during the teardown of a run that completed every step: ``status.json`` and
  ``ml runs`` say ``finished`` and the exit code is 0;
- SIGTERM as the interpreter exits, after training: the exit code stays the run's (not -15).
"""

import json
import os
import signal
from pathlib import Path

import pytest

from ml.tools.experiments import describe_run
from tests.e2e.ml_command import ml_train

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


def _exp_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "book" / "run_0"


def _steps(exp_dir: Path, phase: str) -> list[int]:
    records = [json.loads(line) for line in (exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["phase"] == phase]


def _valid_steps(exp_dir: Path) -> list[int]:
    return _steps(exp_dir, "valid")


def _test_steps(exp_dir: Path) -> list[int]:
    return _steps(exp_dir, "test")


# Validation every 2 steps, or after every step (a time-based cadence: any time has passed).
CADENCES = {
    "steps": ([], [2, 4, 6, 8]),
    "seconds": (
        ["trainer.valid_every_n_steps=null", "trainer.valid_every_n_seconds=1e-9"],
        [1, 2, 3, 4, 5, 6, 7, 8],
    ),
}


@pytest.mark.parametrize("cadence", list(CADENCES))
def test_a_ctrl_c_during_a_validation_is_made_good_when_the_run_continues(
    tmp_path: Path, cadence: str
) -> None:
    """The time-based cadence's abandoned validation was not redone: it is not due by the clock of
    the resumed session."""
    overrides, expected = CADENCES[cadence]
    marker = tmp_path / "sent"
    first = ml_train(
        tmp_path,
        _write(tmp_path),
        *overrides,
        "task.signal_phase=valid",
        "task.signal_step=4",
        f"task.signal_marker={marker}",
    )
    assert first.returncode == 130, first.stderr[-3000:]
    exp_dir = _exp_dir(tmp_path)
    assert marker.exists() and os.readlink(exp_dir / "checkpoints" / "ckpt.pt") == "ckpt.4.pt"
    assert 4 not in _valid_steps(exp_dir)  # the validation at step 4 was abandoned, not logged

    second = ml_train(tmp_path, str(exp_dir / "config.yaml"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resumed from" in second.stderr
    assert _valid_steps(exp_dir) == expected  # step 4's validation was run on resuming


@pytest.mark.parametrize("test_batch", [8, 24], ids=["abandoned", "completed"])
def test_a_ctrl_c_during_the_final_test_logs_each_evaluation_once(tmp_path: Path, test_batch: int) -> None:
    """A test pass the signal abandons (3 batches) is run when the run continues, without
    validating the last step again; one that completes (its one batch ran) finishes the run. The
    resumed trainer did not know which step was validated last, and a completed test was run
    again: both were logged twice."""
    marker = tmp_path / "sent"
    args = ("task.signal_phase=test", "task.signal_step=8", f"task.signal_marker={marker}")
    first = ml_train(tmp_path, _write(tmp_path), *args, f"task.test_dl.batch_size={test_batch}")
    exp_dir = _exp_dir(tmp_path)
    if test_batch == 8:
        assert first.returncode == 130, first.stderr[-3000:]
        assert _test_steps(exp_dir) == []
        second = ml_train(tmp_path, str(exp_dir / "config.yaml"))
        assert second.returncode == 0, second.stderr[-3000:]
    else:
        assert first.returncode == 0, first.stderr[-3000:]
    assert _valid_steps(exp_dir) == [2, 4, 6, 8]
    assert _test_steps(exp_dir) == [8]
    assert json.loads((exp_dir / "status.json").read_text())["state"] == "finished"


def test_a_kill_9_after_a_validation_redone_on_continuing_does_not_log_it_twice(tmp_path: Path) -> None:
    """The validation redone at the resumed step was logged, but the checkpoint of that step did not
    know: a ``kill -9`` before the next checkpoint made the next start validate (and log) it again."""
    first = ml_train(
        tmp_path,
        _write(tmp_path),
        "task.signal_phase=valid",
        "task.signal_step=4",
        f"task.signal_marker={tmp_path / 'a'}",
    )
    assert first.returncode == 130, first.stderr[-3000:]
    config = str(_exp_dir(tmp_path) / "config.yaml")
    kill = (
        "task.signal_phase=train",
        "task.signal_step=4",
        "task.signal_name=SIGKILL",
        f"task.signal_marker={tmp_path / 'b'}",
    )
    second = ml_train(tmp_path, config, "--allow-config-change", *kill)  # killed in step 5
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    third = ml_train(tmp_path, config, "--allow-config-change")
    assert third.returncode == 0, third.stderr[-3000:]
    assert _valid_steps(_exp_dir(tmp_path)) == [2, 4, 6, 8]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_kill_9_during_the_final_test_does_not_validate_the_last_step_again(
    tmp_path: Path, async_save: bool
) -> None:
    """The final validation (step 8 is not due by the cadence) came after the checkpoint of step 8;
    the checkpoint saved again for it must be on disk before the test begins (an asynchronous save
    was still being written when the kill came)."""
    args = (
        "trainer.valid_every_n_steps=3",
        f"trainer.checkpoint.async_save={str(async_save).lower()}",
        "task.signal_phase=test",
        "task.signal_step=8",
        "task.signal_name=SIGKILL",
    )
    first = ml_train(tmp_path, _write(tmp_path), *args, f"task.signal_marker={tmp_path / 'sent'}")
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    second = ml_train(tmp_path, str(_exp_dir(tmp_path) / "config.yaml"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert _valid_steps(_exp_dir(tmp_path)) == [3, 6, 8]
    assert _test_steps(_exp_dir(tmp_path)) == [8]


def test_a_time_based_validation_counts_on_from_the_last_one_across_sessions(tmp_path: Path) -> None:
    """Each session restarted the interval: a run stopped more often than it never validated."""
    args = ("trainer.valid_every_n_steps=null", "trainer.valid_every_n_seconds=1.0", "task.step_sleep_s=0.15")
    stop = ("task.signal_phase=train", "task.signal_step=3", f"task.signal_marker={tmp_path / 'sent'}")
    first = ml_train(tmp_path, _write(tmp_path), *args, *stop)  # stopped at step 4, before a validation
    assert first.returncode == 130, first.stderr[-3000:]
    exp_dir = _exp_dir(tmp_path)
    assert _valid_steps(exp_dir) == []
    second = ml_train(tmp_path, str(exp_dir / "config.yaml"))
    assert second.returncode == 0, second.stderr[-3000:]
    records = [json.loads(line) for line in (exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in records if r["phase"] == "train"}
    due = min(step for step, seconds in elapsed.items() if seconds >= 1.0)  # counted from the start
    assert due < 8, elapsed  # (else the run is too fast to tell)
    assert _valid_steps(exp_dir)[0] == due, (_valid_steps(exp_dir), elapsed)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_in_the_teardown_of_a_completed_run_leaves_it_finished(tmp_path: Path, sig: str) -> None:
    result = ml_train(tmp_path, _write(tmp_path), "task.signal_phase=end", f"task.signal_name={sig}")
    assert result.returncode == 0, result.stderr[-3000:]
    exp_dir = _exp_dir(tmp_path)
    status = json.loads((exp_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 8, status
    assert describe_run(exp_dir).state == "finished"
    assert not (exp_dir / ".lock_running").exists()


def test_a_sigterm_as_the_process_exits_does_not_change_its_exit_code(tmp_path: Path) -> None:
    result = ml_train(tmp_path, _write(tmp_path), "task.signal_phase=exit", "task.signal_name=SIGTERM")
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert result.returncode != -signal.SIGTERM
    assert json.loads((_exp_dir(tmp_path) / "status.json").read_text())["state"] == "finished"


def _write(tmp_path: Path) -> str:
    config = tmp_path / "book.yaml"
    config.write_text(CONFIG)
    return str(config)
