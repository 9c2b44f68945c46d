"""Defines the base trainer class and config.

The trainer is the thing that actually runs the training loop. There are separate trainers for
supervised and reinforcement learning (``ml.trainers.sl`` and ``ml.trainers.rl``); the base trainer
handles what they share: the experiment directory and its lock files, the config snapshot,
checkpoints, loggers, signals and the hooks.

Notes for subclass authors:

- Signals. :meth:`BaseTrainer.install_signal_handlers` installs handlers for SIGTERM, SIGINT and
  SIGUSR1 that only record the signal in :attr:`BaseTrainer.stop_signal`. Your loop checks it at
  each step boundary and, when set, calls :meth:`BaseTrainer.on_exit` (which saves a checkpoint and
  runs the handlers registered with :meth:`BaseTrainer.add_signal_handler`) and then stops. Nothing
  is saved from inside a signal handler, so a checkpoint always holds a consistent step. A second
  SIGINT raises ``KeyboardInterrupt`` at once; atomic writes leave no partial file behind.
- Checkpoints are written atomically by rank 0 and read with ``torch.load(weights_only=True)``.
  Whatever :meth:`BaseTrainer.update_state_dict` adds must be tensors or plain data. With
  ``checkpoint.async_save`` the write runs in a background thread from a host copy; the loop's
  :meth:`BaseTrainer.on_step_end` reports a failed one, and :meth:`BaseTrainer.on_exit` and
  :meth:`BaseTrainer.on_training_end` wait for the one in flight (see
  :meth:`BaseTrainer.wait_for_checkpoint`).
"""

import datetime
import fcntl
import itertools
import logging
import os
import shutil
import signal
import socket
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from signal import Signals
from typing import Any, Generic, Literal, TypeVar, get_args

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from torch.optim import Optimizer

from ml.core.config import BaseConfig, BaseObject, conf_field
from ml.core.diff import diff_configs  # torch-free (for `ml diff`); re-exported here
from ml.core.state import State
from ml.loggers.base import BaseLogger, MultiLogger
from ml.lr_schedulers.base import BaseLRScheduler, SchedulerAdapter
from ml.models.base import BaseModel
from ml.optimizers.base import BaseOptimizer
from ml.tasks.base import BaseTask
from ml.utils.atomic import atomic_symlink, atomic_write_text, atomic_write_with
from ml.utils.checkpoint import (
    CheckpointError,
    HostSnapshot,
    check_loadable,
    get_rng_state,
    load_model_state,
    read_checkpoint,
    set_rng_state,
    unwrap_model,
)
from ml.utils.device import detect_device
from ml.utils.distributed import (
    all_max,
    get_world_size,
    init_distributed,
    is_master,
    mean_over_ranks,
)
from ml.utils.locks import LockInfo, parse_lock
from ml.utils.ranks import dist_env, export_env
from ml.utils.signals import take_early_signal

logger = logging.getLogger(__name__)

LockType = Literal["running", "scheduled", "ckpt"]
LOCK_TYPES: tuple[LockType, ...] = get_args(LockType)
CHECKPOINT_FORMAT = 1

__all__ = [
    "BaseTrainer",
    "BaseTrainerConfig",
    "CheckpointConfig",
    "CheckpointError",
    "LockType",
    "ModelT",
    "RunDirNotSetError",
    "RunLockedError",
    "TaskT",
    "TrainerConfigT",
    "add_lock_file",
    "diff_configs",
    "get_ckpt_path",
    "get_empty_exp_dir",
    "get_exp_dir",
    "has_lock_file",
    "read_lock_file",
    "remove_lock_file",
    "save_config",
]


# ---------------------------------------------------------------------------------------------
# Lock files and experiment directories


def _lock_path(exp_dir: Path, lock_type: LockType) -> Path:
    if lock_type not in LOCK_TYPES:
        raise ValueError(f"lock_type must be one of {LOCK_TYPES}, got {lock_type!r}")
    return Path(exp_dir) / f".lock_{lock_type}"


def _lock_text() -> str:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return f"pid: {os.getpid()}\nhost: {socket.gethostname()}\ntime: {now}\n"


def add_lock_file(exp_dir: Path, lock_type: LockType, *, exists_ok: bool = False) -> None:
    """Creates ``exp_dir/.lock_<lock_type>`` holding this process's pid, host and the time.

    The file is created with an exclusive create, so of two processes racing for one lock exactly
    one wins. Only the master rank writes.

    Args:
        exp_dir: The experiment directory (created if missing).
        lock_type: ``running``, ``scheduled`` or ``ckpt``.
        exists_ok: Overwrite an existing lock instead of raising.

    Raises:
        RuntimeError: The lock exists and ``exists_ok`` is false.
    """
    path = _lock_path(exp_dir, lock_type)
    if not is_master():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        if not exists_ok:
            raise RuntimeError(f"lock file already exists: {path}") from None
        atomic_write_text(path, _lock_text())
        return
    with os.fdopen(fd, "w") as f:
        f.write(_lock_text())
        f.flush()
        os.fsync(f.fileno())


