"""Defines ``ml runs [PATH]``: a table of the experiments under a run dir.

``PATH`` defaults to ``$RUN_DIR``, else ``./runs``; it may also be one experiment's folder
(``<exp_name>``) or one run folder (``run_<N>``). One line per run, sorted by experiment name, then
run number (an experiment's runs stay together, in the order they were started)::

    EXPERIMENT  RUN    STATE        STEP  CHECKPOINT  TRAIN/LOSS  BEST VALID/LOSS  WALL   NOTE
    digits      run_0  finished     1500  2h ago      0.01234     0.0712 @1250     1m02s
    digits      run_1  running       420  12s ago     0.3012      0.2811 @250      21s    pid 4242@node7
    digits      run_2  interrupted   250  1d ago      0.4410      0.4102 @250      9s     SIGTERM

The states are described in :mod:`ml.tools.experiments` (``running``, ``crashed``, ``running?``,
``scheduled``, ``finished``, ``interrupted``, ``failed``, ``unknown``, ``empty``). STEP is the furthest
step the run reached (its newest checkpoint, its last logged training step, its status marker);
CHECKPOINT the age of the newest checkpoint; TRAIN/LOSS the last logged ``train/loss``; BEST the
best value of ``--metric`` (default ``valid/loss``) with its step: the highest or the lowest as the
run's config says for a metric it monitors (``trainer.checkpoint.mode``, else
``trainer.early_stopping.mode``), else the lowest, or the highest for names with ``acc``,
``return``, ``reward``, ``f1``, ... (:mod:`ml.core.monitor`). A metric logged without a phase prefix
in the records of several phases (``task/acc`` in training and validation) is one series per
phase: ``--metric valid:task/acc`` names the validation's; ``--metric task/acc`` is then refused
as ambiguous. WALL the training time (the largest
``elapsed_s`` logged, else the status marker's, else the time since a running run's lock);
NOTE the lock's owner, the stop signal or the error.

``--json`` prints a JSON list instead, one object per run with every field (numbers as numbers,
times in ISO 8601, non-finite values as ``"nan"``/``"inf"`` like ``metrics.jsonl``, null for what
is unknown); an empty list when nothing matches. The fields: ``name``, ``run``, ``run_number``,
``path``, ``state``; ``pid``, ``host``, ``lock_time`` (the lock's owner); ``signal``, ``error``,
``status_time`` (from ``status.json``, when the state comes from it); ``step``; ``checkpoint``,
``checkpoint_step``, ``checkpoint_time``; ``train_loss``; ``metric``, ``mode`` (``min`` or
``max``: which way it improves in that run), ``metric_phases`` (the phases whose records hold it),
``best``, ``best_step`` (the ``--metric``); ``best_valid`` (``{name: {"value", "step"}}`` for
every metric of the valid phase); ``wall_s``. ``--name GLOB`` keeps the experiments whose name
matches (fnmatch, repeatable), ``--state STATE`` the runs in the given states (repeatable, or
comma-separated).
``--config KEY`` (repeatable, or comma-separated: ``--config optimizer.lr,model.hidden``) adds a
column per config key, its value in each run's ``config.yaml``, so the runs of a sweep show side
by side; ``--json`` then has ``config``, ``{key: value}`` (null for a key the run lacks).
Imports no torch: it answers in a fraction of a second.
"""

import argparse
import fnmatch
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ml.tools import tool_parser
from ml.tools.experiments import DEFAULT_METRIC, STATES, MetricChoice, RunInfo, describe_runs, read_config

DEFAULT_RUN_DIR = "runs"


def _parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "runs",
        "The experiments under a run dir: state, step, checkpoint age, loss, best metric, wall time.",
    )
    parser.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help="a run dir, one experiment's folder or one run folder (default: $RUN_DIR, else ./runs)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per run")
    parser.add_argument(
        "--name", action="append", default=[], metavar="GLOB", help="only experiments whose name matches"
    )
    parser.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="STATE",
        help=f"only runs in these states (repeatable, or comma-separated): {', '.join(STATES)}",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY",
        help="a column of each run's value of this config key, e.g. optimizer.lr (repeatable, or "
        "comma-separated): a sweep's runs side by side",
    )
    parser.add_argument(
        "--metric",
        default=DEFAULT_METRIC,
        metavar="[PHASE:]NAME",
        help="the metric whose best value is shown (default: valid/loss); PHASE:NAME (train, valid or "
        "test) takes that phase's records only, as a key logged without a phase prefix (model/mean) "
        "may be in several phases' records, each its own series",
    )
    parser.epilog = (
        "The best value is the lowest or the highest as the run's config.yaml says for a metric it "
        "monitors (trainer.checkpoint.mode, else trainer.early_stopping.mode), else as the metric's "
        "name says: the highest for names with acc, return, reward, f1, auc, ..., else the lowest. "
        "A NAME without PHASE: logged in the records of several phases is refused as ambiguous."
    )
    return parser


def _states(values: list[str]) -> set[str]:
    from ml.errors import BadInput

    wanted = {s.strip() for value in values for s in value.split(",") if s.strip()}
    unknown = sorted(wanted - set(STATES))
    if unknown:
        raise BadInput(f"unknown state {', '.join(map(repr, unknown))}: choose from {', '.join(STATES)}")
    return wanted


