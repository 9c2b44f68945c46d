"""Tests for :mod:`ml.loggers.base`: laziness, namespacing, write intervals and rank filtering."""

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ml.core.state import State
from ml.loggers import base
from ml.loggers.base import BaseLogger, BaseLoggerConfig, LogBatch, MultiLogger


class RecordingLogger(BaseLogger[BaseLoggerConfig]):
    """A logger that keeps every write in memory."""

    def __init__(self, config: BaseLoggerConfig) -> None:
        super().__init__(config)
        self.writes: list[tuple[int, str, LogBatch]] = []

    def write(self, state: State, batch: LogBatch) -> None:
        self.writes.append((state.num_steps, state.phase, batch))


def _logger(seconds: float | None = None, steps: int | None = None) -> RecordingLogger:
    config = BaseLoggerConfig(name="recording", write_every_n_seconds=seconds, write_every_n_steps=steps)
    return RecordingLogger(config)


class _Counter:
    def __init__(self, value: float) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A controllable ``time.monotonic`` for the base module."""
    now = [1000.0]
    monkeypatch.setattr(base, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


@pytest.fixture(autouse=True)
def _master(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)


def test_callable_not_evaluated_when_no_logger_writes(clock: list[float]) -> None:
    lg = _logger(seconds=10.0)
    state = State(num_steps=1)
    ml_logger = MultiLogger("train")
    ml_logger.log_scalar("loss", 1.0)
    MultiLogger.write_all([ml_logger], [lg], state)  # first training write always happens
    assert len(lg.writes) == 1

    counter = _Counter(2.0)
    clock[0] += 1.0
    state.num_steps = 2
    ml_logger.log_scalar("loss", counter)
    MultiLogger.write_all([ml_logger], [lg], state)
    assert counter.calls == 0
    assert len(lg.writes) == 1

    # The dropped value does not linger into the next write.
    clock[0] += 20.0
    state.num_steps = 3
    ml_logger.log_scalar("acc", 0.5)
    MultiLogger.write_all([ml_logger], [lg], state)
    assert lg.writes[-1][2].scalars == {"train/acc": 0.5}


def test_callable_evaluated_once_for_two_writers() -> None:
    first, second = _logger(), _logger()
    counter = _Counter(0.25)
    ml_logger = MultiLogger("train")
    ml_logger.log_scalar("loss", counter)
    MultiLogger.write_all([ml_logger], [first, second], State(num_steps=5))
    assert counter.calls == 1
    for lg in (first, second):
        assert lg.writes == [(5, "train", LogBatch(scalars={"train/loss": 0.25}))]


def test_grad_tensor_logged_as_detached_float() -> None:
    weight = torch.tensor(3.0, requires_grad=True)
    loss = weight * 2
    ml_logger = MultiLogger("train")
    ml_logger.log_scalar("loss", loss)
    ml_logger.log_scalar("lazy", lambda: weight * 0.5)
    batch = ml_logger.materialize()
    assert batch.scalars == {"train/loss": 6.0, "train/lazy": 1.5}
    assert all(type(v) is float for v in batch.scalars.values())


def test_a_tensor_is_logged_as_it_was_not_as_it_is_when_a_logger_writes() -> None:
    # A parameter (or a buffer, or a view of either) changes in place at the optimizer's update,
    # before the step's logs are written.
    weight = torch.nn.Parameter(torch.tensor([3.0, 1.0]))
    ml_logger = MultiLogger("train")
    ml_logger.log_scalar("weight0", weight[0])
    ml_logger.log_scalar("weight1", weight[1:])
    ml_logger.log_histogram("weights", weight)
    ml_logger.log_image("image", weight.view(1, 1, 2))
    ml_logger.log_images("images", [weight.view(1, 2)])
    with torch.no_grad():
        weight.mul_(10)
    batch = ml_logger.materialize()
    assert batch.scalars == {"train/weight0": 3.0, "train/weight1": 1.0}
    assert batch.histograms["train/weights"].tolist() == [3.0, 1.0]
    assert batch.images["train/image"].flatten().tolist() == [255, 255]  # 3.0 and 1.0, clipped to 1
    with torch.no_grad():
        weight.copy_(torch.tensor([0.5, 0.0]))
    ml_logger.log_image("image", weight.view(1, 1, 2))
    ml_logger.log_images("images", weight.view(1, 1, 1, 2))
    weight.data.fill_(1.0)
    batch = ml_logger.materialize()
    assert batch.images["train/image"].flatten().tolist() == [128, 0]
    expected = base.to_image(base.image_grid(torch.tensor([[[[0.5, 0.0]]]])))
    assert torch.equal(batch.images["train/images"], expected)


def test_multi_element_tensor_raises() -> None:
    ml_logger = MultiLogger("train")
    ml_logger.log_scalar("loss", torch.ones(3))
    with pytest.raises(ValueError, match="one element"):
        ml_logger.materialize()


def test_namespacing() -> None:
    ml_logger = MultiLogger(default_namespace="task")
    ml_logger.log_scalar("loss", 1.0, namespace="train")
    ml_logger.log_scalar("lr", 0.1)
    ml_logger.log_string("note", "hi", namespace="info")
    ml_logger.log_histogram("weights", torch.arange(4).reshape(2, 2))
    batch = ml_logger.materialize()
    assert batch.scalars == {"train/loss": 1.0, "task/lr": 0.1}
    assert batch.strings == {"info/note": "hi"}
    assert list(batch.histograms) == ["task/weights"]
    assert batch.histograms["task/weights"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert not ml_logger.materialize()  # materialize clears


def _steps_written(lg: Any, state: State, steps: range) -> list[int]:
    """Asks ``lg`` at each of ``steps``; the steps it wrote (marked written as a trainer does)."""
    written = []
    for step in steps:
        state.num_steps = step
        if lg.should_write(state):
            lg.mark_written(state)
            written.append(step)
    return written


def test_should_write_step_interval(clock: list[float]) -> None:
    lg = _logger(steps=10)
    state = State()
    written = _steps_written(lg, state, range(1, 32))
    assert written == [1, 11, 21, 31]


def test_the_step_interval_is_counted_from_the_first_step_whatever_else_was_written(
    clock: list[float],
) -> None:
    """A forced write (the step a stop signal ended a session at) and a new session (a logger made
    anew, continuing at step 7) shifted the interval: a resumed run's log differed from the
    uninterrupted one's ([1, 5, 6, 7, 11, 15] instead of [1, 5, 6, 9, 13])."""
    lg = _logger(steps=4)
    state = State()
    written = _steps_written(lg, state, range(1, 7))
    lg.mark_written(state)  # step 6: forced (the session's last step)
    written.append(6)
    resumed = _logger(steps=4)  # the next session's, continuing from the checkpoint at step 6
    resumed.continue_from(state)
    written += _steps_written(resumed, state, range(7, 17))
    assert written == [1, 5, 6, 9, 13]


