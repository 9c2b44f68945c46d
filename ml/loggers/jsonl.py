"""Defines :class:`JsonlLogger`, which appends one JSON object per write to ``metrics.jsonl``.

Each line of ``<log_directory>/metrics.jsonl`` is a self-contained JSON object::

    {"step": 120, "phase": "train", "elapsed_s": 3.21, "time": 1718000000.5,
     "metrics": {"train/loss": 0.41, "train/grad_norm": "nan"}, "strings": {"task/split": "a"}}

``strings`` appears only when the write has any; histograms are not written. JSON has no NaN or
infinity, so non-finite metric values are written as the strings ``"nan"``, ``"inf"`` and
``"-inf"`` (``float()`` reads them back; :func:`read_metrics` does so). Every line is flushed as it
is written, so a crash loses no line already written.
"""

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ml.core.config import conf_field
from ml.core.registry import register_logger
from ml.core.state import State
from ml.loggers.base import BaseLogger, BaseLoggerConfig, LogBatch

METRICS_FILE_NAME = "metrics.jsonl"

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

    Args:
        path: The file, or the log folder holding it.

    Yields:
        Each record as written, with ``record["metrics"]`` mapping names to floats.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE_NAME
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            record["metrics"] = {k: decode_value(v) for k, v in record.get("metrics", {}).items()}
            yield record


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

    @property
    def path(self) -> Path | None:
        """The metrics file, once :meth:`initialize` has named the log folder."""
        return None if self.log_directory is None else self.log_directory / METRICS_FILE_NAME

    def initialize(self, log_directory: Path) -> None:
        super().initialize(log_directory)
        self.close()
        path = Path(log_directory) / METRICS_FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        # Appending, so a resumed run continues the same file.
        self._file = path.open("a", encoding="utf-8")

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
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