def _root(path: str | None) -> tuple[Path, str]:
    """The folder to read, and how to name it in messages."""
    if path is not None:
        return Path(path).expanduser(), path
    env = os.environ.get("RUN_DIR")
    if env:
        return Path(env).expanduser(), env
    return Path(DEFAULT_RUN_DIR), f"./{DEFAULT_RUN_DIR}"


def _not_found(path: str | None, shown: str) -> str:
    if path is not None:
        return f"no such run dir: {shown} (give a run dir, an experiment folder or a run folder)"
    if os.environ.get("RUN_DIR"):
        return f"RUN_DIR={shown} does not exist: set RUN_DIR to the folder runs go in, or `ml runs PATH`"
    return f"no run dir: {shown} does not exist and RUN_DIR is not set: `ml runs PATH`, or set RUN_DIR"


def format_age(seconds: float) -> str:
    """``45s ago``, ``3m ago``, ``2h ago``, ``4d ago``."""
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def format_duration(seconds: float) -> str:
    """``0.4s``, ``12s``, ``3m12s``, ``1h02m``, ``2d03h``."""
    if seconds < 9.95:  # would round to 10.0s
        return f"{max(seconds, 0.0):.1f}s"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _value(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.4g}"


def _note(run: RunInfo) -> str:
    if run.state in ("running", "running?"):
        return f"pid {run.pid if run.pid is not None else '?'}@{run.host or '?'}"
    if run.state == "crashed":
        return f"pid {run.pid}@{run.host} is gone"
    if run.state == "failed":
        return run.error or ""
    if run.state == "interrupted":
        return run.signal or ""
    return run.reason or ""


def _shorten(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


_MISSING = object()


def config_values(run_path: Path, keys: list[str]) -> dict[str, Any]:
    """The values of dotted ``keys`` in a run's ``config.yaml`` (None where it has no such key)."""
    config = read_config(run_path)
    values: dict[str, Any] = {}
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        values[key] = None if node is _MISSING else node
    return values


def config_cell(value: Any) -> str:
    """A config value in a table cell or a legend: short, floats as ``%g``, ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return _shorten(value if isinstance(value, str) else json.dumps(value), 30)


def table(
    runs: list[RunInfo],
    *,
    metric: str = DEFAULT_METRIC,
    now: float | None = None,
    config: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The aligned table ``ml runs`` prints (without a trailing newline).

    ``config`` maps a run's path to the values of the ``--config`` keys, a column each after RUN.
    """
    now = time.time() if now is None else now
    keys = list(next(iter(config.values()))) if config else []
    header = [
        "EXPERIMENT",
        "RUN",
        *keys,
        "STATE",
        "STEP",
        "CHECKPOINT",
        "TRAIN/LOSS",
        f"BEST {metric.upper()}",
    ]
    header += ["WALL", "NOTE"]
    rows = [header]
    for run in runs:
        at = "?" if run.best_step is None else run.best_step
        best = "-" if run.best is None else f"{_value(run.best)} @{at}"
        values = config[run.path] if config else {}
        rows.append(
            [
                run.name,
                run.run,
                *(config_cell(values[key]) for key in keys),
                run.state,
                "-" if run.step is None else str(run.step),
                "-" if run.checkpoint_time is None else format_age(now - run.checkpoint_time),
                _value(run.train_loss),
                best,
                "-" if run.wall_s is None else format_duration(run.wall_s),
                _shorten(_note(run)),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {3 + len(keys)}  # STEP is a number: right-aligned
    lines = []
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``ml runs``: prints the table (or ``--json``); returns 0."""
    from ml.errors import BadInput

    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    states = _states(args.state)
    root, shown = _root(args.path)
    metric = MetricChoice.parse(args.metric)
    try:
        runs = describe_runs(root, metric=metric)
    except FileNotFoundError:
        raise BadInput(_not_found(args.path, shown)) from None
    except NotADirectoryError:
        raise BadInput(f"{shown} is a file: give a run dir, an experiment folder or a run folder") from None
    found = bool(runs)
    if args.name:
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, pattern) for pattern in args.name)]
    if states:
        runs = [r for r in runs if r.state in states]
    if metric.phase is None:  # refused only for the runs shown: one series per phase, which is meant?
        for run in runs:
            if len(run.metric_phases) > 1:
                raise metric.ambiguous(run.metric_phases, run.path)
    keys = [k.strip() for value in args.config for k in value.split(",") if k.strip()]
    config = {r.path: config_values(Path(r.path), keys) for r in runs} if keys else None
    if args.json:
        objects = [r.to_json() for r in runs]
        if config is not None:
            for obj in objects:
                obj["config"] = config[obj["path"]]
        print(json.dumps(objects, indent=2, allow_nan=False))
    elif not found:
        print(f"no experiments under {shown}")
    elif not runs:
        filters = [f"--name {p}" for p in args.name]
        filters += [f"--state {','.join(sorted(states))}"] if states else []
        print(f"no runs under {shown} match {' '.join(filters)}")
    else:
        print(table(runs, metric=str(metric), config=config))
    return 0
