"""Defines ``ml plot EXP_DIR [EXP_DIR ...] -o plot.png``: curves of chosen metrics from ``metrics.jsonl``.

Each EXP_DIR is a run folder (``<RUN_DIR>/<exp_name>/run_<N>``, or one given as
``trainer.exp_dir``, read from its log folder's ``metrics.jsonl``) or a folder of runs (then all
its runs that have that file; :func:`ml.run.layout.find_runs`). The plot has one subplot per metric
(``--metric train/loss --metric valid/loss``; by default ``train/loss`` and ``valid/loss`` or the
first other ``valid/`` metric, and for reinforcement learning the episode returns), each run a
curve of its own colour labelled ``<exp_name>/run_<N>`` (with ``--config optimizer.lr``, followed by
the run's value of that config key: a sweep's runs told apart). The x axis is the step, or with
``--x time`` the run's training time (``elapsed_s``) in seconds, minutes or hours as fits.

A curve holds the records of one phase. A key logged without a phase prefix (``model/mean`` that a
model logs in its forward pass, ``task/acc`` of a task's own namespace) can be in the records of
several phases: its subplot then has a curve per run and phase, as TensorBoard overlays its
``train`` and ``valid`` runs, labelled ``<run> (train)``, ``<run> (valid)`` (the run's colour; a
line style per phase). ``--metric valid:model/mean`` plots one phase's records only
(:class:`ml.tools.experiments.MetricChoice`). Keys with a phase prefix (``train/loss``) are in their
phase's records alone, so they plot as before.

Reading follows the writer (:mod:`ml.loggers.jsonl`): a last line cut short by a kill is skipped;
when a phase and step appear twice (a run resumed before its logs were trimmed) the later record
wins; non-finite values (written as ``"nan"``, ``"inf"``) leave gaps. The records are read here,
not with :func:`ml.loggers.jsonl.read_metrics`, because importing the logger module imports torch,
which would more than double the command's time.

The image is PNG or SVG, chosen by the output's suffix, ``--width`` by ``--height`` pixels (the PNG
has exactly that size). It is written to a temporary file that then replaces the output, so no
half-written image is ever left. An existing file is overwritten only with ``--force``, as with
``ml export``: a command must not destroy what is on disk by a slip of the name. Everything is
checked before anything is drawn. matplotlib is imported only here, drawing with the Agg backend
(no display needed); without it the command says what to install.
"""

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml.run.layout import METRICS_FILE, RunDir, is_run
from ml.run.layout import find_runs as runs_under
from ml.tools import tool_parser
from ml.tools.experiments import MetricChoice, metric_value, parse_record, phase_order, record_step
from ml.utils.atomic import open_regular

FORMATS = {".png": "png", ".svg": "svg"}
DPI = 100
DEFAULT_WIDTH, DEFAULT_HEIGHT = 1000, 600
MIN_PIXELS, MAX_PIXELS = 200, 10000
MARKERS_UP_TO = 60  # curves with this few points (validation) also mark each point
PHASE_STYLES = {"train": "-", "valid": "--", "test": ":"}  # where a subplot shows several phases
DEFAULT_TRAIN_METRIC = "train/loss"
DEFAULT_RL_METRICS = ("rl/episode_return", "rl/eval_return")  # what an RL run is judged by
INSTALL_HINT = "ml plot needs matplotlib: pip install 'ml-trainer[plot]'"


