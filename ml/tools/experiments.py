"""Reads experiment folders without importing torch: what ``ml runs`` shows of each run.

A run folder is ``$RUN_DIR/<exp_name>/run_<N>`` (or any folder given as ``trainer.exp_dir``); where
its files lie, how its locks, checkpoints and ``status.json`` are read, is :mod:`ml.run`'s knowledge.
The files read here (none is written): the locks, ``status.json``, the newest complete checkpoint
(:func:`ml.run.checkpoints.newest_checkpoint`, the one resuming would continue from) and
``metrics.jsonl`` (one JSON record per write, ``ml.loggers.jsonl``).

A run's state, the first rule that applies:

* ``running``: ``.lock_running`` names a process on this host that is alive;
* ``crashed``: ``.lock_running`` names a process on this host that is gone (killed with SIGKILL,
  out of memory, the machine rebooted): continuing the run takes the lock over;
* ``running?``: ``.lock_running`` names a process on another host (or no pid): it cannot be checked
  from here;
* ``scheduled``: ``.lock_scheduled``, a job waiting for its turn;
* ``finished`` / ``interrupted`` / ``failed``: what ``status.json`` says - unless the marker is
  older than the run's newest checkpoint or log line (it describes an earlier session, whose
  successor was killed before it could write its own), which then counts as below;
* ``interrupted``: no lock and no (current) marker, but a checkpoint to continue from;
* ``unknown``: no lock, marker or checkpoint, but logged metrics (a run of an older ``ml``, or one
  that failed before its first checkpoint);
* ``empty``: nothing at all (a run folder just claimed, or one whose first process never trained).

``metrics.jsonl`` is read leniently: a line that does not parse (the last line of a writer killed
mid-write) is skipped, and when a phase and step occur more than once (runs of older versions,
resumed from a checkpoint older than their last log line) the last record counts. Only the records
that matter are parsed - every validation and test record, the records holding the chosen metric,
and the last training records - so a long run's log answers quickly.

A metric's records are those of one phase (``train``, ``valid``, ``test``): a key logged without
a phase prefix (``model/mean`` a model logs in every forward pass, ``task/acc`` of a task's own
namespace) may appear in the records of several phases, whose values are different series.
:class:`MetricChoice` names a metric as the tools take it: ``NAME`` (the records of whichever
phase logs it; refused where several do) or ``PHASE:NAME`` (``valid:model/mean``: that phase's
records only). Its best value is the lowest or the highest as the run's ``config.yaml`` says
for a metric it monitors (``trainer.checkpoint.mode``, ``trainer.early_stopping.mode``), else as
its name says (:mod:`ml.core.monitor` owns the rule).
"""

import datetime
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ml.core.monitor import configured_modes, is_better, mode_for
from ml.core.state import PHASES
from ml.errors import BadInput, CheckpointError
from ml.run.checkpoints import newest_checkpoint
from ml.run.layout import RunDir, find_runs, run_number
from ml.run.locks import read_lock
from ml.run.status import STATES as ENDED
from ml.run.status import read_status
from ml.utils.atomic import read_regular

__all__ = [
    "DEFAULT_METRIC",
    "STATES",
    "MetricChoice",
    "RunInfo",
    "describe_run",
    "describe_runs",
    "find_runs",
    "read_config",
    "run_number",
]

DEFAULT_METRIC = "valid/loss"

STATES = (
    "running",
    "running?",
    "crashed",
    "scheduled",
    "finished",
    "interrupted",
    "failed",
    "unknown",
    "empty",
)

_ELAPSED = re.compile(rb'"elapsed_s":\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)')
_TRAIN_PHASE = b'"phase": "train"'
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


@dataclass(frozen=True)
class MetricChoice:
    """A metric as the tools are told it: ``NAME``, or ``PHASE:NAME`` for one phase's records."""

    name: str
    phase: str | None = None  # None: the records of whichever phase logs the name

    @classmethod
    def parse(cls, text: str) -> "MetricChoice":
        """``valid:model/mean`` (also ``valid: model/mean``) or ``model/mean``; a text whose part
        before the first ``:`` is not a phase is a name as it stands."""
        phase, colon, name = text.partition(":")
        if colon and phase.strip() in PHASES and name.strip():
            return cls(name.strip(), phase.strip())
        return cls(text)

    def __str__(self) -> str:
        return self.name if self.phase is None else f"{self.phase}:{self.name}"

    def ambiguous(self, phases: list[str], where: str) -> BadInput:
        """The error for a name without a phase that ``where`` logged in several ``phases``."""
        choices = " or ".join(f"{phase}:{self.name}" for phase in phases)
        return BadInput(
            f"{self.name} is logged in the {' and '.join(phases)} records of {where}: "
            f"name the phase, {choices}"
        )


def phase_order(phases: Any) -> list[str]:
    """Phases as the run goes: train, valid, test (then any other a record named)."""
    known = [phase for phase in PHASES if phase in phases]
    return known + sorted(str(phase) for phase in phases if phase not in PHASES)


