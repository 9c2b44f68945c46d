"""Defines :class:`BaseLogger` and :class:`MultiLogger`.

Components log into a :class:`MultiLogger` (the trainer's, the task's, the model's). Values may be
numbers, tensors or zero-argument callables; nothing is evaluated, and no tensor is moved to the
CPU, until at least one sub-logger actually writes. That keeps logging from forcing a device sync
on every step. The trainer then fans the collected values out to its sub-loggers (stdout, JSON
lines, TensorBoard, ...), each of which decides with :meth:`BaseLogger.should_write` whether to
write now. Only the master process writes.
"""

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from omegaconf import DictConfig

from ml.core.config import BaseConfig, BaseObject, conf_field
from ml.core.state import State
from ml.utils.distributed import is_master

Number = int | float
ScalarValue = Number | torch.Tensor | Callable[[], Number | torch.Tensor]
StringValue = str | Callable[[], str]
HistogramValue = torch.Tensor | Callable[[], torch.Tensor]


@dataclass
class BaseLoggerConfig(BaseConfig):
    write_every_n_seconds: float | None = conf_field(
        10.0, help="Write training metrics at most this often (validation and test always write)"
    )
    write_every_n_steps: int | None = conf_field(
        None, help="Write training metrics every N steps (when set, instead of the time interval)"
    )


LoggerConfigT = TypeVar("LoggerConfigT", bound=BaseLoggerConfig)


@dataclass
class LogBatch:
    """The materialised values one write receives: full names (``namespace/key``) to values."""

    scalars: dict[str, float] = field(default_factory=dict)
    strings: dict[str, str] = field(default_factory=dict)
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.scalars or self.strings or self.histograms)


class BaseLogger(BaseObject[LoggerConfigT], ABC):
    """A destination for metrics.

    Subclasses implement :meth:`write`; they may override :meth:`initialize` (open files under the
    log folder), :meth:`on_resume` (drop history the checkpoint does not cover), :meth:`log_config`
    and :meth:`close`.
    """

    def __init__(self, config: LoggerConfigT) -> None:
        super().__init__(config)
        self.log_directory: Path | None = None
        self._last_write_time: float | None = None
        self._last_write_step: int | None = None
        # Read once: should_write runs every training step, and reading a config node costs
        # microseconds.
        self._every_n_steps: int | None = config.write_every_n_steps
        self._every_n_seconds: float | None = config.write_every_n_seconds

    def initialize(self, log_directory: Path) -> None:
        """Called once by the trainer with the run's log folder, before anything is written."""
        self.log_directory = Path(log_directory)

    def log_config(self, config: DictConfig) -> None:
        """Records the run's resolved config; loggers that have no use for it keep this default."""
        del config

    def on_resume(self, state: State) -> None:
        """Called on the master once the run's starting state is known, before anything is written.

        ``state`` is the one restored from the checkpoint at step S, or a fresh state (step 0) when
        the run has no checkpoint yet (a first attempt killed before its first save starts over).
        Steps after S were done by an earlier process whose work the checkpoint does not hold; they
        are about to be done again, so a logger that keeps history on disk drops what it holds for
        them (every metric then has one value per step). Loggers without history keep this no-op.
        """
        del state

    def should_write(self, state: State) -> bool:
        """Whether to write now: always outside training, else on the step or time interval."""
        if not state.training or self._last_write_time is None:
            return True
        if self._every_n_steps is not None:
            return state.num_steps - (self._last_write_step or 0) >= self._every_n_steps
        if self._every_n_seconds is None:
            return True
        return time.monotonic() - self._last_write_time >= self._every_n_seconds

    def mark_written(self, state: State) -> None:
        """Records a write; only training writes restart the training interval."""
        # Validation and test always write; letting them reset the clock would shift the
        # training writes (every 100 steps would become 100 steps after the last validation).
        if state.training:
            self._last_write_time = time.monotonic()
            self._last_write_step = state.num_steps

    @abstractmethod
    def write(self, state: State, batch: LogBatch) -> None:
        """Writes one batch of materialised values for ``state``."""

    def close(self) -> None:
        """Flushes and releases resources; called once at the end of training."""


