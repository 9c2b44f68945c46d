"""Defines the ``ml`` command.

``ml train CONFIG... [key=value...]`` composes the config, builds the components, claims the run
directory and trains; ``ml launch`` does the same through the configured launcher (``single``,
``torchrun``, ``slurm``); ``ml resolve`` prints the composed config.

Started as one of several processes (by torchrun, or by ``srun`` in a Slurm job), ``ml train`` first
joins the job's process group; rank 0 alone claims the run directory and tells the others.

Bad input (bad YAML, unknown key, wrong type, missing value or file, unknown component) stops
before anything is created on disk with one line and exit code 2; ``--debug`` shows the traceback.
Exit codes: 0 done or stopped cleanly with a checkpoint, 1 failure during training, 2 bad input,
130 interrupted.
"""

import argparse
import errno
import logging
import os
import shutil
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

USAGE = """\
ml train CONFIG [CONFIG ...] [key=value ...]   train (a run's config.yaml continues that run)
ml launch CONFIG [CONFIG ...] [key=value ...]  train through launcher.name: single, torchrun, slurm
ml resolve CONFIG [CONFIG ...] [key=value ...] print the composed config
ml COMMAND --help                              the config fields, with help texts

ml runs [RUN_DIR]                              the experiments under RUN_DIR: state, step, metrics
ml plot EXP_DIR [EXP_DIR ...] -o plot.png      curves of chosen metrics from metrics.jsonl
ml diff EXP_A EXP_B                            the config differences between two runs
ml export EXP_DIR -o model.safetensors         the model weights and config; ml.load_model reads them
ml tensorboard EXP_DIR [EXP_DIR ...]           TensorBoard on 127.0.0.1, on a free port

--allow-config-change  continue a run although its model, optimizer, data, batch size, seed or
                       number of processes changed since its checkpoint (the diff is kept in
                       <run>/config_changes.log); without it such a change stops with exit code 2
--debug                show tracebacks

CONFIG is a YAML file or a packaged config name (e.g. `digits`); files merge in order, then the
key=value overrides. Runs go to $RUN_DIR/<exp_name>/run_<N> ($RUN_DIR defaults to ./runs).
"""


class BadInput(Exception):
    """Input the user can fix; reported as one line with exit code 2."""


# Commands for living with runs: each is ``ml.tools.<name>.main(argv) -> exit code``, parsing its
# own arguments (``ml runs --help``). They raise BadInput for input the user can fix.
TOOLS: tuple[str, ...] = ("runs", "plot", "diff", "export", "tensorboard")


class _ArgumentParser(argparse.ArgumentParser):
    """Reports a bad command line as one ``ml: error:`` line (argparse would print the usage too)."""

    def error(self, message: str) -> NoReturn:
        raise BadInput(message)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=f"ml {command}" if command else "ml", usage=USAGE, add_help=False, allow_abbrev=False
    )
    parser.add_argument("command", nargs="?", choices=["train", "launch", "resolve"])
    parser.add_argument("args", nargs="*", help="config files and key=value overrides")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="continue a run although its model, optimizer, data, batch size, seed or process count changed",
    )
    return parser


def _split_args(args: list[str]) -> tuple[list[str], list[str]]:
    configs = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return configs, overrides


def _print_help(command: str | None, args: list[str]) -> None:
    print(USAGE)
    if command is None:  # the overview: the names alone, without importing a component (or torch)
        from ml.core.registry import BUILTIN_NAMES

        print("Built-in components (`name:` in each config section):")
        for kind, builtin in BUILTIN_NAMES.items():
            print(f"  {kind + ':':<14}{', '.join(builtin)}")
        print("\n`ml train --help` lists every config field with its help text; `ml train CONFIG --help`")
        print("only the fields of the components CONFIG selects.")
        return

    from ml.core.compose import SECTIONS, compose_config, config_fields
    from ml.core.registry import lookup, registered_names

    configs, overrides = _split_args(args)
    chosen: dict[str, list[str]] = {}
    if command is not None and configs:
        root = compose_config(configs, overrides)
        for section in SECTIONS:
            nodes = root[section] if section == "logger" else [root[section]]
            chosen[section] = [str(node.name) for node in nodes]
    else:
        print("Give a config to see only the components it selects.\n")
        chosen = {section: registered_names(kind) for section, kind in SECTIONS.items()}
    for section, names in chosen.items():
        for name in names:
            _, config_cls = lookup(SECTIONS[section], name)
            print(f"{section}: {name}  ({config_cls.__name__})")
            for field, type_name, default, help_text in config_fields(config_cls):
                print(f"  {section}.{field}: {type_name} = {default}\n      {help_text}")
            print()