def metric_value(value: Any) -> float | None:
    """A metric value as written by the jsonl logger (``"nan"``, ``"inf"`` as strings); None if not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    return None


@dataclass
class Best:
    value: float
    step: int | None


@dataclass
class MetricsSummary:
    """What ``ml runs`` takes from a ``metrics.jsonl``."""

    last_train_step: int | None = None
    train_loss: float | None = None
    wall_s: float | None = None
    records: int = 0
    best: Best | None = None  # of the chosen metric (None where several phases logged it)
    phases: list[str] = field(default_factory=list)  # whose records hold the chosen metric
    best_valid: dict[str, Best] = field(default_factory=dict)  # every metric of the valid phase


def parse_record(line: bytes) -> dict[str, Any] | None:
    """A ``metrics.jsonl`` line as its record; None for a line that is not one (cut short, garbled)."""
    try:
        record = json.loads(line)
    except ValueError:  # cut short by a kill, garbled, not UTF-8
        return None
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        return None
    return record


def record_step(record: dict[str, Any]) -> int | None:
    """The record's step; None when it has no integer one."""
    step = record.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _improve(best: dict[str, Best], name: str, value: float, step: int | None, mode: str) -> None:
    if math.isnan(value):
        return
    old = best.get(name)
    if old is None or is_better(value, old.value, mode):
        best[name] = Best(value, step)