def remove_lock_file(exp_dir: Path, lock_type: LockType, *, missing_ok: bool = False) -> None:
    """Removes ``exp_dir/.lock_<lock_type>`` (master rank only).

    Raises:
        RuntimeError: The lock does not exist and ``missing_ok`` is false.
    """
    path = _lock_path(exp_dir, lock_type)
    if not is_master():
        return
    try:
        path.unlink()
    except FileNotFoundError:
        if not missing_ok:
            raise RuntimeError(f"lock file not found: {path}") from None


def has_lock_file(exp_dir: Path, lock_type: LockType | None = None) -> bool:
    """Whether ``exp_dir`` holds the given lock, or any lock when ``lock_type`` is None."""
    types = LOCK_TYPES if lock_type is None else (lock_type,)
    return any(_lock_path(exp_dir, t).exists() for t in types)


def read_lock_file(exp_dir: Path, lock_type: LockType) -> LockInfo | None:
    """Parses a lock file; None when there is none."""
    try:
        text = _lock_path(exp_dir, lock_type).read_text()
    except FileNotFoundError:
        return None
    return parse_lock(text)


def get_ckpt_path(exp_dir: Path, state: State | None = None) -> Path:
    """Defines the path to the checkpoint for a given state.

    Args:
        exp_dir: The experiment directory
        state: The current trainer state

    Returns:
        The path to the PyTorch checkpoint to save or load: ``checkpoints/ckpt.pt`` (the link to
        the newest) without a state, ``checkpoints/ckpt.<num_steps>.pt`` with one.
    """
    name = "ckpt.pt" if state is None else f"ckpt.{state.num_steps}.pt"
    return Path(exp_dir) / "checkpoints" / name


def get_exp_dir(run_dir: Path, run_id: int) -> Path:
    return (Path(run_dir) / f"run_{run_id}").resolve()


def get_empty_exp_dir(run_dir: Path) -> Path:
    """Returns the path to the run directory, given a run ID.

    Claims the next ``run_<N>`` (one past the highest existing) with an atomic ``mkdir``, so two
    processes calling this at the same moment never get the same directory.

    Args:
        run_dir: The base run directory for the experiment

    Returns:
        An experiment directory without a lockfile
    """
    run_dir = Path(run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[4:]) for p in run_dir.glob("run_*") if p.name[4:].isdigit()]
    run_id = max(taken, default=-1) + 1
    while True:
        exp_dir = get_exp_dir(run_dir, run_id)
        try:
            exp_dir.mkdir()
        except FileExistsError:
            run_id += 1
            continue
        return exp_dir


# ---------------------------------------------------------------------------------------------
# Config snapshots and diffs


def save_config(config_path: Path, raw_config: DictConfig) -> None:
    """Writes the resolved config atomically (master rank only).

    If a different config is already there (a run continued with changed settings), the change is
    logged as a ``-``/``+`` diff and the old file is kept beside it as ``config.<time>.yaml``.
    """
    if not is_master():
        return
    config_path = Path(config_path)
    text = OmegaConf.to_yaml(raw_config, resolve=True)
    if config_path.exists():
        old_text = config_path.read_text()
        if old_text == text:
            return
        removed, added = diff_configs(OmegaConf.create(old_text), OmegaConf.create(text))
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        backup = config_path.with_name(f"{config_path.stem}.{stamp}.yaml")
        for n in itertools.count(1):  # two changes within a second keep both old configs
            if not backup.exists():
                break
            backup = config_path.with_name(f"{config_path.stem}.{stamp}.{n}.yaml")
        atomic_write_text(backup, old_text)
        lines = [f"- {x}" for x in removed] + [f"+ {x}" for x in added]
        logger.warning("Config changed (old one kept as %s):\n%s", backup.name, "\n".join(lines))
    atomic_write_text(config_path, text)


# ---------------------------------------------------------------------------------------------
# Configs


@dataclass
class CheckpointConfig:
    save_every_n_steps: int | None = conf_field(None, help="Save a checkpoint every N steps")
    save_every_n_seconds: float | None = conf_field(3600.0, help="Save a checkpoint every N seconds")
    only_save_most_recent: bool = conf_field(True, help="Delete older numbered checkpoints after a save")
    load_from_ckpt_path: str | None = conf_field(None, help="Initial model weights from this checkpoint")
    load_strict: bool = conf_field(True, help="Fail when checkpoint and model keys differ")
    async_save: bool = conf_field(
        False, help="Write checkpoints in a background thread from a host copy (one copy stays allocated)"
    )


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, file too large, read-only); the old one is kept."""


def _io_reason(error: BaseException, folder: Path) -> str:
    """Why a write failed, in words: the OS error, and how much space is left where it wrote."""
    os_error = error if isinstance(error, OSError) else None
    cause: BaseException | None = error
    while os_error is None and cause is not None:  # torch wraps the OSError in a RuntimeError
        cause = cause.__cause__ or cause.__context__
        os_error = cause if isinstance(cause, OSError) else None
    reason = os_error.strerror if os_error is not None and os_error.strerror else str(error).splitlines()[0]
    try:
        free = shutil.disk_usage(folder).free
        reason += f" ({free / 2**20:.1f} MiB free there)"
    except OSError:
        pass
    return reason


@dataclass
class _PendingSave:
    """A checkpoint being written in the background (``checkpoint.async_save``)."""

    path: Path
    task: Any
    thread: threading.Thread = field(init=False)
    error: BaseException | None = None


class RunLockedError(RuntimeError):
    """Another live process holds the experiment's ``running`` lock."""


