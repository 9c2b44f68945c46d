"""Progress bars on a terminal: the training bar, validation and test bars, and output above them.

The ``sl`` and ``rl`` training loops show a :class:`TrainingBar` on stderr::

    train:  45%|████▌     | 900/2000 [00:12<00:15, 72.10step/s, epoch=3, loss=0.4123]

(``rl``: ``it/s`` and the mean return of the episodes that ended). :func:`progress` draws a bar for
each validation or test pass below it, removed when the pass ends. Bars are drawn only when stderr
is a terminal, by rank 0 of a job, and with ``trainer.progress_bar`` true; otherwise a loop pays one
integer comparison per step and nothing else.

No host sync per step: the loop compares ``state.num_steps`` with :attr:`TrainingBar.due` and calls
:meth:`TrainingBar.update` only when it is reached, which the bar sets from the step rate to about
:data:`REDRAW_INTERVAL_S` seconds ahead; the values it is given (losses on a device) are read
(``.item()``) only when it redraws.

While a bar is shown, output goes above it rather than through it: records of the :mod:`logging`
handlers that write to stdout or stderr, Python warnings, and lines printed with :func:`write` (the
stdout logger's) pass through ``tqdm.write``, which clears the bars, prints and draws them again.
"""

import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TextIO, TypeVar

from ml.core.state import State

_T = TypeVar("_T")

REDRAW_INTERVAL_S = 0.25  # the training bar redraws (and reads its values) at most this often
NEVER = sys.maxsize  # TrainingBar.due when no bar is drawn: no step reaches it

_shown: list[Any] = []  # the bars on screen now, oldest first
_undo: list[Callable[[], None]] = []  # puts back what the first bar redirected
_bar_class: Any = None


def should_draw(enabled: bool = True, file: TextIO | None = None) -> bool:
    """Whether a bar is drawn: ``enabled``, ``file`` (stderr) and stdout terminals, and this process
    rank 0. With stdout piped (``ml train ... | tee log``) its lines may reach the terminal through
    the pipe after the bar was redrawn, glued to it: no bar then."""
    if not enabled:
        return False
    return _is_terminal(sys.stderr if file is None else file) and _is_terminal(sys.stdout) and _rank() == 0


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # not a real stream, or closed
        return False


def _rank() -> int:
    if "ml.utils.distributed" in sys.modules:  # a trainer's process: its process group knows best
        from ml.utils.distributed import get_rank

        return get_rank()
    from ml.utils.ranks import dist_env  # without importing torch

    return dist_env().rank


def _tqdm() -> Any:
    """tqdm's bar class, imported only when a bar is drawn, without its monitor thread.

    The thread would be alive when data loader workers fork, which a process should avoid.
    """
    global _bar_class
    if _bar_class is None:
        from tqdm import tqdm

        class Bar(tqdm):
            monitor_interval = 0

        _bar_class = Bar
    return _bar_class


def write(line: str, file: TextIO | None = None) -> None:
    """Prints ``line`` and a newline to ``file`` (stdout), flushed, above any bar on screen.

    The reader of stdout or stderr gone (``ml train ... | head``, ``2>&1 | head``): training goes
    on, and the stream is dropped for the rest of the process (the stdout logger's file keeps every
    line).
    """
    stream = sys.stdout if file is None else file
    try:
        if _shown:
            _tqdm().write(line, file=stream)
            stream.flush()
        else:
            print(line, file=stream, flush=True)
    except BrokenPipeError:
        if stream is not sys.stdout and stream is not sys.stderr:
            raise
        drop_stream(stream)


def drop_stream(stream: TextIO) -> None:
    """Points ``stream`` (stdout, stderr) at /dev/null after its reader left: the interpreter's last
    flush, and later writes, must not fail again on the closed pipe."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


class _AboveBars:
    """A logging handler's stream whose writes (whole records) go above the bars."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        _tqdm().write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    stream = sys.stderr if file is None else file
    if stream is not None:
        _tqdm().write(warnings.formatwarning(message, category, filename, lineno, line), file=stream, end="")


def _redirect() -> None:
    """Routes console logging and warnings above the bars until :func:`_put_back`."""
    consoles = (sys.stdout, sys.stderr)
    for handler in logging.getLogger().handlers:
        if (
            isinstance(handler, logging.StreamHandler)
            and not isinstance(handler, logging.FileHandler)
            and handler.stream in consoles
        ):
            old = handler.stream
            handler.setStream(_AboveBars(old))

            def put_back(h: logging.StreamHandler = handler, s: Any = old) -> None:
                if isinstance(h.stream, _AboveBars):  # unless someone set another stream meanwhile
                    h.setStream(s)

            _undo.append(put_back)
    default = getattr(warnings, "_showwarning_orig", None)
    if warnings.showwarning is default:  # not one the program chose (e.g. logging.captureWarnings)

        def restore_warnings() -> None:
            if warnings.showwarning is _show_warning:
                warnings.showwarning = default

        warnings.showwarning = _show_warning
        _undo.append(restore_warnings)


def _put_back() -> None:
    while _undo:
        _undo.pop()()


def _open(**kwargs: Any) -> Any:
    bar = _tqdm()(dynamic_ncols=True, **kwargs)
    if not _shown:
        _redirect()
    _shown.append(bar)
    return bar


def _close(bar: Any) -> None:
    try:
        bar.close()
    finally:
        if bar in _shown:
            _shown.remove(bar)
        if not _shown:
            _put_back()


