"""Defines where everything of one run lies: :class:`RunDir`, run numbers, and finding runs.

::

    $RUN_DIR/<exp_name>/run_<N>/
      config.yaml                      the fully resolved config
      config_changes.log               changes allowed with --allow-config-change
      status.json                      how the last session ended (ml.run.status)
      .lock_running .lock_scheduled .lock_ckpt .lock_guard
      sbatch.sh                        a Slurm launch's batch script
      checkpoints/ckpt.<num_steps>.pt  one file per save (checkpoint.format=full)
      checkpoints/ckpt.<num_steps>/    or one folder per save, every rank's shards (format=sharded)
      checkpoints/ckpt.pt              a relative link to the newest
      checkpoints/best.pt              a relative link to the best by checkpoint.monitor
      checkpoints/scores.json          the monitored metric of the best keep_top_k checkpoints
      <log_dir_name>/                  stdout log, metrics.jsonl, tensorboard/ (default: logs/)
      <log_dir_name>/tensorboard/profile/  trainer.profile's traces (TensorBoard's run `profile`)

A run folder is normally named ``run_<N>``; one given as ``trainer.exp_dir`` may have any name, and
is recognised by what it holds (a config and checkpoints or logs).
"""

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

LockType = Literal["running", "scheduled", "ckpt"]
LOCK_TYPES: tuple[LockType, ...] = get_args(LockType)

CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
CONFIG_CHANGES_FILE = "config_changes.log"
SBATCH_FILE = "sbatch.sh"
CODE_DIR = "code"
CHECKPOINT_DIR = "checkpoints"
LINK_NAME = "ckpt.pt"
BEST_LINK_NAME = "best.pt"
SCORES_FILE = "scores.json"
DEFAULT_LOG_DIR = "logs"
METRICS_FILE = "metrics.jsonl"

# What the run folder holds besides the log folder, which therefore cannot take one of these names.
OTHER_ENTRIES = frozenset(
    {CONFIG_FILE, CONFIG_CHANGES_FILE, STATUS_FILE, SBATCH_FILE, CODE_DIR, CHECKPOINT_DIR, ".lock_guard"}
    | {f".lock_{lock_type}" for lock_type in LOCK_TYPES}
)

RUN_NAME = re.compile(r"run_(\d+)")
NUMBERED_CHECKPOINT = re.compile(r"ckpt\.(\d+)(?:\.pt)?")  # a file, or a sharded checkpoint's folder


@dataclass(frozen=True)
class RunDir:
    """The files of one run folder (paths only: nothing is read or created here).

    Args:
        path: The run folder.
        log_dir_name: The log folder's name inside it (``trainer.log_dir_name``).
    """

    path: Path
    log_dir_name: str = DEFAULT_LOG_DIR

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, path: Path) -> "RunDir":
        """An existing run folder, with the log folder its ``config.yaml`` names (``logs`` if none)."""
        import yaml

        from ml.utils.atomic import read_regular

        try:
            config = yaml.safe_load(read_regular(Path(path) / CONFIG_FILE).decode("utf-8"))
            name = config["trainer"]["log_dir_name"]
        except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, KeyError):
            name = DEFAULT_LOG_DIR
        plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
        return cls(Path(path), name if plain else DEFAULT_LOG_DIR)

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def config_changes(self) -> Path:
        return self.path / CONFIG_CHANGES_FILE

    @property
    def status(self) -> Path:
        return self.path / STATUS_FILE

    @property
    def sbatch_script(self) -> Path:
        return self.path / SBATCH_FILE

    @property
    def code(self) -> Path:
        """``code/``: the copy of the user's modules this run trains with (``ml stage``, Slurm jobs)."""
        return self.path / CODE_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def link(self) -> Path:
        """``checkpoints/ckpt.pt``: the link to the newest checkpoint."""
        return self.checkpoints / LINK_NAME

    @property
    def best_link(self) -> Path:
        """``checkpoints/best.pt``: the link to the best checkpoint by ``checkpoint.monitor``."""
        return self.checkpoints / BEST_LINK_NAME

    @property
    def scores(self) -> Path:
        """``checkpoints/scores.json``: the monitored metric of the checkpoints kept for it."""
        return self.checkpoints / SCORES_FILE

    def checkpoint(self, step: int) -> Path:
        """``checkpoints/ckpt.<step>.pt``."""
        return self.checkpoints / f"ckpt.{step}.pt"

    def sharded_checkpoint(self, step: int) -> Path:
        """``checkpoints/ckpt.<step>/``: a sharded checkpoint (a folder, every rank's shards)."""
        return self.checkpoints / f"ckpt.{step}"

    @property
    def logs(self) -> Path:
        return self.path / self.log_dir_name

    @property
    def profile(self) -> Path:
        """Where ``trainer.profile`` writes its traces: under TensorBoard's folder, as a run of its own."""
        return self.logs / "tensorboard" / "profile"

    @property
    def metrics(self) -> Path:
        """``metrics.jsonl`` in the log folder, else in another folder of the run (an older
        ``trainer.log_dir_name``); the default path when there is none yet."""
        default = self.logs / METRICS_FILE
        if default.is_file():
            return default
        return next(iter(sorted(self.path.glob(f"*/{METRICS_FILE}"))), default)

    def lock(self, lock_type: LockType) -> Path:
        """``.lock_<lock_type>``."""
        if lock_type not in LOCK_TYPES:
            raise ValueError(f"lock_type must be one of {LOCK_TYPES}, got {lock_type!r}")
        return self.path / f".lock_{lock_type}"

    @property
    def lock_guard(self) -> Path:
        """The file whose ``flock`` serialises taking the ``running`` lock."""
        return self.path / ".lock_guard"

    @property
    def number(self) -> int:
        return run_number(self.path)


