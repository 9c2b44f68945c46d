"""Defines the ``ml`` command.

``ml train CONFIG... [key=value...]`` composes the config, builds the components, claims the run
directory and trains; ``ml launch`` does the same through the configured launcher (``single``,
``torchrun``, ``mp``, ``slurm``); ``ml resolve`` prints the composed config; ``ml stage`` prepares a
run folder (config and a copy of the code) for a job to train later. With ``-m`` (or a ``sweep:``
section in the YAML) ``train``, ``launch`` and ``stage`` run a grid of configs
(:mod:`ml.launchers.sweep`). A run folder with staged code (``ml stage``, the Slurm launcher) is
trained with that code (:mod:`ml.launchers.stage`).

The command line is the top of the import graph: nothing under ``ml`` imports this module. ``ml
train`` is :func:`ml.launchers.single.train_in_process` (also on every rank of a torchrun or srun
job); the commands for living with runs are ``ml.tools.<name>.main``.

Bad input (bad YAML, unknown key, wrong type, missing value or file, unknown component, a damaged
checkpoint, a run another process trains: any :class:`ml.errors.UserError`) stops before anything
is created on disk with one line and exit code 2; ``--debug`` shows the traceback. Exit codes: 0
done or stopped cleanly with a checkpoint, 1 failure during training, 2 bad input, 130 interrupted.
"""

import argparse
import errno
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

from ml.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    BadInput,
    TrainingFailure,
    UserError,
    first_line,
)
from ml.tools import TOOLS, ArgumentParser

USAGE = """\
ml train CONFIG [CONFIG ...] [key=value ...]   train (a run's config.yaml continues that run)
ml launch CONFIG [CONFIG ...] [key=value ...]  train through launcher.name: single, torchrun, mp, slurm
ml resolve CONFIG [CONFIG ...] [key=value ...] print the composed config
ml stage CONFIG [CONFIG ...] [key=value ...]   a run folder with the config and a copy of the code in
                                               the current directory; `ml train RUN/config.yaml`
                                               (a job, later) trains with that copy; prints the folder
ml COMMAND --help                              the config fields, with help texts

ml runs [RUN_DIR]                              the experiments under RUN_DIR: state, step, metrics
ml plot EXP_DIR [EXP_DIR ...] -o plot.png      curves of chosen metrics from metrics.jsonl
ml diff EXP_A EXP_B                            the config differences between two runs
ml export EXP_DIR -o model.safetensors         the model weights and config; ml.load_model reads them
ml tensorboard EXP_DIR [EXP_DIR ...]           TensorBoard on 127.0.0.1, on a free port

--allow-config-change  continue a run although its model, optimizer, data, batch size, seed or
                       number of processes changed since its checkpoint (the diff is kept in
                       <run>/config_changes.log); without it such a change stops with exit code 2
-m, --multirun         a sweep: key=a,b,... overrides are lists of choices; every combination is a
                       run of its own (train: one after another here; launch: through the launcher,
                       a job array for slurm). Quote a value that holds a comma: 'key="a,b"'
--debug                show tracebacks

CONFIG is a YAML file or a packaged config name (e.g. `digits`); files merge in order, then the
key=value overrides; a `sweep:` section in a YAML file is a sweep too (key: [choices]). Runs go to
$RUN_DIR/<exp_name>/run_<N> ($RUN_DIR defaults to ./runs).
"""


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=f"ml {command}" if command else "ml", usage=USAGE, add_help=False, allow_abbrev=False
    )
    parser.add_argument("command", nargs="?", choices=["train", "launch", "resolve", "stage"])
    parser.add_argument("args", nargs="*", help="config files and key=value overrides")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-m", "--multirun", action="store_true", help="a sweep: key=a,b,... are choices")
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="continue a run although its model, optimizer, data, batch size, seed or process count changed",
    )
    return parser


