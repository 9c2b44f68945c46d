"""Defines :class:`BaseLogger` and :class:`MultiLogger`.

Components log into a :class:`MultiLogger` (the trainer's, the task's, the model's). Values may be
numbers, tensors or zero-argument callables; nothing is evaluated, and no tensor is moved to the
CPU, until at least one sub-logger actually writes. That keeps logging from forcing a device sync
on every step. The trainer then fans the collected values out to its sub-loggers (stdout, JSON
lines, TensorBoard, MLflow, W&B, ...), each of which decides with :meth:`BaseLogger.should_write`
whether to write now. Only the master process writes.

Images are lazy the same way: :meth:`MultiLogger.log_image` keeps the tensor (or callable) as
given, and :meth:`MultiLogger.log_images` keeps the images and lays them out as a grid
(:func:`image_grid`) only when a logger writes. A written image is a ``uint8`` tensor of shape
``(C, H, W)`` on the CPU, C being 1 (grey) or 3 (RGB), whatever it was logged as.

A logger that keeps an id across sessions (the MLflow or W&B run a resumed run continues) returns
it from :meth:`BaseLogger.state_dict`; the trainer saves every logger's under the checkpoint's
``loggers`` key (:func:`logger_states`) and hands it back on resume (:func:`load_logger_states`).
"""

import contextlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from omegaconf import DictConfig, OmegaConf

from ml.core.config import BaseConfig, BaseObject, conf_field
from ml.core.state import State
from ml.utils.distributed import is_master

Number = int | float
ScalarValue = Number | torch.Tensor | Callable[[], Number | torch.Tensor]
StringValue = str | Callable[[], str]
HistogramValue = torch.Tensor | Callable[[], torch.Tensor]
GRID_PADDING_VALUE = 128  # the grey between the images of a grid
ImageValue = torch.Tensor | Callable[[], torch.Tensor]
ImagesValue = torch.Tensor | Sequence[torch.Tensor] | Callable[[], torch.Tensor | Sequence[torch.Tensor]]


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
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # uint8 (C, H, W) on the CPU

    def __bool__(self) -> bool:
        return bool(self.scalars or self.strings or self.histograms or self.images)


