"""Defines :class:`StdoutLogger`, which prints one compact line per write.

Each write becomes a single line such as
``[train] step 120 epoch 1 | 3.2s | train/loss 0.4123 trainer/lr 0.001 task/split=a``: numbers with
a few significant digits (whole numbers as integers), strings as ``key=value``, histograms and images left
out. The same line is appended to ``<log_directory>/stdout.log`` once the logger is initialized, so
a run's console history survives the terminal. While a progress bar is on screen (the training bar
on a terminal, :mod:`ml.utils.progress`), the line is printed above it, whole.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ml.core.config import conf_field
from ml.core.registry import register_logger
from ml.core.state import State
from ml.loggers.base import BaseLogger, BaseLoggerConfig, LogBatch
from ml.utils.atomic import open_append
from ml.utils.progress import write as write_line

LOG_FILE_NAME = "stdout.log"


@dataclass
class StdoutLoggerConfig(BaseLoggerConfig):
    """Config of :class:`StdoutLogger`.

    Attributes:
        precision: Significant digits printed for non-integer values.
    """

    precision: int = conf_field(4, help="Significant digits printed for non-integer metric values")


def format_number(value: float, precision: int = 4) -> str:
    """Formats a metric value compactly.

    Args:
        value: The value.
        precision: Significant digits for values that are not whole numbers.

    Returns:
        ``"120"`` for whole numbers (up to 1e15), ``"0.4123"`` / ``"1.235e-05"`` otherwise, and
        ``"nan"``, ``"inf"`` or ``"-inf"`` for non-finite values.
    """
    if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.{precision}g}"


def format_duration(seconds: float) -> str:
    """Formats elapsed seconds as ``3.2s``, ``4m05s`` or ``2h03m07s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def format_line(state: State, batch: LogBatch, precision: int = 4) -> str:
    """Builds the one line written for ``batch`` at ``state`` (without a trailing newline)."""
    header = f"[{state.phase}] step {state.num_steps} epoch {state.num_epochs}"
    values = [f"{name} {format_number(value, precision)}" for name, value in batch.scalars.items()]
    # A string with line breaks would split the line, so they are escaped.
    values += [f"{name}={_one_line(text)}" for name, text in batch.strings.items()]
    parts = [header, format_duration(state.elapsed_time_s)]
    if values:
        parts.append(" ".join(values))
    return " | ".join(parts)


@register_logger("stdout")
class StdoutLogger(BaseLogger[StdoutLoggerConfig]):
    """Prints one line per write to stdout and appends it to ``<log_directory>/stdout.log``.

    Printing works without :meth:`initialize`; the file is written only after it.

    Args:
        config: The logger's config.
    """

    def __init__(self, config: StdoutLoggerConfig) -> None:
        super().__init__(config)
        if config.precision < 1:  # refused before the run folder exists, not at the first write
            raise ValueError(
                f"precision is the significant digits printed, at least 1, got {config.precision}: "
                "e.g. precision: 4"
            )
        self._file: TextIO | None = None
        self._path: Path | None = None

    def initialize(self, log_directory: Path) -> None:
        super().initialize(log_directory)
        self.close()
        path = Path(log_directory) / LOG_FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        # Line-buffered, appending: every line reaches the file at once, and a resumed run
        # continues the same log.
        self._file = open_append(path, buffering=1)
        self._path = path

    def write(self, state: State, batch: LogBatch) -> None:
        line = format_line(state, batch, self.config.precision)
        write_line(line)  # above the progress bar, if one is shown
        if self._file is not None:
            try:
                self._file.write(line + "\n")
            except OSError as e:  # a full disk: say which file (the OSError of a write names none)
                raise OSError(e.errno, e.strerror, str(self._path)) from e

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