def _print_help(command: str | None, args: list[str]) -> int:
    print(USAGE)
    if command is None:  # the overview: the names alone, without importing a component (or torch)
        from ml.core.registry import BUILTIN_NAMES

        print("Built-in components (`name:` in each config section):")
        for kind, builtin in BUILTIN_NAMES.items():
            print(f"  {kind + ':':<14}{', '.join(builtin)}")
        print("\n`ml train --help` lists every config field with its help text; `ml train CONFIG --help`")
        print("only the fields of the components CONFIG selects.")
        return EXIT_OK

    from ml.core.compose import SECTIONS, compose_config, config_fields
    from ml.core.registry import lookup, registered_names

    configs = [a for a in args if "=" not in a]
    # Each section's component, and the values that apply: the config's when one is given.
    chosen: dict[str, list[tuple[str, Any]]] = {}
    if command is not None and configs:
        root = compose_config(configs, [a for a in args if "=" in a])
        for section in SECTIONS:
            nodes = root[section] if section == "logger" else [root[section]]
            chosen[section] = [(str(node.name), node) for node in nodes]
    else:
        print("Give a config to see only the components it selects, with the values it gives them.\n")
        chosen = {
            section: [(name, None) for name in registered_names(kind)] for section, kind in SECTIONS.items()
        }
    for section, components in chosen.items():
        given = section == "logger" and components[:1] != [] and components[0][1] is not None
        where = [f"{section}[{i}]" for i in range(len(components))] if given else [section] * len(components)
        for (name, node), label in zip(components, where, strict=True):
            _, config_cls = lookup(SECTIONS[section], name)
            print(f"{label}: {name}  ({config_cls.__name__})")
            for field, type_name, default, help_text in config_fields(config_cls):
                value = default if node is None else _value_in(node, field)
                print(f"  {label}.{field}: {type_name} = {value}\n      {help_text}")
            print()
    return EXIT_OK


def _value_in(node: Any, field: str) -> str:
    """A field's value in a composed section: resolved where it can be, else as written."""
    from omegaconf import OmegaConf

    parent_key, _, leaf = field.rpartition(".")
    parent = OmegaConf.select(node, parent_key) if parent_key else node
    if OmegaConf.is_missing(parent, leaf):
        return "???"
    try:
        return str(OmegaConf.select(node, field))
    except Exception:  # an interpolation that resolves only later
        raw: Any = OmegaConf.to_container(parent, resolve=False)
        return str(raw[leaf])


def _rank() -> int:
    from ml.utils.ranks import dist_env

    try:
        return dist_env().rank
    except UserError:  # a launcher's environment that does not fit: reported where it is read
        return 0


def _setup_logging() -> None:
    rank = _rank()
    # Other ranks than 0 report only warnings and errors, tagged with their rank.
    tag = f" rank {rank}" if rank else ""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(levelname).1s %(asctime)s{tag} %(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )


def _resolve(args: list[str], *, multirun: bool) -> int:
    """Prints the composed config; for a sweep, every point's, each under a comment naming it."""
    from omegaconf import OmegaConf

    from ml.launchers.sweep import check_points, expand

    points = expand(args, multirun=multirun)
    for point, config in zip(points, check_points(points), strict=True):
        if point.values:
            print(f"# sweep point {point.index + 1}/{len(points)}: {point.describe()}")
        print(OmegaConf.to_yaml(config, resolve=True), end="")
    return EXIT_OK


def _launch(args: list[str], flags: list[str]) -> int:
    from ml.core.compose import build_launcher, compose_args

    root = compose_args(args)
    launcher = build_launcher(root)
    return launcher.launch([*args, *flags], root)


def _sweep(command: str, args: list[str], *, multirun: bool, flags: list[str]) -> int | None:
    """Runs the sweep the arguments ask for; None when they ask for one run (the usual path)."""
    from ml.launchers.sweep import check_points, expand, run_one_after_another

    points = expand(args, multirun=multirun)
    if len(points) == 1 and not points[0].values:
        return None
    configs = check_points(points, here=command == "train")  # every point checked before anything is made
    if len(points) == 1:
        return _one(command, points[0].args, flags)
    launcher = configs[0].launcher
    if command == "stage":
        from ml.launchers.stage import stage_runs

        return stage_runs(configs)
    if command == "launch":
        from ml.core.compose import build_launcher

        return int(build_launcher(configs[0]).launch_sweep(points, configs, flags))
    if launcher.name != "single":
        logging.getLogger("ml").warning(
            "ml train runs the sweep here, one run after another; `ml launch` runs it through "
            "launcher.name=%s",
            launcher.name,
        )
    return run_one_after_another(points, "train", flags, str(configs[0].trainer.exp_name))


def _one(command: str, args: list[str], flags: list[str]) -> int:
    if command == "launch":
        return _launch(args, flags)
    if command == "stage":
        from ml.core.compose import compose_args
        from ml.launchers.stage import stage_runs

        return stage_runs([compose_args(args)])
    from ml.launchers.single import train_in_process

    return train_in_process(args, allow_config_change="--allow-config-change" in flags)


def _prog() -> str:
    """``ml``, or ``ml[rank N]`` on the other processes of a distributed job."""
    rank = _rank()
    return f"ml[rank {rank}]" if rank else "ml"


