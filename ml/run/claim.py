"""Defines how a new run folder is claimed, and given back when the run never began.

``run_<N>`` is claimed with an atomic ``mkdir`` (one past the highest existing number), so two runs
started at the same moment never share a folder. A command that claimed a folder and then stops on
bad input gives it back (with the empty parents the claim created), so nothing is left on disk.
"""

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml.errors import ConfigError, RunDirNotSetError, UserError, first_line
from ml.run.layout import DEFAULT_LOG_DIR, OTHER_ENTRIES, RUN_NAME, RunDir, enclosing_run, written_by_a_run
from ml.utils.ranks import dist_env

RUN_DIR_ENV = "RUN_DIR"
NAME_MAX = 255  # the longest file name Linux's file systems take, in bytes


def check_folder_name(value: str, key: str) -> str:
    """``value`` when it is a plain folder name (no path, not ``.`` or ``..``); else ConfigError.

    Every name the config gives to a folder of the run goes through here, so that no config can
    write outside the run's folder.
    """
    name = str(value)
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(f"{key} must be a plain folder name, got {name!r}")
    if len(os.fsencode(name)) > NAME_MAX:
        raise ConfigError(
            f"{key} must be at most {NAME_MAX} bytes long (a file system's limit), got {name[:40]!r}..."
        )
    return name


def check_exp_dir(value: str) -> Path:
    """``trainer.exp_dir`` as a folder when it can be a run's: not an experiment's folder (one
    holding run folders) and not inside another run's folder, where ``ml runs`` and ``ml plot``
    would miss runs (:mod:`ml.run.layout` says what a run folder is).

    Raises:
        ConfigError: It is either.
    """
    from ml.run.layout import subfolders

    folder = Path(str(value)).expanduser().resolve()
    if written_by_a_run(folder):  # a run already: continued where it is, whatever surrounds it
        return folder
    outer = enclosing_run(folder)
    if outer is not None:
        raise ConfigError(
            f"trainer.exp_dir={value} lies inside the run folder {outer} (ml runs and ml plot would not "
            "find it there); give a folder outside any run, or leave trainer.exp_dir unset to take the "
            "next run_<N> of trainer.exp_name"
        )
    # Runs by what only ml writes (a data folder named run_1 is not one; nor a package's config.yaml
    # beside its logs/), one or two levels down (an experiment's folder, or one of experiments
    # such as $RUN_DIR).
    children = list(subfolders(folder))
    below = [*children, *(grandchild for child in children for grandchild in subfolders(child))]
    inner = [run for run in below if written_by_a_run(run)]
    if inner:
        shown = ", ".join(str(run.relative_to(folder)) for run in inner[:3]) + (
            ", ..." if len(inner) > 3 else ""
        )
        raise ConfigError(
            f"trainer.exp_dir={value} holds run folders ({shown}): it is an experiment's folder, not a "
            "run's; leave trainer.exp_dir unset to take the next run_<N> of trainer.exp_name, or give a "
            "folder that holds no runs"
        )
    return folder


def check_log_dir_name(value: str) -> str:
    """``trainer.log_dir_name`` when it is a plain folder name the run folder does not use otherwise."""
    name = check_folder_name(value, "trainer.log_dir_name")
    if name in OTHER_ENTRIES:
        raise ConfigError(
            f"trainer.log_dir_name={name} is taken by the run folder's own {name}: name the log folder "
            f"otherwise (the default is {DEFAULT_LOG_DIR})"
        )
    return name


def get_empty_exp_dir(run_dir: Path) -> Path:
    """Claims the next ``run_<N>`` under ``run_dir`` (one past the highest) with an atomic ``mkdir``.

    Args:
        run_dir: The experiment's folder (created if missing).

    Returns:
        The new, empty run folder.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in run_dir.glob("run_*") if (m := RUN_NAME.fullmatch(p.name))]
    run_id = max(taken, default=-1) + 1
    while True:
        exp_dir = (run_dir / f"run_{run_id}").resolve()
        try:
            exp_dir.mkdir()
        except FileExistsError:
            run_id += 1
            continue
        return exp_dir


def new_exp_dir(exp_name: str) -> Path:
    """Claims a new run folder of experiment ``exp_name`` under ``$RUN_DIR``.

    Raises:
        ConfigError: ``exp_name`` is not a plain folder name.
        RunDirNotSetError: ``RUN_DIR`` is not set.
    """
    name = check_folder_name(exp_name, "trainer.exp_name")
    run_dir = os.environ.get(RUN_DIR_ENV)
    if not run_dir:
        raise RunDirNotSetError(
            "Set the RUN_DIR environment variable (the folder experiments go in) or trainer.exp_dir"
        )
    return get_empty_exp_dir(Path(run_dir).expanduser() / name)


def default_run_dir() -> None:
    """The command line's default: ``./runs`` when ``RUN_DIR`` is unset (said once, on rank 0)."""
    if not os.environ.get(RUN_DIR_ENV):
        os.environ[RUN_DIR_ENV] = str(Path("runs").resolve())
        if dist_env().rank == 0:
            from ml.utils.progress import write  # (a reader of stderr that left fails nothing)

            write(f"ml: RUN_DIR is not set; using {os.environ[RUN_DIR_ENV]}", file=sys.stderr)


def claim_run_dir(trainer_config: Any) -> tuple[Path, Callable[[], None]]:
    """Sets ``trainer_config.exp_dir``, claiming a new run folder when it is unset.

    The trainer config's own ``resolve`` (the spec's :meth:`BaseTrainerConfig.resolve`) claims it.

    Returns:
        The run folder, and a function that gives back a folder this call claimed (with the empty
        parents the claim created); for a folder given in the config it does nothing.

    Raises:
        UserError: The folder cannot be claimed (a bad ``exp_name``, no ``RUN_DIR``).
    """
    from omegaconf import OmegaConf

    default_run_dir()
    claimed = OmegaConf.is_missing(trainer_config, "exp_dir")
    created_from = None
    if claimed:
        experiment = Path(os.environ[RUN_DIR_ENV]).expanduser().resolve() / str(trainer_config.exp_name)
        outer = experiment if written_by_a_run(experiment) else enclosing_run(experiment)
        if outer is not None:  # (a run made there could be neither listed nor continued)
            raise ConfigError(
                f"RUN_DIR={os.environ[RUN_DIR_ENV]} lies inside the run folder {outer}: point RUN_DIR at "
                "a folder outside any run"
            )
        created_from = _first_missing(experiment)
    try:
        OmegaConf.get_type(trainer_config).resolve(trainer_config)  # type: ignore[union-attr]
    except UserError:
        raise
    except (ValueError, KeyError) as e:  # a trainer config's own resolve
        raise ConfigError(first_line(e)) from e
    exp_dir = Path(str(trainer_config.exp_dir))

    def release() -> None:
        if claimed:
            remove_claimed(exp_dir, created_from)

    return exp_dir, release


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet."""
    first = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        first = folder
    return first


def remove_claimed(exp_dir: Path, created_from: Path | None) -> None:
    """Removes a run folder a command claimed, and the empty parents the claim created."""
    import shutil

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


def has_results(run: RunDir) -> bool:
    """Whether a run folder holds anything worth keeping: a checkpoint or a non-empty log."""
    return any(run.checkpoints.glob("ckpt.*")) or any(
        p.is_file() and p.stat().st_size > 0 for p in run.logs.rglob("*")
    )
