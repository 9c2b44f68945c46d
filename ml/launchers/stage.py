"""Defines staging: a run folder that holds its config and a copy of the code a later job trains with.

A Slurm job may start hours after it was submitted; by then the working tree holds other code. So
``ml stage CONFIG [key=value...]`` (and the Slurm launcher, unless ``launcher.stage=false``) claims
the run folder, writes its resolved ``config.yaml`` and copies the user's code into ``<run>/code/``.
``ml train <run>/config.yaml`` - the job, a requeued job, or anyone continuing the run - then puts
``<run>/code`` first on ``sys.path`` (and ``PYTHONPATH``, for the processes it starts) before any of
the user's modules is imported, and says so: the run trains with the code it was staged with. The
working directory stays where the job was started, so relative data paths keep their meaning.
Deleting ``<run>/code`` makes the run use the working tree's code again.

"The code" is what ``ml`` imports from the current directory: its top-level modules (``*.py``) and
its packages (folders with ``__init__.py``, whole, with their data files and subfolders), but no
``__pycache__``, hidden entries (``.git``), or ``$RUN_DIR``. Installed packages - ``ml`` itself
included, even run from its source tree - are not copied: they are the environment's. A folder
without ``__init__.py`` is not looked into (data sets live in such folders), so namespace packages
are not staged.
"""

import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ml.errors import ConfigError
from ml.run.layout import CONFIG_FILE, LOCK_TYPES, RunDir

logger = logging.getLogger(__name__)

MAX_CODE_BYTES = 256 * 1024 * 1024  # more than any code: a data set inside a package, copied by mistake


def _skipped(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__" or name.endswith((".pyc", ".pyo"))


def code_files(source: Path, exclude: list[Path]) -> list[Path]:
    """The files of the user's code under ``source`` (relative paths), as the module docstring says.

    Raises:
        ConfigError: Together they are larger than :data:`MAX_CODE_BYTES`.
    """
    excluded = {p.resolve() for p in exclude}
    files: list[Path] = []
    for entry in sorted(source.iterdir()):
        if _skipped(entry.name) or entry.resolve() in excluded:
            continue
        if entry.suffix == ".py" and not entry.is_dir():
            files.append(entry.relative_to(source))
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            for folder, dirs, names in os.walk(entry):
                dirs[:] = sorted(
                    d for d in dirs if not _skipped(d) and (Path(folder) / d).resolve() not in excluded
                )
                files += [(Path(folder) / n).relative_to(source) for n in sorted(names) if not _skipped(n)]
    # A pipe or socket cannot be copied (reading a pipe would wait for a writer), and a link whose
    # target is gone has nothing to copy: none of them is code. is_file() follows links, so a link to
    # a file is copied as that file.
    special = [f for f in files if not (source / f).is_file()]
    if special:
        logger.warning(
            "Not staging %s: not regular files (a pipe, a socket or a broken link)",
            ", ".join(str(f) for f in special),
        )
        files = [f for f in files if f not in special]
    size = sum((source / f).stat().st_size for f in files)
    if size > MAX_CODE_BYTES:
        biggest = max(files, key=lambda f: (source / f).stat().st_size)
        raise ConfigError(
            f"the code to stage from {source} is {size / 2**20:.0f} MB (largest: {biggest}): move data "
            "out of the packages, or set launcher.stage=false"
        )
    return files


def copy_code(source: Path, dest: Path, exclude: list[Path]) -> int:
    """Copies the user's code under ``source`` to ``dest`` (complete or not at all); the file count.

    Written under a temporary name and renamed, so that a ``code/`` folder is always a whole copy.
    """
    files = code_files(source, exclude)
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for relative in files:
        target = partial / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / relative, target)
    os.replace(partial, dest)
    return len(files)