class RunDirNotSetError(KeyError):
    """``RUN_DIR`` is needed to place the experiment directory but is not set."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "RUN_DIR is not set"


def _is_missing(config: Any, key: str) -> bool:
    if isinstance(config, DictConfig):
        return OmegaConf.is_missing(config, key)
    return getattr(config, key) == MISSING


@dataclass
class BaseTrainerConfig(BaseConfig):
    """Defines the base config for all trainers."""

    exp_name: str = conf_field("${ml.exp_name:null}", help="Experiment name (the folder under RUN_DIR)")
    exp_dir: str = conf_field(MISSING, help="Experiment directory; default $RUN_DIR/<exp_name>/run_<N>")
    log_dir_name: str = conf_field("logs", help="Name of the log folder inside the experiment directory")
    use_double_weight_precision: bool = conf_field(False, help="Keep the model weights in float64")
    checkpoint: CheckpointConfig = conf_field(CheckpointConfig(), help="When and how to checkpoint")

    @classmethod
    def resolve(cls, config: "BaseTrainerConfig") -> None:  # type: ignore[override]
        """Runs post-construction config resolution.

        Fills ``exp_dir`` with a newly claimed ``$RUN_DIR/<exp_name>/run_<N>`` when it is unset.

        Args:
            config: The config to resolve

        Raises:
            RunDirNotSetError: ``exp_dir`` is unset and so is the ``RUN_DIR`` environment variable.
        """
        if not _is_missing(config, "exp_dir"):
            return
        name = str(config.exp_name)
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"trainer.exp_name must be a plain folder name, got {name!r}")
        run_dir = os.environ.get("RUN_DIR")
        if not run_dir:
            raise RunDirNotSetError(
                "Set the RUN_DIR environment variable (the folder experiments go in) or trainer.exp_dir"
            )
        config.exp_dir = str(get_empty_exp_dir(Path(run_dir).expanduser() / config.exp_name))


TrainerConfigT = TypeVar("TrainerConfigT", bound=BaseTrainerConfig)
ModelT = TypeVar("ModelT", bound=BaseModel)
TaskT = TypeVar("TaskT", bound=BaseTask)

Optims = Optimizer | dict[str, Optimizer]
LRScheds = SchedulerAdapter | dict[str, SchedulerAdapter]
SignalHandler = Callable[[], None]


def _state_of_checkpoint(ckpt: Mapping[str, Any], where: str) -> State:
    """The checkpoint's :class:`State` (a JSON string, or a dict in older checkpoints), validated."""
    if not isinstance(ckpt.get("model"), Mapping):
        raise CheckpointError(f"{where}: 'model' is not a state dict")
    raw = ckpt.get("state")
    try:
        return State.from_json(raw) if isinstance(raw, str) else State.from_dict(dict(raw))  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: bad trainer state ({e})") from e


def _named_state(objs: Any) -> Any:
    if isinstance(objs, Mapping):
        return {name: obj.state_dict() for name, obj in objs.items()}
    return objs.state_dict()


def _load_named(objs: Any, state: Any, what: str) -> None:
    if isinstance(objs, Mapping):
        if not isinstance(state, Mapping) or set(state) != set(objs):
            found = sorted(state) if isinstance(state, Mapping) else "a single one"
            raise CheckpointError(f"checkpoint {what} do not match: expected {sorted(objs)}, found {found}")
        for name, obj in objs.items():
            obj.load_state_dict(state[name])
    else:
        objs.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# The trainer


