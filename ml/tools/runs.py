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
best value of ``--metric`` (default ``valid/loss``: the lowest; metrics whose name holds ``acc``,
``return`` or ``reward``: the highest) with its step; WALL the training time (the largest
``elapsed_s`` logged, else the status marker's, else the time since a running run's lock);
NOTE the lock's owner, the stop signal or the error.

``--json`` prints a JSON list instead, one object per run with every field (numbers as numbers,
times in ISO 8601, non-finite values as ``"nan"``/``"inf"`` like ``metrics.jsonl``, null for what
is unknown); an empty list when nothing matches. The fields: ``name``, ``run``, ``run_number``,
``path``, ``state``; ``pid``, ``host``, ``lock_time`` (the lock's owner); ``signal``, ``error``,
``status_time`` (from ``status.json``, when the state comes from it); ``step``; ``checkpoint``,
``checkpoint_step``, ``checkpoint_time``; ``train_loss``; ``metric``, ``best``, ``best_step`` (the
``--metric``); ``best_valid`` (``{name: {"value", "step"}}`` for every metric of the valid phase);
``wall_s``. ``--name GLOB`` keeps the experiments whose name matches (fnmatch,
repeatable), ``--state STATE`` the runs in the given states (repeatable, or comma-separated).
Imports no torch: it answers in a fraction of a second.
"""

import argparse
import fnmatch
import json
import math
import os
import time
from pathlib import Path

from ml.tools import tool_parser
from ml.tools.experiments import DEFAULT_METRIC, STATES, RunInfo, describe_runs

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
        "--metric",
        default=DEFAULT_METRIC,
        help="the metric whose best value is shown (default: valid/loss; names with acc, return "
        "or reward: highest is best)",
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


def table(runs: list[RunInfo], *, metric: str = DEFAULT_METRIC, now: float | None = None) -> str:
    """The aligned table ``ml runs`` prints (without a trailing newline)."""
    now = time.time() if now is None else now
    header = ["EXPERIMENT", "RUN", "STATE", "STEP", "CHECKPOINT", "TRAIN/LOSS", f"BEST {metric.upper()}"]
    header += ["WALL", "NOTE"]
    rows = [header]
    for run in runs:
        at = "?" if run.best_step is None else run.best_step
        best = "-" if run.best is None else f"{_value(run.best)} @{at}"
        rows.append(
            [
                run.name,
                run.run,
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
    right = {3}  # STEP is a number: right-aligned
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
    try:
        runs = describe_runs(root, metric=args.metric)
    except FileNotFoundError:
        raise BadInput(_not_found(args.path, shown)) from None
    except NotADirectoryError:
        raise BadInput(f"{shown} is a file: give a run dir, an experiment folder or a run folder") from None
    found = bool(runs)
    if args.name:
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, pattern) for pattern in args.name)]
    if states:
        runs = [r for r in runs if r.state in states]
    if args.json:
        print(json.dumps([r.to_json() for r in runs], indent=2, allow_nan=False))
    elif not found:
        print(f"no experiments under {shown}")
    elif not runs:
        filters = [f"--name {p}" for p in args.name]
        filters += [f"--state {','.join(sorted(states))}"] if states else []
        print(f"no runs under {shown} match {' '.join(filters)}")
    else:
        print(table(runs, metric=args.metric))
    return 0