def _rank() -> int:
    from ml.utils.ranks import dist_env

    return dist_env().rank


def _setup_logging() -> None:
    rank = _rank()
    # Other ranks than 0 report only warnings and errors, tagged with their rank.
    tag = f" rank {rank}" if rank else ""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(levelname).1s %(asctime)s{tag} %(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )


def _compose(args: list[str]) -> Any:
    from ml.core.compose import compose_config, set_default_exp_name

    configs, overrides = _split_args(args)
    root = compose_config(configs, overrides)
    set_default_exp_name(configs)
    return root


def _resolve(args: list[str]) -> int:
    from omegaconf import OmegaConf

    root = _compose(args)
    print(OmegaConf.to_yaml(root, resolve=True), end="")
    return EXIT_OK


def _default_run_dir() -> None:
    if not os.environ.get("RUN_DIR"):
        os.environ["RUN_DIR"] = str(Path("runs").resolve())
        if _rank() == 0:
            print(f"ml: RUN_DIR is not set; using {os.environ['RUN_DIR']}", file=sys.stderr)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet."""
    first = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        first = folder
    return first


def _remove_claimed(exp_dir: Path, created_from: Path | None) -> None:
    """Removes a run folder this command claimed, and the empty parents the claim created."""
    shutil.rmtree(exp_dir, ignore_errors=True)
    if created_from is None:
        return
    for folder in exp_dir.parents:
        if not folder.is_relative_to(created_from):
            break
        try:
            folder.rmdir()
        except OSError:  # not empty (another run), or already gone
            break


def _has_results(exp_dir: Path) -> bool:
    """Whether a run folder holds anything worth keeping: a checkpoint or a non-empty log."""
    return any((exp_dir / "checkpoints").glob("ckpt.*")) or any(
        p.is_file() and p.stat().st_size > 0 for p in (exp_dir / "logs").rglob("*")
    )


def train_command(args: list[str], *, allow_config_change: bool = False) -> int:
    """``ml train ARGS``: trains in this process (one rank of a job when started by torchrun or srun)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ml.core.compose import ConfigError, build_objects
    from ml.core.registry import lookup

    root = _compose(args)
    objects = build_objects(root)
    initial = root.trainer.checkpoint.load_from_ckpt_path
    if initial and not Path(initial).expanduser().is_file():
        raise ConfigError(f"trainer.checkpoint.load_from_ckpt_path: no such file {initial}")

    trainer_cls, _ = lookup("trainer", str(root.trainer.name))
    exp_dir, release = claim_run_dir(root)
    try:
        OmegaConf.resolve(root)
        trainer = trainer_cls(root.trainer)
        trainer.set_run_config(root)
        trainer.allow_config_change = allow_config_change
        trainer.add_loggers(objects.loggers)
    except BaseException as e:
        release()
        if isinstance(e, (ValueError, TypeError, OmegaConfBaseException)):
            raise ConfigError(f"trainer ({root.trainer.name}): {_first_line(e)}") from e
        raise

    try:
        trainer.train(objects.model, objects.task, objects.optimizer, objects.lr_scheduler)
    except BaseException as e:
        # Bad input found while setting up (an unusable task, initial weights that do not fit), or
        # an immediate interrupt: leave no empty run behind. Any other error is a failure of
        # training (exit 1) and keeps its traceback and run folder.
        bad = _is_bad_input(e)
        if (bad or isinstance(e, KeyboardInterrupt)) and not _has_results(exp_dir):
            release()
        if bad and not isinstance(e, BadInput):
            raise BadInput(_first_line(e)) from e
        raise
    # The ranks leave together: a rank that tears its process group down while another still
    # works (rank 0 writing the last checkpoint) can abort inside gloo.
    from ml.utils.distributed import barrier

    barrier()
    if is_master():
        _report(trainer)
        from ml.launchers.slurm import requeue_if_preempted

        requeue_if_preempted(trainer)
    if getattr(trainer, "stop_signal", None) == signal.Signals.SIGINT:
        return EXIT_INTERRUPTED
    return EXIT_OK


def claim_run_dir(root: Any) -> tuple[Path, Callable[[], None]]:
    """Sets ``trainer.exp_dir`` (claiming a new run folder when unset); returns it and its release.

    The release removes a folder this call claimed (with the empty parents the claim created),
    on rank 0 only; for a folder given in the config it does nothing.
    """
    from omegaconf import OmegaConf

    _default_run_dir()
    claimed = OmegaConf.is_missing(root.trainer, "exp_dir")
    created_from = None
    if claimed:
        exp_name = str(root.trainer.exp_name)
        created_from = _first_missing(Path(os.environ["RUN_DIR"]).expanduser().resolve() / exp_name)
    _claim_exp_dir(root)
    exp_dir = Path(root.trainer.exp_dir)

    def release() -> None:
        if claimed and is_master():
            _remove_claimed(exp_dir, created_from)

    return exp_dir, release