class BaseLogger(BaseObject[LoggerConfigT], ABC):
    """A destination for metrics.

    Subclasses implement :meth:`write`; they may override :meth:`initialize` (open files under the
    log folder), :meth:`on_resume` (drop history the checkpoint does not cover), :meth:`log_config`,
    :meth:`state_dict` / :meth:`load_state_dict` (what a resumed run needs, kept in checkpoints),
    :meth:`on_session_end` and :meth:`close`.
    """

    def __init__(self, config: LoggerConfigT) -> None:
        super().__init__(config)
        self.log_directory: Path | None = None
        self._last_write_time: float | None = None
        self._written_through = 0  # the training step written last (see should_write)
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

        The trainer calls :meth:`on_resume_from`, which also names the evaluations of step S to be
        done again; its default calls this, so a logger written for this hook keeps working.
        """
        del state

    def on_resume_from(self, state: State, redone_phases: frozenset[str]) -> None:
        """What the trainer calls on resume: :meth:`on_resume`, plus the phases whose records *at*
        step S the checkpoint does not cover.

        A checkpoint is saved before its step's last evaluations (the final validation and test)
        and again after each, saying it was done; a ``kill -9`` in between leaves records of step S
        that the continued run logs again. ``redone_phases`` names them (``valid``: S was not
        validated; ``test``: the run did not finish; every phase for a run starting over). A logger
        that keeps history drops its records after S and those of S in these phases, so that each
        evaluation is logged once. The default calls :meth:`on_resume` (it keeps the records of S).
        """
        del redone_phases
        self.on_resume(state)

    def state_dict(self) -> dict[str, Any]:
        """What this logger needs to continue in a later session (an external run's id), kept in
        every checkpoint; plain data only (it is loaded with ``weights_only=True``). Default: nothing."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Takes back what :meth:`state_dict` returned, from the checkpoint a run resumes from.

        Called on resume before :meth:`on_resume`; a logger added since the checkpoint gets nothing.
        """
        del state

    def on_session_end(self, outcome: str) -> None:
        """Called on the master once the session is over, just before :meth:`close`.

        ``outcome`` is how it ended, in ``status.json``'s words (:mod:`ml.run.status`):
        ``finished``, ``interrupted`` (a stop signal: the run will be continued) or ``failed``.
        """
        del outcome

    def should_write(self, state: State) -> bool:
        """Whether to write now: always outside training, else on the step or time interval.

        The step interval's steps are the run's 1, 1 + n, 1 + 2n, ..., whatever else was written (a
        forced write, a new session): a resumed run writes the steps an uninterrupted one does. A
        distributed job asks only every few steps: then one of them since the last write is due.
        The time interval counts from this session's last training write.
        """
        if not state.training:
            return True
        every = self._every_n_steps
        if every is not None:  # the interval's last step so far: one since the last write is due
            return state.num_steps - (state.num_steps - 1) % every > self._written_through
        if self._every_n_seconds is None or self._last_write_time is None:
            return True
        return time.monotonic() - self._last_write_time >= self._every_n_seconds

    def mark_written(self, state: State) -> None:
        """Records a write; only training writes count for the training interval."""
        # Validation and test always write; letting them reset the clock would shift the
        # training writes (every 100 s would become 100 s after the last validation).
        if state.training:
            self._last_write_time = time.monotonic()
            self._written_through = state.num_steps

    def continue_from(self, state: State) -> None:
        """Called by the trainer as a session starts at ``state`` (step 0, or the checkpoint's): the
        step interval's steps up to there were the earlier sessions' to write."""
        self._written_through = state.num_steps

    @abstractmethod
    def write(self, state: State, batch: LogBatch) -> None:
        """Writes one batch of materialised values for ``state``."""

    def close(self) -> None:
        """Flushes and releases resources; called once at the end of training."""


def scalar_to_float(value: ScalarValue) -> float:
    """A logged scalar (number, one-element tensor, or a callable returning one) as a float."""
    return _to_float(value)


def one_element(value: torch.Tensor) -> torch.Tensor:
    """``value``, checked to be a scalar's tensor: one element (its shape, not its value: no host sync).

    Raises:
        ValueError: It has more or fewer elements.
    """
    if value.numel() != 1:
        raise ValueError(f"a logged scalar must have one element, got shape {tuple(value.shape)}")
    return value


def weighted_mean(parts: list[tuple[float, ScalarValue]]) -> ScalarValue:
    """The weighted mean of values logged for parts of one step (each micro-batch's, with its share of
    the samples; the trainers log it back as the step's value).

    Tensors stay on their device (no host sync); other values are combined when a logger reads them.
    """
    total = sum(weight for weight, _ in parts)
    if all(isinstance(value, torch.Tensor) for _, value in parts):
        terms = [
            one_element(cast(torch.Tensor, value)).detach().float().sum() * (weight / total)
            for weight, value in parts
        ]
        return torch.stack(terms).sum()
    return lambda: sum(weight * scalar_to_float(value) for weight, value in parts) / total


T = TypeVar("T")


def _as_logged(value: T) -> T:
    """A tensor's copy as it is now, on its device (no host read); anything else as it is.

    Values are read only when a logger writes, after the step's optimizer update: a parameter, a
    buffer or a view of one, logged as it is, would show its value after that update (and a
    tensor's later in-place changes). The copy is made whether or not a logger writes the step: a
    big tensor (a histogram of a large weight) logged at every step costs a copy each time; a
    callable returning it is evaluated only at a write (and shows the value then).
    """
    if isinstance(value, torch.Tensor):
        return cast(T, value.detach().clone())
    return value


def _to_float(value: ScalarValue) -> float:
    if callable(value):
        value = value()
    if isinstance(value, torch.Tensor):
        return float(one_element(value).detach().float().cpu().item())
    return float(value)


def _to_tensor(value: HistogramValue) -> torch.Tensor:
    if callable(value):
        value = value()
    return value.detach().float().cpu().flatten()


def to_image(value: ImageValue) -> torch.Tensor:
    """A logged image as written: ``uint8``, ``(C, H, W)`` with C 1 or 3, on the CPU.

    Accepts ``(H, W)`` (grey), ``(C, H, W)`` with C 1, 3 or 4 (alpha dropped) or a callable
    returning one; floating point values are taken as 0..1 (clamped), integers as 0..255.
    """
    if callable(value):
        value = value()
    image = value.detach()
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4) or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(
            f"a logged image must be (H, W) or (C, H, W) with C 1, 3 or 4, got {tuple(value.shape)}"
        )
    image = image[:3].cpu()
    if image.dtype == torch.uint8:
        return image.contiguous()
    if image.dtype == torch.bool:
        return image.to(torch.uint8) * 255
    if image.is_floating_point():
        return (image.float().nan_to_num(0.0).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return image.clamp(0, 255).to(torch.uint8)


def image_grid(
    images: torch.Tensor | Sequence[torch.Tensor], *, columns: int | None = None, padding: int = 2
) -> torch.Tensor:
    """Lays images out as one image, row by row, ``padding`` grey pixels around each (grey, so that
    the edges of images with black backgrounds show).

    Args:
        images: ``(N, C, H, W)`` or ``(N, H, W)``, or a sequence of images of one size (any form
            :func:`to_image` takes).
        columns: Images per row (default: the smallest square that holds them all).
        padding: Pixels between images and around the edge.

    Returns:
        The grid, ``uint8`` ``(C, H', W')``; for no images, one grey pixel.
    """
    tiles = [to_image(image) for image in images]
    if not tiles:
        return torch.full((1, 1, 1), GRID_PADDING_VALUE, dtype=torch.uint8)
    if len({tuple(tile.shape[1:]) for tile in tiles}) > 1:
        raise ValueError(
            f"images of a grid must have one size, got {sorted({tuple(t.shape) for t in tiles})}"
        )
    channels = max(tile.shape[0] for tile in tiles)  # grey tiles beside colour ones become grey RGB
    columns = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    height, width = tiles[0].shape[1:]
    size = (channels, padding + rows * (height + padding), padding + columns * (width + padding))
    grid = torch.full(size, GRID_PADDING_VALUE, dtype=torch.uint8)
    for index, tile in enumerate(tiles):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[:, top : top + height, left : left + width] = tile.expand(channels, -1, -1)
    return grid


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
        self._images: dict[str, ImageValue] = {}

    def _name(self, key: str, namespace: str | None) -> str:
        return f"{namespace or self.default_namespace}/{key}"

    @contextlib.contextmanager
    def discarding(self) -> Iterator[None]:
        """Drops everything logged inside the block; what was logged before it stays."""
        kept: list[tuple[dict[str, Any], dict[str, Any]]] = [
            (values, dict(values))
            for values in (self._scalars, self._strings, self._histograms, self._images)
        ]
        try:
            yield
        finally:
            for values, before in kept:
                values.clear()
                values.update(before)

    def log_scalar(self, key: str, value: ScalarValue, *, namespace: str | None = None) -> None:
        """Logs a number, a one-element tensor, or a callable returning one (evaluated on write).

        A tensor is copied as it is now (see :func:`_as_logged`); a callable is the way to log what
        a value will be when a logger writes.
        """
        self._scalars[f"{namespace or self.default_namespace}/{key}"] = _as_logged(value)  # _name inlined

    def pop_scalars(self) -> dict[str, ScalarValue]:
        """The scalars logged since the last write, taken out of it (e.g. to combine them first)."""
        scalars, self._scalars = self._scalars, {}
        return scalars

    def log_string(self, key: str, value: StringValue, *, namespace: str | None = None) -> None:
        self._strings[self._name(key, namespace)] = value

    def log_histogram(self, key: str, value: HistogramValue, *, namespace: str | None = None) -> None:
        """Logs a tensor's values (copied now, see :func:`_as_logged`), or a callable returning one
        (evaluated only when a logger writes: the cheap way to log a big tensor at every step)."""
        self._histograms[self._name(key, namespace)] = _as_logged(value)

    def log_image(self, key: str, value: ImageValue, *, namespace: str | None = None) -> None:
        """Logs an image: ``(H, W)`` or ``(C, H, W)`` (C 1, 3 or 4), floats in 0..1 or ``uint8``, or
        a callable returning one. Nothing is read (nor moved off the device) until a logger writes."""
        self._images[self._name(key, namespace)] = _as_logged(value)

    def log_images(
        self, key: str, values: ImagesValue, *, namespace: str | None = None, columns: int | None = None
    ) -> None:
        """Logs several images of one size as one grid image (:func:`image_grid`), built on write.

        Args:
            key: The name of the grid.
            values: ``(N, C, H, W)`` or ``(N, H, W)``, a sequence of images, or a callable returning
                either (evaluated only when a logger writes).
            namespace: As for :meth:`log_scalar`.
            columns: Images per row (default: the smallest square that holds them).
        """

        values = [_as_logged(v) for v in values] if isinstance(values, (list, tuple)) else _as_logged(values)

        def grid() -> torch.Tensor:
            return image_grid(values() if callable(values) else values, columns=columns)

        self._images[self._name(key, namespace)] = grid

    def materialize(self) -> LogBatch:
        """Evaluates every pending value and clears them."""
        batch = LogBatch(
            scalars={k: _to_float(v) for k, v in self._scalars.items()},
            strings={k: v() if callable(v) else str(v) for k, v in self._strings.items()},
            histograms={k: _to_tensor(v) for k, v in self._histograms.items()},
            images={k: to_image(v) for k, v in self._images.items()},
        )
        self.clear()
        return batch

    def clear(self) -> None:
        self._scalars.clear()
        self._strings.clear()
        self._histograms.clear()
        self._images.clear()

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
            batch.images.update(part.images)
        if reduce is not None:
            batch.scalars = reduce(batch.scalars)
        if not batch or not writers:
            return
        for lg in writers:
            lg.write(state, batch)
            lg.mark_written(state)


SECRET_REFERENCE = "${ml.secret:"


def config_to_log(config: DictConfig, log_directory: Path | None) -> Any:
    """The run's config for a logger to record: resolved, as plain data, except that each value
    ``config.yaml`` keeps as a secret's reference (``${ml.secret:NAME}``) stays that reference.

    The trainer hands loggers the config resolved, secrets' values included; those must reach no
    file and no server, so they are looked up in the run folder's ``config.yaml`` (written before
    the loggers get the config), whose secrets stay as written.
    """
    import yaml

    from ml.run.layout import RunDir

    resolved = OmegaConf.to_container(config, resolve=True)
    if log_directory is None:
        return resolved
    try:  # the log folder is a child of the run folder (RunDir.logs)
        saved = yaml.safe_load(RunDir(log_directory.parent).config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return resolved
    return _keep_secret_references(resolved, saved)


def _keep_secret_references(resolved: Any, saved: Any) -> Any:
    if isinstance(resolved, dict) and isinstance(saved, dict):
        return {k: _keep_secret_references(v, saved[k]) if k in saved else v for k, v in resolved.items()}
    if isinstance(resolved, list) and isinstance(saved, list) and len(resolved) == len(saved):
        return [_keep_secret_references(v, s) for v, s in zip(resolved, saved, strict=True)]
    if isinstance(saved, str) and SECRET_REFERENCE in saved:
        return saved
    return resolved


def _logger_keys(loggers: Sequence[BaseLogger]) -> list[str]:
    """A key per logger that survives changes to the logger list between sessions: its config's
    ``name`` (``mlflow``), numbered from the second of a kind on (``mlflow#2``)."""
    seen: dict[str, int] = {}
    keys = []
    for lg in loggers:
        name = str(getattr(lg.config, "name", type(lg).__name__))
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return keys


def logger_states(loggers: Sequence[BaseLogger]) -> dict[str, dict[str, Any]]:
    """Every logger's :meth:`BaseLogger.state_dict` that is not empty, by logger (the checkpoint's
    ``loggers`` entry)."""
    states = {key: lg.state_dict() for key, lg in zip(_logger_keys(loggers), loggers, strict=True)}
    return {key: state for key, state in states.items() if state}


def load_logger_states(loggers: Sequence[BaseLogger], states: Any) -> None:
    """Hands each logger its part of a checkpoint's ``loggers`` entry (see :func:`logger_states`);
    a checkpoint without one (older, or no logger had state) changes nothing."""
    if not isinstance(states, Mapping):
        return
    for key, lg in zip(_logger_keys(loggers), loggers, strict=True):
        state = states.get(key)
        if isinstance(state, Mapping):
            lg.load_state_dict(state)
