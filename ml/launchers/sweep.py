"""Defines sweeps: one command line that runs a grid of configs as separate runs of one experiment.

Two ways to ask for one, which combine:

- ``ml train CONFIG -m optimizer.lr=1e-3,3e-4 model.hidden=16,32`` (Hydra's multirun convention): with
  ``-m``, an override whose value has commas outside quotes and brackets is a list of choices. A
  value that holds a comma itself is quoted inside the override, ``-m 'trainer.exp_name="a,b"'``;
  a list is bracketed, ``launcher.extra_args=[--hold,--mem=4G]``, and is one value.
- a ``sweep:`` section in a YAML config: the keys to vary, each with its list of choices, dotted
  (``optimizer.lr: [1e-3, 3e-4]``) or nested (``optimizer: {lr: [1e-3, 3e-4]}``). A key also given
  on the command line takes the command line's value(s) instead.

The grid is every combination (the last key varies fastest). Each point is an ordinary run: the
command line of the sweep with that point's values as ``key=value`` overrides, its own run folder
and ``config.yaml``, resumable on its own. Every point's config is composed (so checked) before the
first one starts: a bad sweep (unknown key, a key without choices, a wrong type) is refused with one
line and nothing on disk.

``ml train`` runs the points here, one after another; ``ml launch`` gives them to the configured
launcher (:meth:`ml.launchers.base.BaseLauncher.launch_sweep`): one after another for ``single``,
``torchrun`` and ``mp``, a job array for ``slurm``. Parsing stays here, in the command line's layer:
``ml.core.compose`` only sees each point's ordinary arguments (and drops the ``sweep:`` section).
"""

import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.errors import ConfigError

SWEEP_SECTION = "sweep"
# Keys a sweep may not vary: one run folder for all points, or the launcher that runs the sweep.
_FIXED_PREFIXES = ("trainer.exp_dir", "launcher")


class SweepError(ConfigError):
    """A sweep that cannot run: a key without choices, an empty choice, a key no point may vary."""


@dataclass(frozen=True)
class Point:
    """One run of a sweep: the values of the swept keys, and the ``ml train`` arguments that run it."""

    index: int
    values: dict[str, str]
    args: list[str]

    def describe(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.values.items())


_OPENERS = {"[": "]", "{": "}", "(": ")"}


def split_choices(value: str) -> list[str]:
    """The choices of a multirun value: split at commas outside quotes and brackets.

    ``1e-3,3e-4`` -> two; ``[1,2]``, ``'a,b'``, ``"a,b"``, ``${oc.select:x,1}`` -> one each.
    """
    choices: list[str] = []
    current: list[str] = []
    closers: list[str] = []
    quote: str | None = None
    for char in value:
        if quote is not None:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in _OPENERS:
            closers.append(_OPENERS[char])
        elif closers and char == closers[-1]:
            closers.pop()
        elif char == "," and not closers:
            choices.append("".join(current))
            current = []
            continue
        current.append(char)
    choices.append("".join(current))
    return choices


def _flatten(section: Any, prefix: str, where: str) -> Iterator[tuple[str, list[Any]]]:
    """``(dotted key, choices)`` of a YAML ``sweep:`` section: a list is a key's choices."""
    if not isinstance(section, dict) or not section:
        raise SweepError(
            f"{where}: `sweep:` must map config keys to lists of values, e.g. optimizer.lr: [1e-3, 3e-4]"
        )
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, f"{name}.", where)
        elif isinstance(value, list):
            yield name, value
        else:
            raise SweepError(f"{where}: sweep key {name} needs a list of values: {name}: [{value!r}, ...]")


def _yaml_choices(config_files: list[str]) -> dict[str, list[str]]:
    """The swept keys of the files' ``sweep:`` sections (a later file's key replaces an earlier's),
    each choice written as an override value (JSON is YAML, so it reads back as the same value)."""
    from ml.core.compose import find_config_file, load_yaml

    swept: dict[str, list[str]] = {}
    for arg in config_files:
        path = find_config_file(arg)
        raw = load_yaml(path).get(SWEEP_SECTION)
        if raw is None:
            continue
        from omegaconf import OmegaConf

        section = OmegaConf.to_container(raw, resolve=False) if OmegaConf.is_config(raw) else raw
        for key, values in _flatten(section, "", str(path)):
            swept.pop(key, None)
            swept[key] = [_as_override(v) for v in values]
    return swept