def _claim_exp_dir(root: Any) -> None:
    """Fills ``trainer.exp_dir`` (claiming a new run folder when unset), once for the whole job.

    In a distributed job rank 0 claims the folder and every other rank takes its answer (the
    process group is joined first); a failure to claim is reported on every rank.
    """
    from omegaconf import OmegaConf

    from ml.core.compose import ConfigError
    from ml.utils.distributed import broadcast_object, init_distributed

    distributed = init_distributed()
    exp_dir, error = None, None
    if is_master():
        try:
            OmegaConf.get_type(root.trainer).resolve(root.trainer)  # type: ignore[union-attr]
            exp_dir = str(root.trainer.exp_dir)
        except (ValueError, KeyError) as e:
            error = _first_line(e) if isinstance(e, ValueError) else str(e)
    if distributed:
        exp_dir, error = broadcast_object((exp_dir, error))
    if error is not None:
        raise ConfigError(error)
    root.trainer.exp_dir = exp_dir


def is_master() -> bool:
    from ml.utils.distributed import is_master as master

    return master()


def _launch(args: list[str], flags: list[str]) -> int:
    from ml.core.compose import build_launcher

    root = _compose(args)
    launcher = build_launcher(root)
    return launcher.launch([*args, *flags], root)


def _prog() -> str:
    """``ml``, or ``ml[rank N]`` on the other processes of a distributed job."""
    rank = _rank()
    return f"ml[rank {rank}]" if rank else "ml"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_bad_input(e: BaseException) -> bool:
    """Whether ``e`` is the user's input at fault (exit 2), not a failure of training (exit 1)."""
    from ml.core.compose import ConfigError
    from ml.core.registry import RegistryError

    bad: tuple[type[BaseException], ...] = (BadInput, ConfigError, RegistryError)
    # A CheckpointError can only come from ml.utils.checkpoint once it is imported; looking it up
    # in sys.modules keeps a config error from paying for `import torch`.
    checkpoint = sys.modules.get("ml.utils.checkpoint")
    if checkpoint is not None:
        bad += (checkpoint.CheckpointError,)
    trainers = sys.modules.get("ml.trainers.base")
    if trainers is not None:
        bad += (trainers.RunLockedError,)
    return isinstance(e, bad)


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
}


def _disk_trouble(e: BaseException) -> str | None:
    """One line saying which write the disk refused and why, or None for any other error."""
    base = sys.modules.get("ml.trainers.base")
    if base is not None and isinstance(e, base.CheckpointWriteError):
        return _first_line(e)
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
        where = f" {e.filename}" if e.filename else ""
        return f"cannot write{where}: {e.strerror}"
    return None


def _report(trainer: Any) -> None:
    print(f"ml: run directory   {trainer.exp_dir}", file=sys.stderr)
    if trainer.ckpt_path.exists():
        print(f"ml: checkpoint      {trainer.ckpt_path} -> {os.readlink(trainer.ckpt_path)}", file=sys.stderr)
    tb = trainer.log_dir / "tensorboard"
    if tb.exists():
        print(f"ml: tensorboard     tensorboard --logdir {tb}", file=sys.stderr)
    for name, value in sorted(getattr(trainer, "final_metrics", {}).items()):
        print(f"ml: {name:<17} {value:.4f}", file=sys.stderr)


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
            return int(tool.main(argv[1:]))
        ns = parser.parse_args(argv)
        if ns.help:
            _print_help(ns.command, ns.args)
            return EXIT_OK
        if ns.command is None:
            raise BadInput("give a command: `ml train ...` or `ml resolve ...` (see `ml --help`)")
        _setup_logging()
        if ns.command == "resolve":
            return _resolve(ns.args)
        flags = ["--allow-config-change"] if ns.allow_config_change else []
        if ns.command == "launch":
            return _launch(ns.args, flags)
        return train_command(ns.args, allow_config_change=ns.allow_config_change)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # more Ctrl-C while shutting down changes nothing
        print("ml: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            traceback.print_exc()
        first = _first_line(e)
        if _is_bad_input(e):
            print(f"{_prog()}: error: {first}", file=sys.stderr)
            return EXIT_BAD_INPUT
        disk = _disk_trouble(e)
        if disk is not None:  # not a bug to trace: the machine's disk refused a write
            print(f"{_prog()}: training failed: {disk}", file=sys.stderr)
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