@dataclass
class Run:
    """One run's records: ``(phase, step)`` to the last record written for it."""

    path: Path
    label: str
    records: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    skipped_lines: int = 0

    def metric_names(self) -> list[str]:
        """The metrics the run logged, in the order they first appear."""
        names: dict[str, None] = {}
        for record in self.records.values():
            names.update(dict.fromkeys(record["metrics"]))
        return list(names)

    def phases_of(self, metric: str) -> list[str]:
        """The phases whose records hold ``metric``, in the order train, valid, test."""
        return phase_order(
            {phase for (phase, _), record in self.records.items() if metric in record["metrics"]}
        )

    def curve(self, metric: str, x: str, phase: str | None = None) -> tuple[list[float], list[float]]:
        """The metric's points in ``phase``'s records, in step order: x (step or elapsed seconds)
        and y (NaN for inf). ``phase`` may be left out for a metric that one phase alone logged.

        Raises:
            ValueError: ``phase`` is left out, and the records of several phases hold ``metric``.
        """
        if phase is None:
            phases = self.phases_of(metric)
            if len(phases) > 1:
                raise ValueError(f"{metric} is logged in the {' and '.join(phases)} records: name the phase")
            phase = phases[0] if phases else None
        xs: list[float] = []
        ys: list[float] = []
        for (record_phase, step), record in sorted(self.records.items(), key=lambda item: item[0][1]):
            if record_phase != phase or metric not in record["metrics"]:
                continue
            xs.append(float(step) if x == "step" else _number(record.get("elapsed_s")))
            value = _number(record["metrics"][metric])
            ys.append(value if math.isfinite(value) else math.nan)
        return xs, ys


def _bad_input(message: str) -> Exception:
    from ml.errors import BadInput

    return BadInput(message)


def _number(value: Any) -> float:
    """A logged value as a float (see :func:`metric_value`); anything else is a gap (NaN)."""
    number = metric_value(value)
    return math.nan if number is None else number


def read_run(run_dir: Path, label: str) -> Run:
    """Reads ``run_dir``'s ``metrics.jsonl``; later records of a phase and step replace earlier ones.

    A last line without its newline (a kill while writing) is skipped silently; other lines that
    are not records are skipped and counted.
    """
    run = Run(path=run_dir, label=label)
    with open_regular(RunDir.of(run_dir).metrics) as f:
        for line in f:
            if not line.strip():
                continue
            record = parse_record(line)
            step = None if record is None else record_step(record)
            if record is None or step is None:
                run.skipped_lines += line.endswith(b"\n")  # no newline: cut short by a kill, not garbled
                continue
            run.records[(str(record.get("phase", "train")), step)] = record
    return run


def _has_metrics(path: Path) -> bool:
    return RunDir.of(path).metrics.is_file()


def find_runs(arg: str) -> list[Path]:
    """The run folders an argument names: the run itself, or every run of a folder of runs.

    Raises:
        BadInput: The folder does not exist, or is neither a run with a ``metrics.jsonl`` nor a
            folder of such runs.
    """
    path = Path(arg).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise _bad_input(
            f"{arg} {what}: give a run folder (<RUN_DIR>/<exp_name>/run_<N>) or an experiment folder"
        )
    if _has_metrics(path):
        return [path.resolve()]
    runs = [] if is_run(path) else [run for _, run in runs_under(path)]
    with_metrics = [p.resolve() for p in runs if _has_metrics(p)]
    if with_metrics:
        return with_metrics
    if runs:
        raise _bad_input(
            f"{arg}: none of its runs has logs/{METRICS_FILE} (add {{name: jsonl}} to the loggers)"
        )
    raise _bad_input(
        f"{arg} is not a run folder (no logs/{METRICS_FILE} in it) "
        "nor an experiment folder holding run_<N> folders"
    )


def _labels(paths: Sequence[Path]) -> list[str]:
    """``<exp_name>/run_<N>`` for each run; the whole path where two runs would share a label."""
    short = [f"{p.parent.name}/{p.name}" for p in paths]
    return [s if short.count(s) == 1 else str(p) for s, p in zip(short, paths, strict=True)]


def default_metrics(available: Sequence[str]) -> list[str]:
    """``train/loss`` and one validation metric (``valid/loss`` if logged), of those available;
    for a reinforcement-learning run, its training and evaluation episode returns."""
    chosen = [DEFAULT_TRAIN_METRIC] if DEFAULT_TRAIN_METRIC in available else []
    valid = [name for name in available if name.startswith("valid/")]
    if valid:
        chosen.append("valid/loss" if "valid/loss" in valid else valid[0])
    chosen = chosen or [name for name in DEFAULT_RL_METRICS if name in available]
    return chosen or list(available[:1])