def scalar_to_float(value: ScalarValue) -> float:
    """A logged scalar (number, one-element tensor, or a callable returning one) as a float."""
    return _to_float(value)


def _to_float(value: ScalarValue) -> float:
    if callable(value):
        value = value()
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a logged scalar must have one element, got shape {tuple(value.shape)}")
        return float(value.detach().float().cpu().item())
    return float(value)


def _to_tensor(value: HistogramValue) -> torch.Tensor:
    if callable(value):
        value = value()
    return value.detach().float().cpu().flatten()


class MultiLogger:
    """Collects lazily evaluated values under a namespace and fans them out to sub-loggers.

    Args:
        default_namespace: The namespace used when a call names none (``train/loss`` is the key
            ``loss`` in namespace ``train``).
    """

    def __init__(self, default_namespace: str = "value") -> None:
        self.default_namespace = default_namespace
        self._scalars: dict[str, ScalarValue] = {}
        self._strings: dict[str, StringValue] = {}
        self._histograms: dict[str, HistogramValue] = {}

    def _name(self, key: str, namespace: str | None) -> str:
        return f"{namespace or self.default_namespace}/{key}"

    def log_scalar(self, key: str, value: ScalarValue, *, namespace: str | None = None) -> None:
        """Logs a number, a one-element tensor, or a callable returning one (evaluated on write)."""
        self._scalars[f"{namespace or self.default_namespace}/{key}"] = value  # as _name, inlined: hot

    def pop_scalars(self) -> dict[str, ScalarValue]:
        """The scalars logged since the last write, taken out of it (e.g. to combine them first)."""
        scalars, self._scalars = self._scalars, {}
        return scalars

    def log_string(self, key: str, value: StringValue, *, namespace: str | None = None) -> None:
        self._strings[self._name(key, namespace)] = value

    def log_histogram(self, key: str, value: HistogramValue, *, namespace: str | None = None) -> None:
        self._histograms[self._name(key, namespace)] = value

    def materialize(self) -> LogBatch:
        """Evaluates every pending value and clears them."""
        batch = LogBatch(
            scalars={k: _to_float(v) for k, v in self._scalars.items()},
            strings={k: v() if callable(v) else str(v) for k, v in self._strings.items()},
            histograms={k: _to_tensor(v) for k, v in self._histograms.items()},
        )
        self.clear()
        return batch

    def clear(self) -> None:
        self._scalars.clear()
        self._strings.clear()
        self._histograms.clear()

    @staticmethod
    def write_all(
        sources: Sequence["MultiLogger"],
        loggers: Sequence[BaseLogger],
        state: State,
        *,
        reduce: Callable[[dict[str, float]], dict[str, float]] | None = None,
        force: bool = False,
    ) -> None:
        """Writes the values pending in ``sources`` to each logger that wants to write now.

        Values are evaluated once, and only if some logger writes; otherwise they are dropped (a
        newer value of the same key will come with a later step). Non-master ranks only clear.

        Args:
            sources: Where the values were logged.
            loggers: The destinations (the master's; other ranks have none that write).
            state: The training state the values belong to.
            reduce: Combines the scalars over ranks (a collective: every rank calls it, so every
                rank materialises its values whenever it is given).
            force: Write to every logger, due or not (the last step of a run, so that its final
                values are on record whatever the loggers' intervals).
        """
        writers = list(loggers) if force else [lg for lg in loggers if lg.should_write(state)]
        if writers and not is_master():  # asked only when needed: it reads the environment
            writers = []
        if not writers and reduce is None:
            for source in sources:
                source.clear()
            return
        batch = LogBatch()
        for source in sources:
            part = source.materialize()
            batch.scalars.update(part.scalars)
            batch.strings.update(part.strings)
            batch.histograms.update(part.histograms)
        if reduce is not None:
            batch.scalars = reduce(batch.scalars)
        if not batch or not writers:
            return
        for lg in writers:
            lg.write(state, batch)
            lg.mark_written(state)