def test_asked_only_every_few_steps_the_step_interval_writes_when_one_of_its_steps_passed(
    clock: list[float],
) -> None:
    """A distributed job asks at the steps its ranks agree on (every 10): each such step past one of
    the interval's (1, 5, 9, ...) writes."""
    lg = _logger(steps=4)
    state = State()
    written = _steps_written(lg, state, range(10, 41, 10))
    state.num_steps = 41
    assert lg.should_write(state)  # step 41 is one of the interval's
    assert written == [10, 20, 30, 40]


def test_should_write_time_interval(clock: list[float]) -> None:
    lg = _logger(seconds=5.0)
    state = State()
    assert lg.should_write(state)
    lg.mark_written(state)
    clock[0] += 4.9
    assert not lg.should_write(state)
    clock[0] += 0.1
    assert lg.should_write(state)


def test_validation_always_writes_and_keeps_training_interval(clock: list[float]) -> None:
    lg = _logger(steps=10)
    state = State(num_steps=1)
    lg.mark_written(state)
    state.num_steps = 5
    assert not lg.should_write(state)
    state.set_phase("valid")
    assert lg.should_write(state)
    lg.mark_written(state)
    state.set_phase("train")
    state.num_steps = 11
    assert lg.should_write(state)  # the validation write at step 5 did not restart the interval


def test_non_master_rank_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    lg = _logger()
    counter = _Counter(1.0)
    ml_logger = MultiLogger("train")
    ml_logger.log_scalar("loss", counter)
    MultiLogger.write_all([ml_logger], [lg], State(num_steps=1))
    assert lg.writes == []
    assert counter.calls == 0
    assert not ml_logger.materialize()  # pending values were cleared


def test_base_logger_is_abstract_and_initialize_sets_directory(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        BaseLogger(BaseLoggerConfig(name="x"))  # type: ignore[abstract]
    lg = _logger()
    lg.initialize(tmp_path)
    assert lg.log_directory == tmp_path


def test_what_is_logged_while_discarding_is_dropped_and_what_was_logged_before_stays() -> None:
    """FSDP's stand-in evaluation passes log like real ones; none of it may reach a record."""
    multi = MultiLogger(default_namespace="valid")
    image = torch.zeros(1, 2, 2)
    multi.log_scalar("loss", 1.0)
    multi.log_string("note", "real")
    multi.log_image("worst", image)
    with multi.discarding():
        multi.log_scalar("loss", 99.0)  # the same key again
        multi.log_scalar("other", 5.0)
        multi.log_string("note", "stand-in")
        multi.log_image("worst", torch.ones(1, 2, 2))
        multi.log_histogram("weights", torch.ones(3))
    assert multi.pop_scalars() == {"valid/loss": 1.0}
    assert multi._strings == {"valid/note": "real"}
    assert list(multi._images) == ["valid/worst"] and torch.equal(multi._images["valid/worst"], image)
    assert multi._histograms == {}
    with pytest.raises(RuntimeError), multi.discarding():
        multi.log_scalar("loss", 2.0)
        raise RuntimeError("a pass failed")
    assert multi.pop_scalars() == {}
