"""Defines :class:`JsonlLogger`, which appends one JSON object per write to ``metrics.jsonl``.

Each line of ``<log_directory>/metrics.jsonl`` is a self-contained JSON object::

    {"step": 120, "phase": "train", "elapsed_s": 3.21, "time": 1718000000.5,
     "metrics": {"train/loss": 0.41, "train/grad_norm": "nan"}, "strings": {"task/split": "a"}}

``strings`` appears only when the write has any; histograms and images are not written. JSON has no NaN or
infinity, so non-finite metric values are written as the strings ``"nan"``, ``"inf"`` and
``"-inf"`` (``float()`` reads them back; :func:`read_metrics` does so). Every line is flushed as it
is written, so a crash loses no line already written.

When a run continues from its checkpoint at step S, the steps after S are trained (and logged)
again, so :meth:`JsonlLogger.on_resume_from` first drops the lines of the earlier process for
steps after S, those of S in the phases the checkpoint does not cover (an evaluation logged after
it was saved: the continued run does it again), and a line a kill cut short
(:func:`drop_records_after`): the file then holds one record per phase and step. The rewrite is
atomic; a kill during it leaves the old file or the new one.
"""

import io
import json
import logging
import math
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ml.core.config import conf_field
from ml.core.registry import register_logger
from ml.core.state import State
from ml.loggers.base import BaseLogger, BaseLoggerConfig, LogBatch
from ml.utils.atomic import atomic_open, open_append, open_regular

METRICS_FILE_NAME = "metrics.jsonl"

logger = logging.getLogger(__name__)

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@dataclass
class JsonlLoggerConfig(BaseLoggerConfig):
    """Config of :class:`JsonlLogger`.

    The file is read by programs (plots, comparisons), not people, and a line costs little, so
    training metrics are written every second by default instead of every ten.

    Attributes:
        write_every_n_seconds: Write training metrics at most this often.
    """

    write_every_n_seconds: float | None = conf_field(
        1.0, help="Write training metrics at most this often (validation and test always write)"
    )


def encode_value(value: float) -> float | str:
    """Returns ``value`` itself if finite, else ``"nan"``, ``"inf"`` or ``"-inf"``."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def decode_value(value: float | str | None) -> float:
    """Inverts :func:`encode_value` (``None`` also reads as NaN)."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        return _NON_FINITE[value]
    return float(value)


def read_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    """Reads a ``metrics.jsonl`` file, one dict per line, metric values decoded to floats.

    A last line without its newline that does not parse is skipped: the writer was killed while
    writing it (the file of a running job may also be read in the middle of a write).

    Args:
        path: The file, or the log folder holding it.

    Yields:
        Each record as written, with ``record["metrics"]`` mapping names to floats.

    Raises:
        json.JSONDecodeError: If a complete line is not JSON.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE_NAME
    with io.TextIOWrapper(open_regular(path), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if not line.endswith("\n"):
                    return  # a truncated last line
                raise
            record["metrics"] = {k: decode_value(v) for k, v in record.get("metrics", {}).items()}
            yield record


def _step_and_phase(line: bytes) -> tuple[int, str | None] | None:
    """The step and phase (None unless a string) of a complete record line, or None for a line
    that is not one (cut short, garbled)."""
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    phase = record.get("phase")
    return step, phase if isinstance(phase, str) else None


def drop_records_after(path: str | Path, step: int, redone_phases: Collection[str] = ()) -> int:
    """Atomically drops the records of ``path`` with a step after ``step``, those at ``step`` of
    ``redone_phases``, and any line cut short.

    Kept lines stay byte for byte as they were, in their order (blank lines too). A line that is
    not a whole record (the last line of a writer killed mid-write; a garbled line) is dropped. A
    whole last record that lacks only its newline is kept and given one, so the next line appended
    does not run into it. The file is rewritten only when it changes: the kept lines go to a
    temporary file in the same folder, which is fsynced and then renamed over ``path`` (the folder
    fsynced too), so a kill at any moment leaves either the old file or the new one, never a mix.
    The file is read twice, line by line, rather than held in memory: a long run's may be large.

    Args:
        path: The ``metrics.jsonl`` file; a missing file is left missing.
        step: The last step to keep (the step of the checkpoint training continues from).
        redone_phases: The phases whose records at ``step`` go too (evaluations the checkpoint
            does not cover, done again now).

    Returns:
        The number of lines dropped.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a kill during an earlier rewrite
        stale.unlink(missing_ok=True)
    if not path.exists():
        return 0
    dropped: set[int] = set()
    unterminated = False
    with open_regular(path) as f:
        for index, line in enumerate(f):
            unterminated = not line.endswith(b"\n")  # only the last line can lack it
            if not line.strip():
                continue
            found = _step_and_phase(line)
            if found is None or found[0] > step or (found[0] == step and found[1] in redone_phases):
                dropped.add(index)
    if not dropped and not unterminated:
        return 0
    with open_regular(path) as src, atomic_open(path, "wb") as dst:
        for index, line in enumerate(src):
            if index not in dropped:
                dst.write(line if line.endswith(b"\n") else line + b"\n")
    return len(dropped)


