"""Tests of the loggers' resume hook for evaluations the checkpoint does not cover.

A run resumed from its checkpoint at step S redoes the evaluations of S that were logged after the
checkpoint was saved (``redone_phases``): ``metrics.jsonl`` loses their lines, TensorBoard purges
them from that phase's folder only, and a logger written for the one-argument ``on_resume`` is still
called. (The whole path, with ``kill -9`` and real runs: tests/e2e/test_eval_records_after_kill.py.)
"""

import json
from pathlib import Path

import pytest

from ml.core.state import State
from ml.loggers.base import BaseLogger, BaseLoggerConfig, LogBatch
from ml.loggers.jsonl import JsonlLogger, JsonlLoggerConfig, drop_records_after
from ml.loggers.tensorboard import TensorboardLogger, TensorboardLoggerConfig

# What a process killed after the test of step 6 leaves: train 5..7 (7 from a process that went on
# past a checkpoint at 6 would be dropped as well), valid and test of 6.
WRITTEN = [(5, "train"), (6, "train"), (6, "valid"), (6, "test"), (7, "train")]


def _write_metrics(path: Path) -> list[bytes]:
    lines = [
        json.dumps({"step": step, "phase": phase, "metrics": {}}).encode() + b"\n" for step, phase in WRITTEN
    ]
    path.write_bytes(b"".join(lines))
    return lines


@pytest.mark.parametrize(
    ("redone", "kept"),
    [
        (frozenset(), [(5, "train"), (6, "train"), (6, "valid"), (6, "test")]),
        (frozenset({"test"}), [(5, "train"), (6, "train"), (6, "valid")]),
        (frozenset({"valid", "test"}), [(5, "train"), (6, "train")]),
    ],
)
def test_drop_records_after_also_drops_the_step_s_redone_phases(
    tmp_path: Path, redone: frozenset[str], kept: list[tuple[int, str]]
) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = _write_metrics(path)
    assert drop_records_after(path, 6, redone) == len(WRITTEN) - len(kept)
    assert path.read_bytes() == b"".join(
        line for line, key in zip(lines, WRITTEN, strict=True) if key in kept
    )


def test_a_record_with_a_phase_of_another_type_is_kept_like_one_of_another_phase(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    odd = b'{"step": 6, "phase": ["valid"], "metrics": {}}\n'  # (edited by hand)
    path.write_bytes(odd)
    assert drop_records_after(path, 6, frozenset({"valid"})) == 0 and path.read_bytes() == odd


def test_the_jsonl_logger_drops_them_on_resume_and_appends_after(tmp_path: Path) -> None:
    _write_metrics(tmp_path / "metrics.jsonl")
    logger = JsonlLogger(JsonlLoggerConfig(name="jsonl"))
    logger.initialize(tmp_path)
    logger.on_resume_from(State(num_steps=6), frozenset({"test"}))
    logger.write(State(num_steps=6, phase="test"), LogBatch(scalars={"test/loss": 0.5}))
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase"]) for r in records] == [
        (5, "train"),
        (6, "train"),
        (6, "valid"),
        (6, "test"),
    ]
    assert records[-1]["metrics"] == {"test/loss": 0.5}  # the new test record, once


def _points(log_dir: Path, phase: str) -> list[tuple[int, float]]:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(log_dir / "tensorboard" / phase))
    events.Reload()
    return [(e.step, pytest.approx(e.value)) for e in events.Scalars(f"{phase}/loss")]


def _write(logger: TensorboardLogger, step: int, phase: str, value: float) -> None:
    logger.write(State(num_steps=step, phase=phase), LogBatch(scalars={f"{phase}/loss": value}))  # type: ignore[arg-type]


def test_tensorboard_purges_step_s_in_the_redone_phases_only(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    first = TensorboardLogger(TensorboardLoggerConfig(name="tensorboard"))
    first.initialize(tmp_path)
    for step, phase in WRITTEN:  # the killed process's events
        _write(first, step, phase, 1.0)
    first.close()

    resumed = TensorboardLogger(TensorboardLoggerConfig(name="tensorboard"))
    resumed.initialize(tmp_path)
    resumed.on_resume_from(State(num_steps=6), frozenset({"test"}))
    _write(resumed, 7, "train", 2.0)  # each phase's writer is made by its first write
    _write(resumed, 8, "valid", 2.0)  # a later validation (step 6's is covered: not redone)
    _write(resumed, 6, "test", 2.0)  # the test redone
    resumed.close()
    assert _points(tmp_path, "train") == [(5, 1.0), (6, 1.0), (7, 2.0)]  # after S: the new process's
    assert _points(tmp_path, "valid") == [(6, 1.0), (8, 2.0)]  # covered at S: kept
    assert _points(tmp_path, "test") == [(6, 2.0)]  # the killed process's test is gone


class OneArgumentLogger(BaseLogger[BaseLoggerConfig]):
    """A user's logger written before ``on_resume_from``: it overrides ``on_resume(state)`` only."""

    def __init__(self, config: BaseLoggerConfig) -> None:
        super().__init__(config)
        self.resumed_at: list[int] = []

    def on_resume(self, state: State) -> None:
        self.resumed_at.append(state.num_steps)

    def write(self, state: State, batch: LogBatch) -> None:
        del state, batch


def test_a_logger_overriding_only_on_resume_is_still_resumed() -> None:
    logger = OneArgumentLogger(BaseLoggerConfig(name="old"))
    logger.on_resume_from(State(num_steps=6), frozenset({"valid", "test"}))
    assert logger.resumed_at == [6]


@pytest.mark.parametrize("logger_class", [JsonlLogger, TensorboardLogger], ids=["jsonl", "tensorboard"])
def test_a_subclass_of_a_logger_with_history_extending_on_resume_is_still_resumed(
    tmp_path: Path, logger_class: type
) -> None:
    if logger_class is TensorboardLogger:
        pytest.importorskip("tensorboard")

    class Extended(logger_class):  # type: ignore[misc,valid-type]
        resumed_at: list[int] = []

        def on_resume(self, state: State) -> None:
            self.resumed_at.append(state.num_steps)
            super().on_resume(state)

    _write_metrics(tmp_path / "metrics.jsonl")
    config = JsonlLoggerConfig(name="jsonl") if logger_class is JsonlLogger else TensorboardLoggerConfig()
    logger = Extended(config)
    logger.initialize(tmp_path)
    logger.on_resume_from(State(num_steps=6), frozenset({"test"}))
    logger.close()
    assert Extended.resumed_at == [6]
    if logger_class is JsonlLogger:  # and the base class's work was done, with the redone phase
        kept = [
            (r["step"], r["phase"])
            for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
        ]
        assert kept == [(5, "train"), (6, "train"), (6, "valid")]
