"""Tests for :mod:`ml.loggers.jsonl`: one valid JSON object per write, NaN handling, flushing."""

import json
import math
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ml.core.registry import lookup
from ml.core.state import State
from ml.loggers.base import LogBatch
from ml.loggers.jsonl import JsonlLogger, JsonlLoggerConfig, read_metrics


def _logger(log_directory: Path) -> JsonlLogger:
    lg = JsonlLogger(JsonlLoggerConfig(name="jsonl"))
    lg.initialize(log_directory)
    return lg


def test_one_json_object_per_write(tmp_path: Path) -> None:
    lg = _logger(tmp_path / "logs")
    before = time.time()
    lg.write(
        State(num_steps=10, elapsed_time_s=1.5), LogBatch(scalars={"train/loss": 0.5, "trainer/lr": 1e-3})
    )
    state = State(num_steps=10, elapsed_time_s=2.0, phase="valid")
    lg.write(state, LogBatch(scalars={"valid/loss": 0.75}, strings={"valid/note": 'say "hi"\n'}))
    lg.close()

    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"step", "phase", "elapsed_s", "time", "metrics"}  # no empty "strings"
    assert first["step"] == 10
    assert first["phase"] == "train"
    assert first["elapsed_s"] == 1.5
    assert before <= first["time"] <= time.time()
    assert first["metrics"] == {"train/loss": 0.5, "trainer/lr": 1e-3}
    assert second["phase"] == "valid"
    assert second["metrics"] == {"valid/loss": 0.75}
    assert second["strings"] == {"valid/note": 'say "hi"\n'}


def test_non_finite_values_are_strings(tmp_path: Path) -> None:
    lg = _logger(tmp_path)
    scalars = {"a": math.nan, "b": math.inf, "c": -math.inf, "d": 2.0}
    lg.write(State(num_steps=3), LogBatch(scalars=scalars))
    lg.close()

    line = (tmp_path / "metrics.jsonl").read_text()
    # Strict JSON: Python's parser would otherwise accept the non-standard NaN / Infinity tokens.
    record = json.loads(line, parse_constant=lambda token: pytest.fail(f"non-standard JSON {token}"))
    assert record["metrics"] == {"a": "nan", "b": "inf", "c": "-inf", "d": 2.0}
    (decoded,) = read_metrics(tmp_path)
    assert math.isnan(decoded["metrics"]["a"])
    assert decoded["metrics"]["b"] == math.inf
    assert decoded["metrics"]["c"] == -math.inf
    assert decoded["metrics"]["d"] == 2.0


def test_lines_are_flushed_without_close(tmp_path: Path) -> None:
    lg = _logger(tmp_path)
    for step in range(3):
        lg.write(State(num_steps=step), LogBatch(scalars={"train/loss": float(step)}))
    # Read through another handle while the logger still holds its file open.
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    lg.close()


def test_resume_appends_and_log_config_writes_nothing(tmp_path: Path) -> None:
    lg = _logger(tmp_path)
    lg.log_config(OmegaConf.create({"trainer": {"name": "sl"}}))
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    lg.write(State(num_steps=1), LogBatch(scalars={"x": 1.0}))
    lg.close()
    lg = _logger(tmp_path)
    lg.write(State(num_steps=2), LogBatch(scalars={"x": 2.0}))
    lg.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_write_before_initialize_raises() -> None:
    lg = JsonlLogger(JsonlLoggerConfig(name="jsonl"))
    with pytest.raises(RuntimeError, match="initialize"):
        lg.write(State(), LogBatch(scalars={"x": 1.0}))


def test_defaults_and_registration() -> None:
    config = JsonlLoggerConfig(name="jsonl")
    assert config.write_every_n_seconds == 1.0
    assert config.write_every_n_steps is None
    assert lookup("logger", "jsonl") == (JsonlLogger, JsonlLoggerConfig)
