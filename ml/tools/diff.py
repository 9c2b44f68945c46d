"""Defines ``ml diff EXP_A EXP_B``: the config differences between two runs.

Each argument is a run folder (its ``config.yaml``, the resolved config the run was trained with)
or a config YAML file, which is compared as it composes (every default filled in, as a run of it
would save it in its ``config.yaml``; a ``sweep:`` grid as written), so a run and the file it was
trained from differ only in what the command line changed, and ``1e-3`` is ``0.001``; a file that
does not compose on its own (a layer of overrides) is compared as written, and its header says so
and why. The configs are compared like the trainer compares a continued run's config
(:func:`ml.core.diff.config_changes`, the walk behind ``ml.trainers.base.diff_configs``: keys and
list items at any depth, ``1`` vs ``1.0`` and ``true`` vs ``1`` differ), one line each::

    --- runs/digits/run_0/config.yaml
    +++ runs/digits/run_1/config.yaml
      optimizer.lr: 0.001 -> 0.0003
    - task.extra: 3  (only in A)
    + logger[2]: {name: tensorboard, flush_every_n_seconds: 30}  (only in B)

``trainer.exp_dir`` (each run's own folder, different for any two runs) is left out unless
``--all``. Old values are red and new ones green when stdout is a terminal and ``NO_COLOR`` is
unset or empty (``--color always|never`` decides otherwise).

Exit codes follow diff(1), so scripts can test ``ml diff A B``: 0 no differences (``no
differences`` is printed), 1 the configs differ, 2 bad input (a path that is no run folder or
config file, a config that is not YAML). Imports no torch for two runs (composing a file loads the
components it names, and so torch).
"""

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from ml.run.layout import run_number
from ml.tools import tool_parser

EXIT_SAME, EXIT_DIFFERENT = 0, 1
IGNORED_BY_DEFAULT = ("trainer.exp_dir",)
_RED, _GREEN, _RESET = "\x1b[31m", "\x1b[32m", "\x1b[0m"


def config_path_of(arg: str) -> Path:
    """The config file an argument names: a run folder's ``config.yaml``, or the file itself.

    Raises:
        BadInput: The path does not exist, or is a folder without ``config.yaml``.
    """
    from ml.errors import BadInput

    path = Path(arg).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise BadInput(f"no such run folder or config file: {arg}")
    if (path / "config.yaml").is_file():
        return path / "config.yaml"
    runs = sorted((p for p in path.glob("run_*") if (p / "config.yaml").is_file()), key=run_number)
    if runs:
        raise BadInput(f"{arg} holds runs, not one run: give one of them, e.g. {runs[-1]}")
    raise BadInput(f"{arg} is not a run folder (no config.yaml in it); give a run folder or a config file")


def _load(path: Path) -> tuple[Any, str]:
    """The config ``path`` holds, and how it was read (for the header): a run's as saved (resolved
    already), a file as it composes, or as written where it does not compose on its own."""
    from ml.core.compose import load_yaml
    from ml.errors import BadInput, ConfigError
    from ml.run.layout import holds_run_files

    try:
        written = load_yaml(path)
    except ConfigError as e:
        raise BadInput(str(e)) from e
    if path.name == "config.yaml" and holds_run_files(path.parent):
        return written, ""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ml.core.compose import compose_config, config_to_save

    try:  # as a run would save it in its config.yaml
        composed = OmegaConf.to_container(config_to_save(compose_config([str(path)])), resolve=False)
    except (ConfigError, OmegaConfBaseException) as e:  # a layer of overrides, an unknown component
        return written, f"  (as written: {str(e).splitlines()[0]})"
    if "sweep" in written and isinstance(composed, dict):  # a grid: composing drops it (one run's config)
        composed["sweep"] = OmegaConf.to_container(written.sweep, resolve=False)
    return composed, "  (composed)"


def _show(value: Any) -> str:
    """A value on one line: scalars as the trainer's diff shows them, containers in YAML flow style."""
    from ml.core.diff import format_value

    if isinstance(value, (dict, list)) and value:
        import yaml

        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=math.inf)
        return " ".join(text.split("\n")).strip()
    return format_value(value)


def use_color(choice: str, stream: Any = None) -> bool:
    """Whether to colour: ``always``, ``never``, or ``auto`` (a terminal, and ``NO_COLOR`` unset or empty)."""
    if choice != "auto":
        return choice == "always"
    stream = sys.stdout if stream is None else stream
    return bool(stream.isatty()) and not os.environ.get("NO_COLOR")


def diff_lines(first: Any, second: Any, *, color: bool, ignore: tuple[str, ...] = ()) -> list[str]:
    """The lines ``ml diff`` prints for two configs (without the header); empty when they agree."""
    from ml.core.diff import ABSENT, config_changes

    def _absent(value: Any) -> bool:  # `???` (missing) counts as absent, as in diff_configs
        return isinstance(value, str) and value == ABSENT

    def paint(text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if color else text

    lines = []
    for change in config_changes(first, second):
        if change.path in ignore:
            continue
        if _absent(change.new):
            lines.append(paint(f"- {change.path}: {_show(change.old)}  (only in A)", _RED))
        elif _absent(change.old):
            lines.append(paint(f"+ {change.path}: {_show(change.new)}  (only in B)", _GREEN))
        else:
            old, new = paint(_show(change.old), _RED), paint(_show(change.new), _GREEN)
            lines.append(f"  {change.path}: {old} -> {new}")
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "diff",
        "The config differences between two runs. Exit code 0: no differences, 1: they differ, "
        "2: bad input (like diff(1)).",
    )
    parser.add_argument("exp_a", metavar="EXP_A", help="a run folder (its config.yaml) or a config file")
    parser.add_argument("exp_b", metavar="EXP_B", help="a run folder (its config.yaml) or a config file")
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour old values red and new ones green (auto: on a terminal, unless NO_COLOR is set)",
    )
    parser.add_argument(
        "--all", action="store_true", help="also show trainer.exp_dir (each run's own folder)"
    )
    return parser


def main(argv: list[str]) -> int:
    """``ml diff EXP_A EXP_B``: prints the differences; returns 0 when none, 1 when some."""
    args = _parser().parse_args(argv)
    path_a, path_b = config_path_of(args.exp_a), config_path_of(args.exp_b)
    (first, read_a), (second, read_b) = _load(path_a), _load(path_b)
    ignore = () if args.all else IGNORED_BY_DEFAULT
    lines = diff_lines(first, second, color=use_color(args.color), ignore=ignore)
    if not lines:
        print("no differences")
        return EXIT_SAME
    print(f"--- {path_a}{read_a}")
    print(f"+++ {path_b}{read_b}")
    print("\n".join(lines))
    return EXIT_DIFFERENT