@register_logger("jsonl")
class JsonlLogger(BaseLogger[JsonlLoggerConfig]):
    """Appends one JSON object per write to ``<log_directory>/metrics.jsonl``.

    The run's config is not written here (the trainer saves it as ``config.yaml``), so
    :meth:`log_config` keeps the base class's no-op.

    Args:
        config: The logger's config.
    """

    def __init__(self, config: JsonlLoggerConfig) -> None:
        super().__init__(config)
        self._file: TextIO | None = None
        self._redone_phases: frozenset[str] = frozenset()  # see on_resume_from

    @property
    def path(self) -> Path | None:
        """The metrics file, once :meth:`initialize` has named the log folder."""
        return None if self.log_directory is None else self.log_directory / METRICS_FILE_NAME

    def initialize(self, log_directory: Path) -> None:
        super().initialize(log_directory)
        self._open()

    def _open(self) -> None:
        self.close()
        path = self.path
        if path is None:
            raise RuntimeError("JsonlLogger used before initialize(log_directory)")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Appending, so a resumed run continues the same file.
        self._file = open_append(path)

    def on_resume_from(self, state: State, redone_phases: frozenset[str]) -> None:
        """Drops the records after the step training continues from, and those of the step in
        ``redone_phases`` (see :func:`drop_records_after`), in :meth:`on_resume`, which a subclass
        may extend."""
        self._redone_phases = redone_phases
        try:
            self.on_resume(state)
        finally:
            self._redone_phases = frozenset()

    def on_resume(self, state: State) -> None:
        """Drops the records after the step training continues from, and those of the step in the
        phases :meth:`on_resume_from` names (called alone: none).

        The file is closed around the rewrite: a handle opened before it would go on appending to
        the replaced file, which no longer has a name.
        """
        path = self.path
        if path is None:
            return
        self.close()
        step = state.num_steps
        redone_phases = self._redone_phases
        dropped = drop_records_after(path, step, redone_phases)
        if dropped:
            redone = (
                f", or {'/'.join(sorted(redone_phases))} at step {step} not covered by it"
                if redone_phases
                else ""
            )
            logger.info(
                "Dropped %d line(s) of %s past the checkpoint at step %d%s (logged again now), or cut short",
                dropped,
                path,
                step,
                redone,
            )
        self._open()

    def write(self, state: State, batch: LogBatch) -> None:
        if self._file is None:
            raise RuntimeError("JsonlLogger.write called before initialize(log_directory)")
        record: dict[str, Any] = {
            "step": state.num_steps,
            "phase": state.phase,
            "elapsed_s": encode_value(state.elapsed_time_s),
            "time": time.time(),
            "metrics": {name: encode_value(value) for name, value in batch.scalars.items()},
        }
        if batch.strings:
            record["strings"] = dict(batch.strings)
        # allow_nan=False: a non-finite float that slipped through fails here instead of
        # producing a line other JSON readers reject.
        line = json.dumps(record, allow_nan=False) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as e:  # a full disk: say which file (the OSError of a write names none)
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