def run_number(run: Path) -> int:
    """N of a ``run_<N>`` folder; -1 for any other name."""
    match = RUN_NAME.fullmatch(Path(run).name)
    return int(match.group(1)) if match else -1


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``ckpt.<step>.pt`` file or ``ckpt.<step>`` folder; None for any other name."""
    match = NUMBERED_CHECKPOINT.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def subfolders(folder: Path) -> Iterator[Path]:
    """The folders directly inside ``folder`` (not hidden ones; none if it cannot be read)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            if not entry.name.startswith(".") and entry.is_dir():
                yield Path(entry.path)
        except OSError:
            continue


def is_run(folder: Path) -> bool:
    """Whether ``folder`` is one run's folder.

    ``run_<N>`` with no ``run_<M>`` inside (that would be an experiment named like a run), or any
    folder holding a run's config beside its checkpoints or logs (``trainer.exp_dir=...``).
    """
    folder = Path(folder)
    if RUN_NAME.fullmatch(folder.name):
        return not any(RUN_NAME.fullmatch(child.name) for child in subfolders(folder))
    return holds_run_files(folder)


def holds_run_files(folder: Path) -> bool:
    """Whether ``folder`` holds what a run writes: its config beside checkpoints, logs, a lock or
    ``status.json`` (whatever its name)."""
    run = RunDir(Path(folder))
    return run.config.is_file() and (
        run.checkpoints.is_dir() or run.logs.is_dir() or run.lock("running").exists() or run.status.exists()
    )


def written_by_a_run(folder: Path) -> bool:
    """Whether ``folder`` holds what only ``ml`` writes for a run: a config with a ``trainer``
    section beside a checkpoint by ``ml``'s names (``checkpoints/ckpt.<N>.pt``, ``ckpt.<N>/`` or
    the ``ckpt.pt`` link).

    Stricter than :func:`holds_run_files` (what ``ml runs`` lists): a run may not be made inside
    such a folder, so a project's own folders must not look like one (a ``config.yaml`` beside
    ``logs/`` or ``checkpoints/ckpt_best.pth``; a ``run_<N>`` of the user's).
    """
    run = RunDir(Path(folder))
    if not run.config.is_file():
        return False
    checkpoints = (entry.name for entry in _entries(run.checkpoints))
    if not any(name == LINK_NAME or NUMBERED_CHECKPOINT.fullmatch(name) for name in checkpoints):
        return False
    try:
        import yaml

        config = yaml.safe_load(run.config.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and isinstance(config.get("trainer"), dict)


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(folder))
    except OSError:
        return []


def enclosing_run(path: Path) -> Path | None:
    """The run folder ``path`` lies inside (:func:`written_by_a_run`; ``path`` itself not counted);
    None if none."""
    return next((parent for parent in Path(path).parents if written_by_a_run(parent)), None)


def find_runs(path: Path) -> list[tuple[str, Path]]:
    """The ``(exp_name, run folder)`` pairs under ``path``, by name then run number.

    ``path`` is a run dir (``<exp_name>/run_<N>`` inside), one experiment's folder (``run_<N>``
    inside) or one run folder (any name, see :func:`is_run`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        NotADirectoryError: ``path`` is not a folder.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(path)
    if not path.is_dir():
        raise NotADirectoryError(path)
    path = path.resolve()
    if is_run(path):
        return [(path.parent.name if RUN_NAME.fullmatch(path.name) else path.name, path)]
    children = sorted(subfolders(path))
    runs = [(path.name, child) for child in children if RUN_NAME.fullmatch(child.name) and is_run(child)]
    if not runs:
        runs = [(child.name, run) for child in children for run in subfolders(child) if is_run(run)]
    if not runs:  # folders given as trainer.exp_dir, side by side
        runs = [(child.name, child) for child in children if is_run(child)]
    return sorted(runs, key=lambda pair: (pair[0], run_number(pair[1])))