def _time_unit(max_seconds: float) -> tuple[str, float]:
    """The unit that keeps the time axis readable, and the seconds it holds."""
    if not math.isfinite(max_seconds) or max_seconds <= 120:
        return "s", 1.0
    if max_seconds <= 120 * 60:
        return "min", 60.0
    return "h", 3600.0


def _check_output(arg: str, force: bool) -> tuple[Path, str]:
    out = Path(arg).expanduser()
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise _bad_input(f"-o {arg}: the output must end in .png or .svg")
    if out.is_dir():
        raise _bad_input(f"-o {arg} is a folder: name the image file, e.g. {out / 'plot.png'}")
    if not out.parent.is_dir():
        raise _bad_input(f"-o {arg}: the folder {out.parent} does not exist")
    if out.exists() and not force:
        raise _bad_input(f"{arg} exists; add --force to overwrite it")
    return out, fmt


def _parser() -> argparse.ArgumentParser:
    parser = tool_parser("plot", "Curves of chosen metrics from the runs' metrics.jsonl, as PNG or SVG.")
    parser.add_argument("exp_dirs", nargs="+", metavar="EXP_DIR", help="run folders or experiment folders")
    parser.add_argument(
        "--metric",
        action="append",
        metavar="[PHASE:]NAME",
        help="a metric to plot, e.g. train/loss (repeat for several; default: train/loss and valid/loss, "
        "or an RL run's episode returns); PHASE:NAME (train, valid or test) plots that phase's records "
        "only, e.g. valid:model/mean",
    )
    parser.epilog = (
        "Each curve holds one phase's records. A key logged without a phase prefix (model/mean, "
        "task/acc) in the records of several phases gets a curve per run and phase in its subplot, "
        "labelled '<run> (train)', '<run> (valid)'; --metric valid:model/mean shows one phase alone."
    )
    parser.add_argument("--x", choices=("step", "time"), default="step", help="the x axis (default: step)")
    parser.add_argument("-o", "--output", required=True, help="the image file: .png or .svg")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH, help=f"pixels (default {DEFAULT_WIDTH})")
    parser.add_argument(
        "--height", type=int, default=DEFAULT_HEIGHT, help=f"pixels (default {DEFAULT_HEIGHT})"
    )
    parser.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY",
        help="add each run's value of this config key to its label, e.g. optimizer.lr (repeatable, or "
        "comma-separated): a sweep's runs told apart",
    )
    return parser


def main(argv: list[str]) -> int:
    """``ml plot``: reads the runs, checks everything, then draws and writes the image."""
    ns = _parser().parse_args(argv)
    out, fmt = _check_output(ns.output, ns.force)
    for name, pixels in (("--width", ns.width), ("--height", ns.height)):
        if not MIN_PIXELS <= pixels <= MAX_PIXELS:
            raise _bad_input(f"{name} {pixels}: give a size from {MIN_PIXELS} to {MAX_PIXELS} pixels")
    paths = list(dict.fromkeys(p for arg in ns.exp_dirs for p in find_runs(arg)))
    labels = _labels(paths)
    keys = [k.strip() for value in ns.config for k in value.split(",") if k.strip()]
    if keys:  # the values a sweep varied, in the legend
        from ml.tools.runs import config_cell, config_values

        labels = [
            " ".join([label, *(f"{k}={config_cell(v)}" for k, v in config_values(path, keys).items())])
            for label, path in zip(labels, paths, strict=True)
        ]
    runs = [read_run(path, label) for path, label in zip(paths, labels, strict=True)]
    for run in runs:
        if run.skipped_lines:
            where = RunDir.of(run.path).metrics
            print(
                f"ml plot: skipped {run.skipped_lines} line(s) of {where}: not metric records",
                file=sys.stderr,
            )
    available = list(dict.fromkeys(name for run in runs for name in run.metric_names()))
    if not available:
        raise _bad_input(f"no metrics logged yet in {', '.join(str(p) for p in paths)}")
    chosen = list(dict.fromkeys(ns.metric)) if ns.metric else default_metrics(available)
    metrics = list(dict.fromkeys(MetricChoice.parse(text) for text in chosen))
    missing = [str(m) for m in metrics if not any(_phases(run, m) for run in runs)]
    if missing:
        raise _bad_input(
            f"no run logged {', '.join(missing)}; available: {', '.join(_listing(runs, available))}"
        )
    figure = _draw(runs, metrics, ns.x, ns.width, ns.height)
    _save(figure, out, fmt)
    print(f"{out}: {', '.join(map(str, metrics))} of {len(runs)} run(s)")
    return 0


