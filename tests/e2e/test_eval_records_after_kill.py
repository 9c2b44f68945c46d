"""A ``kill -9`` between an evaluation's records and the checkpoint that says it was done leaves
each evaluation logged once.

The run's last step (6) is checkpointed before its final validation and test; the checkpoint is
saved again after each. A user logger listed after ``jsonl`` and ``tensorboard``
(``kill_logger.KillLogger``) SIGKILLs the process as they write the validation of step 6 (first
session) and then its test (second session): the records are on disk, the checkpoint that covers
them is not. Each continuation redoes that evaluation, so the records of step 6 the checkpoint does
not cover must be dropped on resume (before the fix the first copy stayed: two ``valid`` or
``test`` lines of step 6). Three ``ml train`` processes, shared by the tests of this module.
"""

import json
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.ml_command import ml_train

MAX_STEPS, VALID_EVERY = 6, 4  # step 6 is validated only because it is the last

CONFIG = f"""\
model: {{name: "resume_task:DropoutBNModel", hidden: 8, dropout: 0.0}}
task:
  name: "resume_task:IndexedTask"
  num_samples: 24
  max_steps: {MAX_STEPS}
  train_dl: {{batch_size: 8}}
  valid_dl: {{batch_size: 12}}
  test_dl: {{batch_size: 12}}
optimizer: {{name: adamw, lr: 1e-2}}
trainer:
  name: sl
  exp_name: evalkill
  valid_every_n_steps: {VALID_EVERY}
"""


def _loggers(kill_phase: str, marker: Path) -> str:
    return (
        "logger=[{name: jsonl, write_every_n_steps: 1}, "
        "{name: tensorboard, write_every_n_steps: 1, flush_every_n_seconds: 0}, "
        f"{{name: 'kill_logger:KillLogger', phase: {kill_phase}, step: {MAX_STEPS}, marker: '{marker}'}}]"
    )


def _records(exp_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def _steps(records: list[dict[str, Any]], phase: str) -> list[int]:
    return [r["step"] for r in records if r["phase"] == phase]


@dataclass
class Sessions:
    exp_dir: Path
    after_valid_kill: list[dict[str, Any]]  # metrics.jsonl as each killed process left it
    after_test_kill: list[dict[str, Any]]
    stderr: list[str]  # of the two processes that resumed


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Sessions:
    tmp = tmp_path_factory.mktemp("evalkill")
    config = tmp / "config.yaml"
    config.write_text(CONFIG)
    exp_dir = tmp / "runs" / "evalkill" / "run_0"
    resumed = str(exp_dir / "config.yaml")

    first = ml_train(tmp, str(config), _loggers("valid", tmp / "valid_killed"))
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    after_valid_kill = _records(exp_dir)
    # Continuing changes only the loggers (allowed): the same step's test is killed next.
    second = ml_train(tmp, resumed, _loggers("test", tmp / "test_killed"))
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    after_test_kill = _records(exp_dir)
    third = ml_train(tmp, resumed)
    assert third.returncode == 0, third.stderr[-3000:]
    return Sessions(exp_dir, after_valid_kill, after_test_kill, [second.stderr, third.stderr])


def test_each_kill_landed_after_the_records_and_before_the_checkpoint_covering_them(
    sessions: Sessions,
) -> None:
    assert _steps(sessions.after_valid_kill, "valid") == [VALID_EVERY, MAX_STEPS]
    assert _steps(sessions.after_valid_kill, "test") == []
    assert _steps(sessions.after_test_kill, "valid") == [VALID_EVERY, MAX_STEPS]
    assert _steps(sessions.after_test_kill, "test") == [MAX_STEPS]
    for stderr in sessions.stderr:  # each continued from the checkpoint of step 6
        assert f"at step {MAX_STEPS}" in stderr
        assert f"at step {MAX_STEPS} not covered by it" in stderr  # and said what it dropped
    assert json.loads((sessions.exp_dir / "status.json").read_text())["state"] == "finished"


def test_metrics_jsonl_has_each_evaluation_once(sessions: Sessions) -> None:
    records = _records(sessions.exp_dir)
    assert [key for key, n in Counter((r["phase"], r["step"]) for r in records).items() if n > 1] == []
    assert _steps(records, "train") == list(range(1, MAX_STEPS + 1))
    assert _steps(records, "valid") == [VALID_EVERY, MAX_STEPS]
    assert _steps(records, "test") == [MAX_STEPS]
    # The kept lines stay as they were: the validation of step 4 is the first session's.
    first_valid = next(r for r in sessions.after_valid_kill if r["phase"] == "valid")
    assert next(r for r in records if r["phase"] == "valid") == first_valid


def test_tensorboard_shows_each_evaluation_once(sessions: Sessions) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    records = _records(sessions.exp_dir)
    for phase, steps in (("valid", [VALID_EVERY, MAX_STEPS]), ("test", [MAX_STEPS])):
        events = accumulator.EventAccumulator(str(sessions.exp_dir / "logs" / "tensorboard" / phase))
        events.Reload()
        points = [(e.step, e.value) for e in events.Scalars(f"{phase}/loss")]
        assert [step for step, _ in points] == steps
        jsonl = {r["step"]: r["metrics"][f"{phase}/loss"] for r in records if r["phase"] == phase}
        assert [value for _, value in points] == pytest.approx([jsonl[step] for step in steps])