class BaseTrainer(BaseObject[TrainerConfigT], Generic[TrainerConfigT, ModelT, TaskT]):
    """Defines the base trainer type."""

    def __init__(self, config: TrainerConfigT) -> None:
        super().__init__(config)
        if _is_missing(config, "exp_dir"):
            type(config).resolve(config)
        self.exp_name: str = config.exp_name
        self.exp_dir = Path(config.exp_dir).expanduser().resolve()
        self.log_dir = self.exp_dir / config.log_dir_name
        self.checkpoint_config: CheckpointConfig = config.checkpoint
        self.loggers: list[BaseLogger] = []
        self.logger = MultiLogger(default_namespace="trainer")
        self.signal_handlers: dict[Signals, list[SignalHandler]] = defaultdict(list)
        self.run_config: DictConfig = self.raw_config
        self.stop_signal: Signals | None = None
        self._pending_signal: Signals | None = None  # distributed: received, not yet agreed on
        self._distributed = False
        self.allow_config_change = False  # resume even if the model, data, ... changed (the CLI's flag)
        self._first_sigint = 0.0
        self._write_due = True  # distributed: whether the ranks agreed to write training logs now
        self._final_write = False  # the loops set it on a run's last training step: written regardless
        self._last_ckpt_time_s = 0.0
        self._last_ckpt_step = -1
        self._device_cache: torch.device | None = None
        self._pending_save: _PendingSave | None = None  # checkpoint.async_save: the write in flight
        self._host_snapshot: HostSnapshot | None = None

    # -- devices and precision

    @property
    def _device(self) -> torch.device:
        if self._device_cache is None:
            self._device_cache = detect_device()
        return self._device_cache

    @property
    def _device_type(self) -> str:
        return self._device.type

    @property
    def _weight_precision(self) -> torch.dtype:
        return torch.float64 if self.config.use_double_weight_precision else torch.float32

    # -- distributed jobs

    def setup_distributed(self) -> bool:
        """Joins the job's process group when launched as one of several processes; returns whether."""
        export_env(dist_env())  # Slurm's ranks as torchrun's, before the local device is chosen
        self._device_cache = None
        self._distributed = init_distributed(self._device)
        return self._distributed

    @property
    def sync_every_n_steps(self) -> int:
        every = self.__dict__.get("_sync_every")  # read once: asked at every step of a distributed job
        if every is None:
            every = self._sync_every = max(1, int(getattr(self.config, "sync_every_n_steps", 10)))
        return every

    def sync_ranks(self, state: State, *, force: bool = False) -> None:
        """Every ``sync_every_n_steps`` steps, the ranks agree on what only some of them know.

        One all-reduce of three numbers on the CPU control group (no device sync): the stop
        signal any rank received (then :attr:`stop_signal` is set on all), whether rank 0's loggers
        want to write (then all ranks average their metrics for that write), and rank 0's clock
        (``state.elapsed_time_s``), so that every time-based decision - ``max_seconds``, saving or
        validating every N seconds - comes out the same on every rank. Without a process group the
        clock is simply read.
        """
        if not self._distributed:
            state.elapsed_time_s = time.time() - state.start_time_s
            return
        if not force and state.num_steps % self.sync_every_n_steps != 0:
            self._write_due = False
            return
        master = is_master()
        want_write = master and state.training and any(lg.should_write(state) for lg in self.loggers)
        elapsed = time.time() - state.start_time_s if master else 0.0
        pending = float(self._pending_signal or 0)
        sig, write, elapsed = all_max([pending, float(want_write), elapsed])
        state.elapsed_time_s = elapsed
        self._write_due = bool(write)
        if sig and self.stop_signal is None:
            self.stop_signal = Signals(int(sig))

    # -- loggers

    def add_logger(self, sublogger: BaseLogger) -> None:
        if is_master():
            sublogger.initialize(self.log_dir)
        self.loggers.append(sublogger)

    def add_loggers(self, subloggers: list[BaseLogger]) -> None:
        for sublogger in subloggers:
            self.add_logger(sublogger)

    def log_run_config(self) -> None:
        if is_master():
            for sublogger in self.loggers:
                sublogger.log_config(self.run_config)

    def write_logs(self, task: TaskT, model: ModelT, state: State) -> None:
        """Sends what the task, model and trainer logged to the sub-loggers that write now.

        In a distributed job the ranks write training logs only at the steps they agreed on in
        :meth:`sync_ranks`; only then are the values materialised and averaged over the ranks.
        """
        multi = self._log_sources(task, model)
        # The last training step is written whatever the intervals (the loop sets this alike on
        # every rank: the stop signal and the limits are agreed on).
        final = self._final_write and state.training
        if not self._distributed:
            MultiLogger.write_all(multi, self.loggers, state, force=final)
            return
        if state.training and not (self._write_due or final):
            for source in multi:
                source.clear()
            return
        self._write_due = False
        MultiLogger.write_all(multi, self.loggers, state, reduce=mean_over_ranks, force=final)

    def _log_sources(self, task: TaskT, model: ModelT) -> list[MultiLogger]:
        """Where values are logged: the task's, the model's (if it has one) and the trainer's loggers.

        Looked up once per task and model rather than at every step (unwrapping costs microseconds).
        """
        key = (task.logger, self.logger)
        cached = self.__dict__.get("_sources")
        if cached is not None and cached[0] == key and cached[1]() is model:
            return cached[2]
        sources = [task.logger, getattr(unwrap_model(model), "logger", None), self.logger]
        multi = [s for s in sources if isinstance(s, MultiLogger)]
        self._sources = (key, weakref.ref(model), multi)  # weakly: the trainer may outlive the model
        return multi

    def close_loggers(self) -> None:
        for sublogger in self.loggers:
            sublogger.close()

    # -- config and locks

    @property
    def config_path(self) -> Path:
        return self.exp_dir / "config.yaml"

    def set_run_config(self, run_config: DictConfig) -> None:
        """Sets the whole run's config (all sections), saved in config.yaml and in checkpoints."""
        self.run_config = run_config

    def save_config(self) -> None:
        save_config(self.config_path, self.run_config)

    def add_lock_file(self, lock_type: LockType, *, exists_ok: bool = False) -> None:
        add_lock_file(self.exp_dir, lock_type=lock_type, exists_ok=exists_ok)

    def remove_lock_file(self, lock_type: LockType, *, missing_ok: bool = False) -> None:
        remove_lock_file(self.exp_dir, lock_type=lock_type, missing_ok=missing_ok)

    # -- checkpoints

    def get_ckpt_path(self, state: State | None = None) -> Path:
        return get_ckpt_path(self.exp_dir, state)

    @property
    def ckpt_path(self) -> Path:
        return self.get_ckpt_path()

    def find_resume_checkpoint(self) -> Path | None:
        """The checkpoint this run continues from, or None for a fresh run.

        Normally what ``checkpoints/ckpt.pt`` links to. A numbered checkpoint newer than the
        link's target (a run stopped between writing it and swapping the link) is complete, since
        it was renamed into place only after its bytes were on disk: then that one. Without a link
        but with numbered checkpoints, the newest of them.

        Raises:
            CheckpointError: ``ckpt.pt`` links to a file that is gone.
        """
        link = self.ckpt_path
        if link.is_symlink() and not link.exists():
            raise CheckpointError(
                f"{link} points to {os.readlink(link)}, which does not exist; point the link at another "
                f"checkpoint in {link.parent} (or remove it to start over)"
            )
        numbered = sorted(
            (int(p.name[5:-3]), p) for p in link.parent.glob("ckpt.*.pt") if p.name[5:-3].isdigit()
        )
        if link.exists():
            target = link.resolve()
            linked_step = int(target.name[5:-3]) if target.name[5:-3].isdigit() else None
            if (
                numbered
                and target.parent == link.parent.resolve()
                and linked_step is not None
                and numbered[-1][0] > linked_step
            ):
                logger.warning(
                    "%s is newer than what %s links to (%s): the last run stopped before linking it; "
                    "resuming from it",
                    numbered[-1][1].name,
                    link.name,
                    target.name,
                )
                return numbered[-1][1]
            return link
        if numbered:
            logger.warning("No %s link; resuming from the newest checkpoint %s", link.name, numbered[-1][1])
            return numbered[-1][1]
        return None

    def tidy_checkpoints(self, resumed: Path) -> None:
        """After resuming from ``resumed``: the link names it, and with ``only_save_most_recent``
        no other numbered checkpoint is kept (a killed run can leave one before retention ran).

        Called by the lock holder, so no other process writes here; only rank 0 acts.
        """
        if not is_master():
            return
        target = resumed.resolve()
        if target.parent != self.ckpt_path.parent.resolve():
            return
        if not (self.ckpt_path.is_symlink() and self.ckpt_path.resolve() == target):
            atomic_symlink(target.name, self.ckpt_path)
        if self.checkpoint_config.only_save_most_recent:
            for old in target.parent.glob("ckpt.*.pt"):
                if old != target and old.name.split(".")[1].isdigit():
                    old.unlink(missing_ok=True)

    def should_checkpoint(self, state: State) -> bool:
        """Whether a checkpoint is due: every ``save_every_n_steps`` steps or ``_n_seconds`` seconds."""
        if state.num_steps == self._last_ckpt_step:
            return False
        every_n_steps, every_n_seconds = self._checkpoint_cadence()
        if every_n_steps and state.num_steps % every_n_steps == 0 and state.num_steps > 0:
            return True
        if every_n_seconds is not None:
            return state.elapsed_time_s - self._last_ckpt_time_s >= every_n_seconds
        return False

    def _checkpoint_cadence(self) -> tuple[int | None, float | None]:
        """``save_every_n_steps`` and ``save_every_n_seconds`` as plain values, read once per config.

        Asked at every step, and reading a config node costs microseconds.
        """
        cfg = self.checkpoint_config
        cached = self.__dict__.get("_cadence")
        if cached is None or cached[0] is not cfg:
            cached = self._cadence = (cfg, cfg.save_every_n_steps, cfg.save_every_n_seconds)
        return cached[1], cached[2]

    def load_checkpoint(
        self,
        ckpt: str | Path,
        task: TaskT,
        model: ModelT,
        optims: Optims | None = None,
        lr_scheds: LRScheds | None = None,
        *,
        device: str | torch.device | None = None,
        strict: bool | None = None,
    ) -> State:
        """Loads a given checkpoint, from a path or dictionary.

        The file is read with ``torch.load(weights_only=True)`` only; there is no fallback to full
        unpickling. Weights saved from a DDP-wrapped or compiled model load into a plain one and
        the other way around.

        Args:
            ckpt: The checkpoint to load (a path, or an already loaded checkpoint dict).
            task: The task to load the checkpoint into.
            model: The model to load the checkpoint into.
            optims: The optimizer to load the checkpoint into.
            lr_scheds: The learning rate scheduler to load the checkpoint into.
            device: The device to load the checkpoint onto (default: the trainer's device).
            strict: If set, raise an error if the checkpoint contains keys which don't exist in the
                model (default: ``checkpoint.load_strict``).

        Returns:
            The state loaded from the checkpoint.

        Raises:
            UnpicklingError: If the checkpoint holds objects that would need unpickling (raised as
                ``UnsafeCheckpointError``, a subclass).
            CheckpointError: If the checkpoint is missing, truncated, foreign or does not fit.
        """
        strict = self.checkpoint_config.load_strict if strict is None else strict
        if isinstance(ckpt, dict):
            where, loaded = "checkpoint dict", ckpt
        else:
            where = str(ckpt)
            loaded = read_checkpoint(ckpt, device=self._device if device is None else device)
        ckpt_dict: dict[str, Any] = loaded
        state = _state_of_checkpoint(ckpt_dict, where)  # validated before anything is restored
        task.on_after_load_checkpoint(ckpt_dict)
        for note in self.restore_model_state(model, ckpt_dict["model"], strict=strict):
            logger.warning("Loading %s into the model: %s", where, note)
        if "task" in ckpt_dict:
            task.load_state_dict(ckpt_dict["task"], strict=strict)
        if optims is not None:
            if "optim" not in ckpt_dict:
                raise CheckpointError(f"{where} has no optimizer state")
            self.restore_optim_state(model, optims, ckpt_dict["optim"])
        lr_state = ckpt_dict.get("lr", ckpt_dict.get("lr_sched"))
        if lr_scheds is not None and lr_state is not None:
            _load_named(lr_scheds, lr_state, "lr schedulers")
        if "rng" in ckpt_dict:
            set_rng_state(ckpt_dict["rng"])
        self.load_state_dict(ckpt_dict)
        self._last_ckpt_time_s = state.elapsed_time_s
        self._last_ckpt_step = state.num_steps
        return state

    def save_checkpoint(
        self,
        state: State,
        task: TaskT,
        model: ModelT,
        optims: Optims | None = None,
        lr_scheds: LRScheds | None = None,
    ) -> Path:
        """Saves a checkpoint atomically and points ``checkpoints/ckpt.pt`` at it.

        Order: write ``ckpt.<num_steps>.pt`` (temp file, fsync, rename), swap the relative
        ``ckpt.pt`` link, and only then delete every other numbered checkpoint when
        ``only_save_most_recent``. A crash at any point leaves a loadable ``ckpt.pt``.
        Only the master rank writes; every rank returns the path.

        With ``checkpoint.async_save`` the checkpoint is copied to host memory and this returns
        while a background thread writes it, in the same order; a write still in flight is waited
        for first (one at a time). A write that fails is raised by the next
        :meth:`on_step_end`, save or :meth:`wait_for_checkpoint`.

        Returns:
            The path of the new checkpoint.

        Raises:
            CheckpointWriteError: The file could not be written (this one or, asynchronously, the
                one before); the checkpoint before it is kept.
        """
        self.wait_for_checkpoint()
        ckpt_path = self.get_ckpt_path(state)
        # What only the ranks together hold (sharded weights, each rank's environments) is
        # gathered first: every rank takes part, then rank 0 alone writes.
        model_state, optim_state = self.gather_checkpoint_parts(model, optims)
        if not is_master():  # every rank keeps the same record of when the last save was
            self._last_ckpt_time_s = state.elapsed_time_s
            self._last_ckpt_step = state.num_steps
            return ckpt_path
        ckpt: dict[str, Any] = {
            "format_version": CHECKPOINT_FORMAT,
            "model": model_state,
            "task": task.state_dict(),
            "state": state.to_json(),
            "config": OmegaConf.to_yaml(self.run_config, resolve=True),
            "rng": get_rng_state(),
            "world_size": get_world_size(),
        }
        if optim_state is not None:
            ckpt["optim"] = optim_state
        if lr_scheds is not None:
            ckpt["lr"] = _named_state(lr_scheds)
        self.update_state_dict(ckpt)
        check_loadable(ckpt)

        link = self.ckpt_path
        previous = link.resolve() if link.is_symlink() and link.exists() else None
        if self.checkpoint_config.async_save:
            if self._host_snapshot is None:
                self._host_snapshot = HostSnapshot()
            # A copy the next optimizer step cannot change; the write does not block the loop.
            snapshot = self._host_snapshot.take(ckpt)
            del ckpt, model_state, optim_state
            pending = _PendingSave(ckpt_path, task)
            # Not a daemon: an interpreter that exits still finishes the write (and its link).
            pending.thread = threading.Thread(
                target=self._write_in_background, args=(pending, snapshot, previous), name="ml-checkpoint"
            )
            self._pending_save = pending
            pending.thread.start()
            self._last_ckpt_time_s = state.elapsed_time_s
            self._last_ckpt_step = state.num_steps
            return ckpt_path
        self._write_checkpoint(ckpt, ckpt_path, previous)
        self._last_ckpt_time_s = state.elapsed_time_s
        self._last_ckpt_step = state.num_steps
        task.on_after_save_checkpoint(ckpt_path)
        return ckpt_path

    def _write_in_background(
        self, pending: _PendingSave, ckpt: dict[str, Any], previous: Path | None
    ) -> None:
        try:
            self._write_checkpoint(ckpt, pending.path, previous)
        except BaseException as e:  # raised in the training thread, by _finish_save
            pending.error = e

    def _write_checkpoint(self, ckpt: dict[str, Any], ckpt_path: Path, previous: Path | None) -> None:
        """Writes ``ckpt`` durably, then links it, removes older ones and marks the run (rank 0)."""
        try:
            atomic_write_with(ckpt_path, lambda f: torch.save(ckpt, f))
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            kept = f"{previous.name} is kept" if previous is not None else "no earlier checkpoint exists"
            raise CheckpointWriteError(
                f"cannot write checkpoint {ckpt_path}: {_io_reason(e, ckpt_path.parent)}; {kept}"
            ) from e
        atomic_symlink(ckpt_path.name, self.ckpt_path)
        if self.checkpoint_config.only_save_most_recent:
            # Every other numbered checkpoint, not only the one the link named before: a process
            # killed between the link swap and this point left its previous one behind.
            for old in ckpt_path.parent.glob("ckpt.*.pt"):
                if old != ckpt_path and old.name.split(".")[1].isdigit():
                    old.unlink(missing_ok=True)
        self.add_lock_file("ckpt", exists_ok=True)
        logger.info("Saved checkpoint %s", ckpt_path)

    def wait_for_checkpoint(self) -> Path | None:
        """Waits for the asynchronous checkpoint write in flight, if any, to be durable and linked.

        Returns:
            The path of the checkpoint that was waited for, or None when none was in flight.

        Raises:
            CheckpointWriteError: That write failed (the checkpoint before it is kept).
        """
        pending = self._pending_save
        if pending is None:
            return None
        pending.thread.join()
        return self._finish_save(pending)

    def _finish_save(self, pending: _PendingSave) -> Path:
        """After a background write ended: raise its error, or run the task's hook for it."""
        self._pending_save = None
        if pending.error is not None:
            raise pending.error
        if self._host_snapshot is not None:
            self._host_snapshot.release()  # the buffers serve the next save's copy
        pending.task.on_after_save_checkpoint(pending.path)
        return pending.path

    def gather_checkpoint_parts(self, model: ModelT, optims: Optims | None) -> tuple[Any, Any]:
        """The model's and optimizers' state for a checkpoint; called on every rank before saving.

        Subclasses that shard state over ranks gather it here (a collective); the default reads
        this process's copies.
        """
        return unwrap_model(model).state_dict(), None if optims is None else _named_state(optims)

    def restore_model_state(self, model: ModelT, state: Mapping[str, Any], *, strict: bool) -> list[str]:
        """Loads checkpointed weights into ``model`` (on every rank); returns notes on what did not fit."""
        return load_model_state(model, state, strict=strict)

    def restore_optim_state(self, model: ModelT, optims: Optims, state: Any) -> None:
        """Loads checkpointed optimizer state (on every rank)."""
        del model
        _load_named(optims, state, "optimizers")

    def load_state_dict(self, state_dict: dict) -> None:
        """Function for loading state dict keys for different components.

        Args:
            state_dict: The loaded checkpoint; overriders read the keys they added in
                :meth:`update_state_dict`.
        """
        del state_dict

    def update_state_dict(self, state_dict: dict) -> None:
        """Function for getting the checkpoint to save.

        Args:
            state_dict: The state dictionary being saved (overriders should mutate inplace)
        """
        del state_dict

    # -- the loop

    def train(
        self, model: ModelT, task: TaskT, optimizer: BaseOptimizer, lr_scheduler: BaseLRScheduler
    ) -> None:
        """Runs the training loop.

        Args:
            model: The current model
            task: The current task
            optimizer: The current optimizer
            lr_scheduler: The current learning rate scheduler

        Raises:
            NotImplementedError: If the subclass does not implement this method
        """
        raise NotImplementedError(f"{type(self).__name__} must implement train()")

    # -- signals

    def add_signal_handler(self, sig: Signals, handler: SignalHandler) -> None:
        """Registers ``handler`` to run (after the checkpoint) when the loop stops for ``sig``."""
        self.signal_handlers[sig].append(handler)

    @contextmanager
    def install_signal_handlers(
        self, signals: tuple[Signals, ...] = (Signals.SIGTERM, Signals.SIGINT, Signals.SIGUSR1)
    ) -> Iterator[None]:
        """Routes ``signals`` to :attr:`stop_signal` while the block runs, then restores the old handlers.

        The handler only records the signal; a second SIGINT raises ``KeyboardInterrupt``.
        """

        def on_signal(signum: int, frame: Any) -> None:
            del frame
            sig = Signals(signum)
            now = time.monotonic()
            if sig == Signals.SIGINT and Signals.SIGINT in (self.stop_signal, self._pending_signal):
                # In a job, one Ctrl-C reaches a worker twice: from the terminal and passed on by
                # torchrun. A second SIGINT within a second is that same keypress.
                if not (self._distributed and now - self._first_sigint < 1.0):
                    raise KeyboardInterrupt
                return
            if sig == Signals.SIGINT:
                self._first_sigint = now
            if self._distributed or dist_env().is_distributed:  # acted on once the ranks agree (sync_ranks)
                if self._pending_signal is None or sig == Signals.SIGINT:
                    self._pending_signal = sig
            elif self.stop_signal is None or sig == Signals.SIGINT:
                self.stop_signal = sig

        previous: dict[Signals, Any] = {}
        try:
            for sig in signals:
                previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: leave signals to the caller
            logger.debug("Not in the main thread; signal handlers not installed")
        early = take_early_signal()  # received while the program was starting
        if early is not None:
            logger.warning("%s arrived during start-up: stopping at once, with a checkpoint", early.name)
            if self._distributed or dist_env().is_distributed:
                self._pending_signal = early
            else:
                self.stop_signal = early
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def on_exit(
        self,
        sig: Signals,
        state: State,
        task: TaskT,
        model: ModelT,
        optim: Optims,
        lr_scheduler: LRScheds,
    ) -> None:
        """Saves a checkpoint, then runs the handlers registered for ``sig``.

        Called by the loop at a step boundary after a signal set :attr:`stop_signal`; never from
        inside the signal handler itself.
        """
        logger.info("Stopping on %s at step %d: saving a checkpoint", sig.name, state.num_steps)
        self.wait_for_checkpoint()  # a write in flight decides whether ckpt.pt exists
        # In a distributed job every rank must take the same decision (saving may be collective).
        if self._last_ckpt_step != state.num_steps or (not self._distributed and not self.ckpt_path.exists()):
            self.save_checkpoint(state, task, model, optim, lr_scheduler)
        self.wait_for_checkpoint()  # durable before the handlers run (they may requeue the job)
        for handler in self.signal_handlers.get(sig, []):
            handler()

    # -- hooks

    def on_step_start(
        self, state: State, task: TaskT, model: ModelT, optim: Optims, lr_sched: LRScheds
    ) -> None:
        task.on_step_start(state, model, optim, lr_sched)

    def on_step_end(
        self,
        state: State,
        loss_dict: dict[str, torch.Tensor],
        task: TaskT,
        model: ModelT,
        optim: Optims,
        lr_sched: LRScheds,
    ) -> None:
        self.sync_ranks(state)  # the clock; in a distributed job also the agreed stop flag and log writes
        pending = self._pending_save
        if pending is not None and not pending.thread.is_alive():  # a background write ended
            self._finish_save(pending)  # raises its error: the run stops at this step
        task.on_step_end(state, loss_dict, model, optim, lr_sched)

    def on_epoch_start(
        self, state: State, task: TaskT, model: ModelT, optim: Optims, lr_sched: LRScheds
    ) -> None:
        state.num_epoch_steps = 0
        state.num_epoch_samples = 0
        task.on_epoch_start(state, model, optim, lr_sched)

    def on_epoch_end(
        self, state: State, task: TaskT, model: ModelT, optim: Optims, lr_sched: LRScheds
    ) -> None:
        state.num_epochs += 1
        task.on_epoch_end(state, model, optim, lr_sched)
        state.num_epoch_steps = 0  # between epochs the position in the (next) epoch is 0
        state.num_epoch_samples = 0

    def take_running_lock(self) -> None:
        """Takes ``.lock_running`` for this process, so one experiment is never trained twice at once.

        A lock left by a process that died on this host is taken over; one held by a live process
        (or by a process on another host) raises :class:`RunLockedError`. Deciding and writing
        happen under an exclusive ``flock`` on ``.lock_guard``, so of several processes racing for
        the same run exactly one wins, stale lock or not. Taking a lock this process holds is a
        no-op. Only the master rank takes it.
        """
        if not is_master():
            return
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        with open(self.exp_dir / ".lock_guard", "a") as guard:
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
            holder = read_lock_file(self.exp_dir, "running")
            if holder is not None and (holder.pid, holder.host) == (os.getpid(), socket.gethostname()):
                return
            if holder is not None:
                if not holder.is_stale():
                    raise RunLockedError(
                        f"{self.exp_dir} is already being trained (pid {holder.pid} on {holder.host}); "
                        f"remove {_lock_path(self.exp_dir, 'running')} if that process is gone"
                    )
                logger.warning("Taking over the running lock of dead process %s", holder.pid)
            self.add_lock_file("running", exists_ok=True)
        # Temporary files of atomic writes (checkpoints, the link, config.yaml) left by a process
        # killed mid-write: only the lock holder writes here, so none of them is in use.
        for folder in (self.exp_dir, self.ckpt_path.parent):
            for partial in folder.glob(".*.tmp"):
                partial.unlink(missing_ok=True)

    def on_training_start(
        self, state: State, task: TaskT, model: ModelT, optim: Optims, lr_sched: LRScheds
    ) -> None:
        """Takes the ``running`` lock (see :meth:`take_running_lock`), then calls the task's hook.

        Elapsed time continues from the state (a resumed run keeps its clock).
        """
        self.take_running_lock()
        logger.info("Training in %s", self.exp_dir)
        state.start_time_s = time.time() - state.elapsed_time_s
        task.on_training_start(state, model, optim, lr_sched)

    def on_training_end(
        self, state: State, task: TaskT, model: ModelT, optim: Optims, lr_sched: LRScheds
    ) -> None:
        try:
            self.wait_for_checkpoint()  # never leave a write half done, nor release the run before it
        finally:
            task.on_training_end(state, model, optim, lr_sched)
            self.remove_lock_file("running", missing_ok=True)
        logger.info("Exiting training job for %s", self.config_path)
