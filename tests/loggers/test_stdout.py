"""Tests for :mod:`ml.loggers.stdout`: the printed line, the ``stdout.log`` copy, number format."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ml.core.compose import build_component
from ml.core.registry import lookup
from ml.core.state import State
from ml.errors import ConfigError
from ml.loggers.base import LogBatch, MultiLogger
from ml.loggers.stdout import StdoutLogger, StdoutLoggerConfig, format_duration, format_number


def _batch() -> LogBatch:
    return LogBatch(
        scalars={"train/loss": 0.412345678, "trainer/lr": 0.001, "train/samples": 3072.0},
        strings={"task/split": "a\nb"},
        histograms={"model/weights": torch.zeros(3)},
    )


def test_writes_line_to_stdout_and_log_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lg = StdoutLogger(StdoutLoggerConfig(name="stdout"))
    lg.initialize(tmp_path / "logs")
    state = State(num_steps=120, num_epochs=1, elapsed_time_s=3.21)
    lg.write(state, _batch())
    state.set_phase("valid")
    lg.write(state, LogBatch(scalars={"valid/loss": 0.5}))
    lg.close()

    expected = [
        "[train] step 120 epoch 1 | 3.2s | train/loss 0.4123 trainer/lr 0.001 train/samples 3072 "
        "task/split=a\\nb",
        "[valid] step 120 epoch 1 | 3.2s | valid/loss 0.5",
    ]
    assert capsys.readouterr().out.splitlines() == expected
    assert (tmp_path / "logs" / "stdout.log").read_text().splitlines() == expected


def test_log_file_is_line_buffered_and_appends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = StdoutLogger(StdoutLoggerConfig(name="stdout"))
    first.initialize(tmp_path)
    first.write(State(num_steps=1), LogBatch(scalars={"train/loss": 1.0}))
    first.close()
    second = StdoutLogger(StdoutLoggerConfig(name="stdout"))
    second.initialize(tmp_path)
    second.write(State(num_steps=2), LogBatch(scalars={"train/loss": 2.0}))
    # Not closed: the line must already be in the file.
    lines = (tmp_path / "stdout.log").read_text().splitlines()
    assert [line.split(" | ")[-1] for line in lines] == ["train/loss 1", "train/loss 2"]
    second.close()


def test_precision_and_no_file_without_initialize(capsys: pytest.CaptureFixture[str]) -> None:
    lg = StdoutLogger(StdoutLoggerConfig(name="stdout", precision=2))
    ml_logger = MultiLogger("train")
    ml_logger.log_scalar("loss", torch.tensor(0.123456))
    MultiLogger.write_all([ml_logger], [lg], State(num_steps=7))
    assert capsys.readouterr().out == "[train] step 7 epoch 0 | 0.0s | train/loss 0.12\n"
    lg.close()  # closing a logger that never opened a file is fine


@pytest.mark.parametrize("precision", [0, -3])
def test_a_precision_below_one_is_refused_when_the_logger_is_built(precision: int) -> None:
    node = OmegaConf.structured(StdoutLoggerConfig(name="stdout", precision=precision))
    with pytest.raises(
        ConfigError, match=rf"logger\[0\] \(stdout\): precision is .* got {precision}: e\.g\."
    ):
        build_component("logger[0]", "logger", node)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3.0, "3"),
        (-120000.0, "-120000"),
        (0.41234567, "0.4123"),
        (1.23456e-5, "1.235e-05"),
        (12345.67, "1.235e+04"),
        (1e20, "1e+20"),
        (math.nan, "nan"),
        (-math.inf, "-inf"),
    ],
)
def test_format_number(value: float, text: str) -> None:
    assert format_number(value) == text


def test_format_duration() -> None:
    assert [format_duration(s) for s in (3.21, 65.0, 7387.9)] == ["3.2s", "1m05s", "2h03m07s"]


def test_registered_as_stdout() -> None:
    assert lookup("logger", "stdout") == (StdoutLogger, StdoutLoggerConfig)