def summarize_metrics(
    path: Path, metric: str | MetricChoice = DEFAULT_METRIC, modes: Mapping[str, str] | None = None
) -> MetricsSummary:
    """Reads a ``metrics.jsonl``: the last training step and loss, the wall time, the best values.

    Args:
        path: The file (a missing or unreadable one gives an empty summary).
        metric: The metric whose best value is wanted (``NAME`` or ``PHASE:NAME``, :class:`MetricChoice`).
        modes: The modes the run's config sets (:func:`ml.core.monitor.configured_modes`): a metric's
            best is its lowest or highest value as :func:`ml.core.monitor.mode_for` says.

    The best value is left out (None) where ``metric`` names no phase and the records of several
    phases hold it (``summary.phases`` says which).
    """
    choice = metric if isinstance(metric, MetricChoice) else MetricChoice.parse(metric)
    modes = {} if modes is None else modes
    summary = MetricsSummary()
    try:
        data = read_regular(path)
    except OSError:
        return summary
    lines = [line for line in data.split(b"\n") if line.strip()]
    summary.records = len(lines)
    wanted = json.dumps(choice.name).encode()
    kept: dict[tuple[Any, Any], dict[str, Any]] = {}  # (phase, step) -> the last record
    for line in lines:
        if _TRAIN_PHASE in line and wanted not in line:
            continue  # the bulk: training records without the chosen metric (the last ones below)
        record = parse_record(line)
        if record is not None:
            kept[(record.get("phase"), record_step(record))] = record
    chosen: dict[str, Best] = {}  # phase -> the chosen metric's best in its records
    logged_in: set[str] = set()  # the phases whose records hold the chosen metric
    mode = mode_for(choice.name, modes)
    for (phase, step), record in kept.items():
        for name, raw in record["metrics"].items():
            value = metric_value(raw)
            if value is None:
                continue
            if name == choice.name and choice.phase in (None, phase):
                logged_in.add(str(phase))
                _improve(chosen, str(phase), value, step, mode)
            if phase == "valid":
                _improve(summary.best_valid, name, value, step, mode_for(name, modes))
    summary.phases = phase_order(logged_in)
    if len(logged_in) == 1:  # of several phases, which series is meant is the user's to say
        summary.best = next(iter(chosen.values()), None)

    for line in reversed(lines):  # the newest training record, and the newest loss
        if _TRAIN_PHASE not in line and b'"train"' not in line:
            continue
        record = parse_record(line)
        if record is None or record.get("phase") != "train":
            continue
        if summary.last_train_step is None:
            summary.last_train_step = record_step(record)
        loss = metric_value(record["metrics"].get("train/loss"))
        if loss is not None:
            summary.train_loss = loss
            break

    elapsed = [float(m) for m in _ELAPSED.findall(data)]
    summary.wall_s = max(elapsed) if elapsed else None
    return summary


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass
class RunInfo:
    """One run as ``ml runs`` describes it (``--json`` prints :meth:`to_json`)."""

    name: str
    run: str
    path: str
    state: str
    pid: int | None = None  # of the lock's owner (running, crashed, running?)
    host: str | None = None
    signal: str | None = None  # from status.json
    error: str | None = None
    reason: str | None = None  # why a finished run ended before its limits (early stopping)
    step: int | None = None
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    checkpoint_time: float | None = None  # the newest checkpoint's mtime (seconds since the epoch)
    train_loss: float | None = None
    metric: str = DEFAULT_METRIC  # NAME or PHASE:NAME (MetricChoice)
    mode: str = "min"  # which way the metric improves in this run: min or max
    best: float | None = None
    best_step: int | None = None
    metric_phases: list[str] = field(default_factory=list)  # whose records hold the metric
    best_valid: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_s: float | None = None
    status_time: str | None = None  # when status.json was written (ISO)
    lock_time: str | None = None  # when .lock_running / .lock_scheduled was taken (ISO)

    @property
    def number(self) -> int:
        return run_number(Path(self.path))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: non-finite numbers as ``"nan"``, ``"inf"``, ``"-inf"`` (as in metrics.jsonl)."""
        out = asdict(self)
        out["run_number"] = self.number
        out["checkpoint_time"] = _iso(self.checkpoint_time)
        return _finite(out)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="seconds")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def read_config(exp_dir: Path) -> Any:
    """A run's ``config.yaml`` as plain data (read without torch); None if it cannot be read."""
    import yaml

    try:
        return yaml.safe_load(read_regular(RunDir(exp_dir).config).decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def describe_run(
    exp_dir: Path,
    name: str | None = None,
    *,
    metric: str | MetricChoice = DEFAULT_METRIC,
    now: float | None = None,
) -> RunInfo:
    """Reads one run folder.

    Args:
        exp_dir: The run folder (``<exp_name>/run_<N>``).
        name: The experiment's name (default: the parent folder's name).
        metric: The metric whose best value is reported (``NAME`` or ``PHASE:NAME``).
        now: The time to measure a running run's wall time against (default: now).

    ``best`` is None where ``metric`` names no phase and the run logged it in several phases'
    records (``metric_phases`` lists them; :meth:`MetricChoice.ambiguous` is the error to show).
    """
    exp_dir = Path(exp_dir)
    run = RunDir.of(exp_dir)
    info = RunInfo(
        name=exp_dir.parent.name if name is None else name, run=exp_dir.name, path=str(exp_dir), state="empty"
    )
    choice = metric if isinstance(metric, MetricChoice) else MetricChoice.parse(metric)
    modes = configured_modes(read_config(exp_dir))  # the run's own say on which way its metrics go
    info.metric, info.mode = str(choice), mode_for(choice.name, modes)
    try:
        ckpt = newest_checkpoint(run)
    except CheckpointError:  # a link to a file that is gone: resuming refuses it, so no checkpoint
        ckpt = None
    if ckpt is not None:
        info.checkpoint, info.checkpoint_step, info.checkpoint_time = str(ckpt.file), ckpt.step, ckpt.mtime
    metrics = summarize_metrics(run.metrics, choice, modes)
    info.train_loss, info.wall_s = metrics.train_loss, metrics.wall_s
    if metrics.best is not None:
        info.best, info.best_step = metrics.best.value, metrics.best.step
    info.metric_phases = metrics.phases
    info.best_valid = {k: {"value": b.value, "step": b.step} for k, b in sorted(metrics.best_valid.items())}
    progress = max(
        (s for s in (info.checkpoint_step, metrics.last_train_step) if s is not None), default=None
    )

    status = read_status(run)
    status_step = status.get("step") if status is not None else None
    if not isinstance(status_step, int) or isinstance(status_step, bool):
        status_step = None
    # A marker older than the newest checkpoint or log line describes an earlier session.
    current = status is not None and status_step is not None and (progress is None or status_step >= progress)
    info.step = max((s for s in (progress, status_step if current else None) if s is not None), default=None)

    running = read_lock(run, "running")
    scheduled = read_lock(run, "scheduled") if running is None else None
    if running is not None:
        info.pid, info.host, info.lock_time = running.pid, running.host, running.time
        if not running.on_this_host:
            info.state = "running?"
        else:
            info.state = "crashed" if running.is_stale() else "running"
        if info.state == "running" and info.wall_s is None:
            started = _parse_time(running.time)
            if started is not None:
                info.wall_s = max((time.time() if now is None else now) - started, 0.0)
    elif scheduled is not None:
        info.state, info.lock_time = "scheduled", scheduled.time
    elif current and status is not None and status.get("state") in ENDED:
        info.state = str(status["state"])
    elif ckpt is not None:
        info.state = "interrupted"
    elif metrics.records:
        info.state = "unknown"
    if info.state in ENDED and current and status is not None:  # what the marker says of that end
        signal, error = status.get("signal"), status.get("error")
        info.signal = signal if isinstance(signal, str) else None
        info.error = error if isinstance(error, str) else None
        reason = status.get("reason")
        info.reason = reason if isinstance(reason, str) else None
        info.status_time = status.get("time") if isinstance(status.get("time"), str) else None
        elapsed = metric_value(status.get("elapsed_s"))
        if info.wall_s is None and elapsed is not None:  # nothing logged: the marker's clock
            info.wall_s = elapsed
    return info


def describe_runs(path: Path, *, metric: str | MetricChoice = DEFAULT_METRIC) -> list[RunInfo]:
    """:func:`describe_run` for each run :func:`find_runs` finds under ``path``."""
    now = time.time()
    return [describe_run(run, name, metric=metric, now=now) for name, run in find_runs(path)]