def prepare_run(config: DictConfig, *, stage: bool) -> tuple[RunDir, Callable[[], None]]:
    """Checks the config, claims its run folder, writes ``config.yaml`` and, with ``stage``, the code.

    A run folder that already has ``code/`` (a staged run continued) keeps it: a run trains with
    the code it was staged with. Returns the run and the release of a folder this call claimed.

    Raises:
        UserError: Bad input; nothing is left on disk for it.
    """
    from ml.core.compose import build_objects, config_to_save
    from ml.launchers.checks import check_before_claim
    from ml.run.claim import check_log_dir_name, claim_run_dir
    from ml.trainers.base import save_config

    build_objects(config)  # bad input stops here, not in the job
    check_before_claim(config, device=False)  # (the job's machine may have a device this one lacks)
    exp_dir, release = claim_run_dir(config.trainer)
    try:
        run = RunDir(exp_dir, check_log_dir_name(config.trainer.log_dir_name))
        saved = config_to_save(config)
        OmegaConf.resolve(config)
        run.logs.mkdir(parents=True, exist_ok=True)
        save_config(run.config, saved, resolve=False)
        if stage and not run.code.exists():
            import ml

            run_dir = os.environ.get("RUN_DIR")
            # ml is the environment's, even where the current directory is its source tree.
            exclude = [Path(ml.__file__).parent, *([Path(run_dir).expanduser()] if run_dir else [])]
            count = copy_code(Path.cwd(), run.code, exclude)
            logger.info("Staged %d files of code from %s in %s", count, Path.cwd(), run.code)
    except BaseException:
        release()
        raise
    return run, release


def _check_new_folder(config: DictConfig) -> None:
    """Refuses a ``trainer.exp_dir`` that holds a run; unset, a new ``run_<N>`` is claimed.

    Staging writes ``config.yaml`` and ``code/``: in a folder that holds a run it would replace that
    run's config (which ``ml train`` then refuses to continue with) and code.

    Raises:
        ConfigError: The folder holds a config, checkpoints or logs, or a lock.
    """
    from ml.run.claim import has_results

    if OmegaConf.is_missing(config.trainer, "exp_dir"):
        return
    run = RunDir.of(Path(str(config.trainer.exp_dir)).expanduser().resolve())
    found = [p.name for p in (run.config, *(run.lock(t) for t in LOCK_TYPES)) if p.exists()]
    if has_results(run):
        found.append("checkpoints or logs")
    if found:
        raise ConfigError(
            f"trainer.exp_dir={run.path} already holds a run ({', '.join(found)}): stage into a new "
            f"folder (leave trainer.exp_dir unset, or name one that does not exist), or continue that "
            f"run with `ml train {run.config}`"
        )


def stage_runs(configs: list[DictConfig]) -> int:
    """``ml stage``: prepares one run folder per config (a sweep's points); prints each folder.

    All or nothing: a config that fails gives back the folders already prepared.
    """
    for config in configs:  # all refused before anything is written
        _check_new_folder(config)
    releases: list[Callable[[], None]] = []
    runs: list[RunDir] = []
    try:
        for config in configs:
            run, release = prepare_run(config, stage=True)
            runs.append(run)
            releases.append(release)
    except BaseException:
        for release in releases:
            release()
        raise
    for run in runs:
        print(f"ml: staged {run.path}: a job trains it with `ml train {run.config}`", file=sys.stderr)
    for run in runs:  # (after the lines above: a reader of stdout that leaves early misses none of them)
        print(run.path)
    return 0


def staged_code(args: list[str]) -> Path | None:
    """The staged code of the run whose ``config.yaml`` (or folder) is the last config argument."""
    configs = [a for a in args if "=" not in a and not a.startswith("-")]
    if not configs:
        return None
    path = Path(configs[-1]).expanduser()
    if path.is_dir():
        path = path / CONFIG_FILE
    if path.name != CONFIG_FILE or not path.is_file():
        return None
    code = RunDir(path.parent).code
    return code.resolve() if code.is_dir() else None


def use_staged_code(args: list[str]) -> None:
    """Makes the run's staged code (if it has some) what ``import`` finds first, here and in children.

    Call it before anything imports the user's modules (composing the config does).
    """
    code = staged_code(args)
    if code is None:
        return
    text = str(code)
    # First: `python -m` (torchrun's and srun's workers) puts the working directory at sys.path[0].
    sys.path[:] = [text, *(p for p in sys.path if p != text)]
    previous: Any = os.environ.get("PYTHONPATH")
    if not previous or previous.split(os.pathsep)[0] != text:
        os.environ["PYTHONPATH"] = os.pathsep.join([text, previous] if previous else [text])
    logger.info("Training with the code staged in %s (delete that folder to use the working tree's)", code)