def _phases(run: Run, metric: MetricChoice) -> list[str]:
    """The phases of ``run`` whose records give ``metric`` a curve."""
    phases = run.phases_of(metric.name)
    return phases if metric.phase is None else [p for p in phases if p == metric.phase]


def _listing(runs: Sequence[Run], available: Sequence[str]) -> list[str]:
    """The metrics to choose from: each name, then ``PHASE:NAME`` where several phases logged it."""
    listed = []
    for name in available:
        phases = phase_order({phase for run in runs for phase in run.phases_of(name)})
        listed += [name] + ([f"{phase}:{name}" for phase in phases] if len(phases) > 1 else [])
    return listed


def _draw(runs: Sequence[Run], metrics: Sequence[MetricChoice], x: str, width: int, height: int) -> Any:
    """A figure of ``width`` x ``height`` pixels, one subplot per metric, a curve per run (and per
    phase, where the metric is logged in several)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise _bad_input(INSTALL_HINT) from e

    # Per subplot: the phases it shows (of all runs), and each run's curve of each.
    shown = {m: phase_order({p for run in runs for p in _phases(run, m)}) for m in metrics}
    curves = {
        (run.label, m, phase): run.curve(m.name, x, phase)
        for run in runs
        for m in metrics
        for phase in shown[m]
    }
    unit, scale = "step", 1.0
    if x == "time":
        seconds = [v for xs, _ in curves.values() for v in xs if math.isfinite(v)]
        unit, scale = _time_unit(max(seconds, default=0.0))
    # A hair over the size: Agg truncates the figure's size in pixels to whole ones.
    figure = Figure(figsize=((width + 0.01) / DPI, (height + 0.01) / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # drawn without pyplot, so without a display or global state
    ncols = 1 if len(metrics) <= 3 else 2
    nrows = -(-len(metrics) // ncols)
    axes = figure.subplots(nrows, ncols, squeeze=False).flatten()
    for index, (ax, metric) in enumerate(zip(axes, metrics, strict=False)):
        if index > 0:  # one x range for all, so that validation lines up with training
            ax.sharex(axes[0])
        if x == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        phases = shown[metric]
        for number, run in enumerate(runs):
            for phase in phases:
                xs, ys = curves[(run.label, metric, phase)]
                if not xs:
                    continue
                marker = "o" if len(xs) <= MARKERS_UP_TO else None
                ax.plot(
                    [v / scale for v in xs],
                    ys,
                    color=f"C{number % 10}",
                    linestyle=PHASE_STYLES.get(phase, "-.") if len(phases) > 1 else "-",
                    label=f"{run.label} ({phase})" if len(phases) > 1 else run.label,
                    marker=marker,
                    markersize=3,
                )
        ax.set_title(str(metric))
        ax.grid(alpha=0.3)
        if index + ncols >= len(metrics):  # the lowest subplot of its column
            ax.set_xlabel("step" if x == "step" else f"time ({unit})")
        if ax.has_data():
            ax.legend(fontsize="small")
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    return figure


def _save(figure: Any, out: Path, fmt: str) -> None:
    """Writes the image through a temporary file that replaces ``out`` once complete."""
    import matplotlib

    from ml.utils.atomic import atomic_open

    # SVG keeps its text as text (searchable, editable) and no date (the same plot, the same file).
    with matplotlib.rc_context({"svg.fonttype": "none"}), atomic_open(out, "wb") as f:
        figure.savefig(f, format=fmt, dpi=DPI, metadata={"Date": None} if fmt == "svg" else None)