def progress(
    items: Iterable[_T], *, total: int | None, description: str, enabled: bool = True
) -> Iterator[_T]:
    """Yields ``items``, with a bar on stderr (removed at the end) when :func:`should_draw` says so."""
    if not should_draw(enabled):
        yield from items
        return
    bar = _open(iterable=items, total=total, desc=description, leave=False, file=sys.stderr)
    try:
        yield from bar
    finally:
        _close(bar)


def expected_total(
    state: State,
    *,
    max_steps: int | None = None,
    max_samples: int | None = None,
    samples_per_step: float | None = None,
    max_epochs: int | None = None,
    steps_per_epoch: int | None = None,
) -> int | None:
    """The step at which training will end, as far as the limits tell; None if none does (``max_seconds``).

    ``max_steps`` itself; the steps the samples left to ``max_samples`` take; the steps left in this
    epoch and the next ones up to ``max_epochs``. The earliest of those that are known.
    """
    ends = [max_steps] if max_steps is not None else []
    if max_samples is not None and samples_per_step:
        left = max(0, math.ceil((max_samples - state.num_samples) / samples_per_step))
        ends.append(state.num_steps + left)
    if max_epochs is not None and steps_per_epoch:
        left = max(0, steps_per_epoch * (max_epochs - state.num_epochs) - state.num_epoch_steps)
        ends.append(state.num_steps + left)
    return min(ends, default=None)


def _format_values(values: Mapping[str, Any]) -> str:
    """``epoch=3, loss=0.4123``: tensors read here (the host sync), None left out."""
    parts = []
    for name, value in values.items():
        if value is None:
            continue
        number = value.item() if hasattr(value, "item") else value
        if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
            parts.append(f"{name}={number:.4g}")
        else:
            parts.append(f"{name}={int(number) if isinstance(number, float) else number}")
    return ", ".join(parts)


class TrainingBar:
    """A training loop's bar: steps done of the total, steps per second, ETA and the latest values.

    Per step, the loop compares ``state.num_steps`` with :attr:`due` and, when it is reached or at
    the last step, calls :meth:`update` with that step's values (e.g. the losses, still on the
    device). Used as a context manager, so that the bar closes however the loop ends (finished,
    stopped by a signal, an error): its last state stays on a line of its own, and a traceback or
    error line that follows starts on a fresh one.

    Args:
        state: The training state; the bar stands at its ``num_steps``.
        enabled: ``trainer.progress_bar`` (drawn only if :func:`should_draw` also agrees).
        description: The bar's label.
        unit: What one step is called in the rate (``step``, or ``it`` for an RL iteration).
        file: Where the bar is drawn (stderr).
        interval_s: Redraw at most this often.

    Attributes:
        due: The step from which :meth:`update` is worth calling; :data:`NEVER` without a bar.
    """

    def __init__(
        self,
        state: State,
        *,
        enabled: bool = True,
        description: str = "train",
        unit: str = "step",
        file: TextIO | None = None,
        interval_s: float = REDRAW_INTERVAL_S,
    ) -> None:
        self.due = NEVER
        self._state = state
        self._enabled = enabled
        self._description = description
        self._unit = unit
        self._file = file
        self._interval_s = interval_s
        self._bar: Any = None
        self._postfix = ""
        self._drawn = (0, 0.0)  # the step and time of the last redraw
        self._stride = 1  # steps between the last two checks

    def start(self, total: int | None) -> None:
        """Draws the bar at ``state.num_steps`` of ``total`` (None: unknown, no ETA), if one is drawn."""
        if self._bar is not None or not should_draw(self._enabled, self._file):
            return
        step = self._state.num_steps
        self._bar = _open(
            total=total,
            initial=step,
            desc=self._description,
            unit=self._unit,
            file=sys.stderr if self._file is None else self._file,
            leave=True,
            mininterval=0,  # this class decides when to redraw
            miniters=1,
        )
        self._drawn = (step, time.monotonic())
        self._stride = 1
        self.due = step + 1

    def _steps_in(self, seconds: float, steps: int, took_s: float) -> int:
        """The steps ``seconds`` take at the rate of ``steps`` per ``took_s`` (at most twice the last)."""
        ahead = int(seconds * steps / max(took_s, 1e-6))
        self._stride = max(1, min(ahead, 2 * self._stride))
        return self._stride

    def update(self, values: Mapping[str, Any] | None = None, *, force: bool = False) -> None:
        """Redraws with ``values`` (None: the last ones) if the interval is up or ``force``; sets ``due``."""
        bar = self._bar
        if bar is None:
            return
        step = self._state.num_steps
        now = time.monotonic()
        drawn_step, drawn_at = self._drawn
        waited = now - drawn_at
        if waited < self._interval_s and not force:  # early: come back when the interval is up
            self.due = step + self._steps_in(self._interval_s - waited, step - drawn_step, waited)
            return
        if values is not None:
            self._postfix = _format_values(values)
        bar.set_postfix_str(self._postfix, refresh=False)
        if step > bar.n:
            bar.update(step - bar.n)
        else:
            bar.refresh()
        self._drawn = (step, now)
        self.due = step + self._steps_in(self._interval_s, step - drawn_step, waited)

    def close(self) -> None:
        """Draws the bar at the current step and ends its line; bars opened after it are removed."""
        bar, self._bar = self._bar, None
        self.due = NEVER
        if bar is None:
            return
        try:
            for later in _shown[_shown.index(bar) + 1 :] if bar in _shown else []:
                _close(later)  # left behind by an error in a validation pass
            if self._state.num_steps > bar.n:
                bar.update(self._state.num_steps - bar.n)
        finally:
            _close(bar)

    def __enter__(self) -> "TrainingBar":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