def _as_override(value: Any) -> str:
    """A YAML choice written as an override value that reads back as the same value: bare where it
    reads back so (``1e-3``, ``adam``, ``${task.max_steps}``), else as JSON, which is YAML."""
    import yaml

    if isinstance(value, str) and not any(c in value for c in ",[]{}'\"\n"):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def expand(args: list[str], *, multirun: bool) -> list[Point]:
    """The points of the sweep a command line asks for (one point when it asks for none).

    Args:
        args: Config files and ``key=value`` overrides, as given to ``ml train``.
        multirun: ``-m`` was given: overrides with commas are lists of choices.

    Raises:
        SweepError: A key without choices, an empty choice, a key a sweep may not vary.
    """
    from ml.core.compose import refuse_sweep_override

    configs = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    swept = _yaml_choices(configs) if configs else {}
    fixed: list[str] = []
    for override in overrides:
        refuse_sweep_override(override)  # whole, before -m splits it into points
        key, value = _key(override), override.split("=", 1)[1]
        choices = split_choices(value) if multirun else [value]
        swept.pop(key, None)  # the command line decides this key
        if len(choices) == 1:
            fixed.append(override)
            continue
        if any(not c.strip() for c in choices):
            raise SweepError(f"sweep {override!r} has an empty choice: write {key}=a,b,... without one")
        swept[key] = choices
    for key, choices in swept.items():
        if not choices:
            raise SweepError(f"sweep key {key} has no values: give it at least one")
        if key.startswith(_FIXED_PREFIXES):
            raise SweepError(
                f"sweep key {key}: a sweep cannot vary it (its points are runs of their own, started by "
                "one launcher): give it one value"
            )
    keys = list(swept)
    points = []
    for index, combination in enumerate(itertools.product(*(swept[k] for k in keys))):
        values = dict(zip(keys, combination, strict=True))
        point_args = [*configs, *fixed, *(f"{k}={v}" for k, v in values.items())]
        points.append(Point(index, values, point_args))
    return points


def check_points(points: list[Point], *, here: bool = False) -> list[Any]:
    """Composes every point's config and checks it (unknown keys, types, missing values, and what
    ``ml train`` refuses before it claims a run folder: :func:`ml.launchers.checks.check_before_claim`;
    the device only when the points train ``here``, on this machine).

    Returns the composed configs, in order. Raises :class:`ml.errors.ConfigError` naming the point.
    """
    from omegaconf import OmegaConf

    from ml.core.compose import compose_args
    from ml.launchers.checks import check_before_claim

    configs = []
    folders: dict[str, Point] = {}  # the points' trainer.exp_dir, where given: one point a folder
    for point in points:
        try:
            config = compose_args(point.args)
            if len(points) > 1 and not OmegaConf.is_missing(config.trainer, "exp_dir"):
                folder = str(Path(str(config.trainer.exp_dir)).expanduser().resolve())
                other = folders.setdefault(folder, point)
                if other is not point:
                    raise ConfigError(
                        f"trainer.exp_dir is {folder} here and in point {other.index + 1} "
                        f"({other.describe()}): the points would train in one folder; leave it unset, "
                        "and each point gets a run folder of its own"
                    )
            if len(points) > 1:  # (one point is checked by its own run, as ml train checks)
                check_before_claim(config, device=here)
            configs.append(config)
        except ConfigError as e:
            if len(points) == 1:
                raise
            raise SweepError(f"sweep point {point.index + 1} ({point.describe()}): {e}") from e
    return configs


def run_one_after_another(points: list[Point], command: str, flags: list[str], exp_name: str) -> int:
    """Runs ``ml COMMAND`` for each point in a child process, one after another; the exit code.

    A stop signal (SIGTERM, SIGUSR1, SIGINT) is passed on to the running point, which stops with a
    checkpoint; no further point starts. A point that fails does not stop the others; the sweep
    then exits 1 naming the failed points. The children run in a process group of their own, so a
    terminal's Ctrl-C reaches them once, through this process.
    """
    from ml.run.claim import default_run_dir
    from ml.utils.signals import take_early_signal, training_began

    default_run_dir()  # said once, and every point's run goes to the same place
    stop: list[int] = []
    child: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: Any) -> None:
        del frame
        stop.append(signum)
        if child and child[-1].returncode is None:  # not waited for yet: its pid is still its own
            child[-1].send_signal(signum)

    handled = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    previous = {sig: signal.signal(sig, forward) for sig in handled}
    training_began()  # stop signals are the sweep's to pass on now: no start-up watchdog here
    early = take_early_signal()  # one that came while `ml` started: no point starts
    if early is not None:
        stop.append(early)
    failed: list[tuple[Point, int]] = []
    code = 0
    try:
        for point in points:
            if stop:
                break
            print(f"ml: sweep point {point.index + 1}/{len(points)}: {point.describe()}", file=sys.stderr)
            sys.stderr.flush()
            cmd = [sys.executable, "-m", "ml.entry", command, *point.args, *flags]
            child.append(subprocess.Popen(cmd, process_group=0))
            code = _wait(child[-1])
            if code != 0 and not stop:
                failed.append((point, code))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop:
        left = len(points) - len(child)
        name = signal.Signals(stop[0]).name
        print(f"ml: sweep stopped by {name}; {left} of {len(points)} points not started", file=sys.stderr)
        return code
    if failed:
        which = "; ".join(f"{p.index + 1} ({p.describe()}): exit {c}" for p, c in failed)
        print(f"ml: sweep: {len(failed)} of {len(points)} points failed: {which}", file=sys.stderr)
        return 1
    hint = compare_hint(points, exp_name)
    print(f"ml: sweep of {len(points)} runs done; compare them: {hint}", file=sys.stderr)
    return 0


def _wait(process: "subprocess.Popen[bytes]") -> int:
    while True:
        try:
            return process.wait()
        except InterruptedError:  # pragma: no cover - Python retries waits itself (PEP 475)
            continue


def compare_hint(points: list[Point], exp_name: str) -> str:
    """The ``ml runs`` command line that shows the points side by side, with their swept values."""
    import shlex

    where = shlex.quote(os.path.join(os.environ.get("RUN_DIR", "runs"), exp_name))
    keys = ",".join(points[0].values)
    return f"ml runs {where} --config {shlex.quote(keys)}" if keys else f"ml runs {where}"