_DISK_ERRNOS = {
    errno.ENOSPC,
    errno.EFBIG,
    errno.EROFS,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
    errno.EMFILE,  # too many open files: the process's limit (ulimit -n)
    errno.ENFILE,  # the system's
}


def _failure_line(e: BaseException) -> str | None:
    """One line for a failure of training that is no bug to trace, or None for any other error: a
    :class:`~ml.errors.TrainingFailure` (its message names the cause and the fix), or a write the
    disk refused (which, and why)."""
    if isinstance(e, TrainingFailure):
        return first_line(e)
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
        where = f" {e.filename}" if e.filename else ""
        verb = "open" if e.errno in (errno.EMFILE, errno.ENFILE) else "write"
        return f"cannot {verb}{where}: {e.strerror}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ml`` console command; returns the exit code.

    A process that was one rank of a distributed job ends here with ``os._exit`` once its output
    is flushed: the interpreter's own teardown can abort inside the C++ of a process group that a
    lingering module still references ("terminate called without an active exception").
    """
    code = _main(argv)
    if _left_a_process_group:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    return code


_left_a_process_group = False


def _main(argv: list[str] | None) -> int:
    from ml.utils.signals import listen_early, restore

    early = listen_early()  # a SIGTERM or SIGUSR1 while starting up is kept for the trainer
    try:
        return _run(argv)
    finally:
        restore(early)


EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool that SIGPIPE ended


def _to_stdout(command: Callable[[], int]) -> int:
    """Runs a command whose output is its stdout (a tool, a help text, ``ml resolve``, the folders
    ``ml stage`` made, the job ``ml launch`` submitted): a reader that leaves early (``ml runs
    --json | head``) took what it wanted, so the command ends quietly with the shell's code for a
    command SIGPIPE ended, not with a traceback and "training failed"."""
    try:
        code = command()
        if sys.stdout is not None:  # (None: started with stdout closed, `ml --help >&-`)
            sys.stdout.flush()  # here, not at the interpreter's exit, where a closed pipe is "ignored" as 120
        return code
    except BrokenPipeError:
        from ml.utils.progress import drop_stream

        drop_stream(sys.stdout)
        return EXIT_BROKEN_PIPE


def _run(argv: list[str] | None) -> int:
    global _left_a_process_group
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    debug = "--debug" in argv
    saved_env = {key: os.environ.get(key) for key in ("RUN_DIR", "ML_EXP_NAME")}
    try:
        if argv and argv[0] in TOOLS:
            import importlib

            tool = importlib.import_module(f"ml.tools.{argv[0]}")
            return _to_stdout(lambda: int(tool.main(argv[1:])))
        ns = parser.parse_intermixed_args(argv)  # options anywhere: `ml train digits -m a=1,2`
        if ns.help:
            return _to_stdout(lambda: _print_help(ns.command, ns.args))
        if ns.command is None:
            raise BadInput("give a command: `ml train ...` or `ml resolve ...` (see `ml --help`)")
        _setup_logging()
        from ml.launchers.stage import use_staged_code

        use_staged_code(ns.args)  # before any of the user's modules is imported
        if ns.command == "resolve":
            return _to_stdout(lambda: _resolve(ns.args, multirun=ns.multirun))
        flags = ["--allow-config-change"] if ns.allow_config_change else []

        def command() -> int:
            swept = _sweep(ns.command, ns.args, multirun=ns.multirun, flags=flags)
            return swept if swept is not None else _one(ns.command, ns.args, flags)

        # `ml stage` prints the staged folders and `ml launch` a Slurm job's id, for scripts to read
        return _to_stdout(command) if ns.command in ("stage", "launch") else command()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # more Ctrl-C while shutting down changes nothing
        print("ml: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            traceback.print_exc()
        first = first_line(e)
        if isinstance(e, UserError):
            print(f"{_prog()}: error: {first}", file=sys.stderr)
            return e.exit_code
        known = _failure_line(e)
        if known is not None:  # not a bug to trace: the disk refused a write, or the numbers blew up
            print(f"{_prog()}: training failed: {known}", file=sys.stderr)
            return EXIT_FAILURE
        if not debug:
            traceback.print_exc()
        print(f"{_prog()}: training failed: {type(e).__name__}: {first}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if "torch.distributed" in sys.modules:
            from ml.utils.distributed import destroy_distributed, is_initialized

            _left_a_process_group = _left_a_process_group or is_initialized()
            destroy_distributed()
        for key, value in saved_env.items():  # the defaults this command set do not outlive it
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


if __name__ == "__main__":
    sys.exit(main())
