"""Defines the base trainer class and config.

The trainer is the thing that actually runs the training loop. There are separate trainers for
supervised and reinforcement learning (``ml.trainers.sl`` and ``ml.trainers.rl``); the base trainer
owns what they share: the order of a training session, the experiment directory and its lock
files, the config snapshot, checkpoints, loggers, signals and the hooks.

:meth:`BaseTrainer.train` is a template that reads top to bottom (see :meth:`BaseTrainer.run_session`)::

    check the task -> set up (device, model, optimizer, data: nothing written yet)
    -> take the run's lock -> resume from the newest checkpoint, or seed a fresh run
    -> on_training_start -> config.yaml -> loop -> finish (unless a signal stopped the loop)
    -> on_exit for a signal (checkpoint, then the registered handlers)
    -> teardown (on_training_end, lock, loggers) -> status.json

A trainer supplies :meth:`BaseTrainer.set_up`, :meth:`BaseTrainer.loop` and
:meth:`BaseTrainer.finish` (and :meth:`BaseTrainer.close` for what its set-up opened).

Where things lie in the run folder is :mod:`ml.run`'s knowledge; this module re-exports the
spec's names for it (``add_lock_file``, ``get_ckpt_path``, ``get_empty_exp_dir``, ...).

Notes for subclass authors:

- Signals. :meth:`BaseTrainer.install_signal_handlers` installs handlers for SIGTERM, SIGINT and
  SIGUSR1 that only record the signal in :attr:`BaseTrainer.stop_signal`, for the whole session,
  teardown included. Your loop checks it at each step boundary and returns; the session then calls
  :meth:`BaseTrainer.on_exit` (which saves a checkpoint and runs the handlers registered with
  :meth:`BaseTrainer.add_signal_handler`). Nothing is saved from inside a signal handler, so a
  checkpoint always holds a consistent step. A second SIGINT raises ``KeyboardInterrupt`` at once;
  atomic writes leave no partial file behind.
- Checkpoints are written atomically by rank 0 and read with ``torch.load(weights_only=True)``.
  Whatever :meth:`BaseTrainer.update_state_dict` adds must be tensors or plain data. With
  ``checkpoint.async_save`` the write runs in a background thread from a host copy; the loop's
  :meth:`BaseTrainer.on_step_end` reports a failed one, and :meth:`BaseTrainer.on_exit` and
  :meth:`BaseTrainer.on_training_end` wait for the one in flight (see
  :meth:`BaseTrainer.wait_for_checkpoint`).
"""

import dataclasses
import datetime
import functools
import itertools
import logging
import os
import signal
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from signal import Signals
from typing import Any, Generic, TypeVar

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from torch.optim import Optimizer

from ml.core.config import BaseConfig, BaseObject, conf_field
from ml.core.diff import diff_configs, segment_changes  # torch-free (for `ml diff`); re-exported here
from ml.core.monitor import EarlyStopping, mode_of
from ml.core.state import PHASES, State
from ml.errors import (
    CheckpointError,
    CheckpointWriteError,
    ConfigChangedError,
    ConfigError,
    RunDirNotSetError,
    RunLockedError,
    UserError,
    first_line,
)
from ml.loggers.base import BaseLogger, MultiLogger, load_logger_states, logger_states
from ml.lr_schedulers.base import BaseLRScheduler, SchedulerAdapter
from ml.models.base import BaseModel
from ml.optimizers.base import BaseOptimizer
from ml.run.checkpoints import (
    Ranking,
    begin_sharded_checkpoint,
    link_checkpoint,
    newest_verified_checkpoint,
    publish_sharded_checkpoint,
    score_checkpoint,
    write_checkpoint_file,
)
from ml.run.claim import check_log_dir_name, get_empty_exp_dir, new_exp_dir
from ml.run.layout import LOCK_TYPES, LockType, RunDir
from ml.run.locks import LockInfo, read_lock, remove_lock, take_running_lock, write_lock
from ml.run.status import reserve_status, restore_status, status_record, write_status
from ml.tasks.base import BaseTask
from ml.utils.atomic import atomic_write_text, fsync_dir, open_append, read_regular
from ml.utils.checkpoint import (
    HostSnapshot,
    ShardedState,
    check_loadable,
    get_rng_state,
    load_model_state,
    optimizer_misfit,
    read_checkpoint,
    set_rng_state,
    unwrap_model,
    verify_checkpoint,
)
from ml.utils.device import parse_device, resolve_device
from ml.utils.distributed import (
    all_gather_object,
    all_max,
    broadcast_object,
    get_rank,
    get_world_size,
    init_distributed,
    is_master,
    mean_over_ranks,
)
from ml.utils.precision import MATMUL_PRECISIONS, describe_matmul_precision, float32_matmul_precision
from ml.utils.profiling import ProfileConfig, StepProfiler, check_profile_config
from ml.utils.ranks import dist_env, export_env
from ml.utils.seeding import seed_everything
from ml.utils.sharded import (
    checkpoint_format,
    load_sharded_model,
    load_sharded_optims,
    save_shards,
    wait_for_shards,
)
from ml.utils.signals import arm_watchdog, stand_down, take_early_signal, training_began

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
PARALLEL_MODES = ("ddp", "fsdp")

__all__ = [
    "LOCK_TYPES",
    "BaseTrainer",
    "BaseTrainerConfig",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointWriteError",
    "EarlyStoppingConfig",
    "LockType",
    "ModelT",
    "RunDirNotSetError",
    "RunLockedError",
    "Session",
    "TaskT",
    "TrainerConfig",
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
# Lock files and experiment directories (the spec's names; ml.run owns the layout)


def add_lock_file(exp_dir: Path, lock_type: LockType, *, exists_ok: bool = False) -> None:
    """Creates ``exp_dir/.lock_<lock_type>`` holding this process's pid, host and the time.

    The file is written whole, then linked into place (an exclusive create), so of two processes
    racing for one lock exactly one wins, and a full disk leaves no empty lock. Only the master
    rank writes.

    Args:
        exp_dir: The experiment directory (created if missing).
        lock_type: ``running``, ``scheduled`` or ``ckpt``.
        exists_ok: Overwrite an existing lock instead of raising.

    Raises:
        RuntimeError: The lock exists and ``exists_ok`` is false.
    """
    run = RunDir(exp_dir)
    run.lock(lock_type)  # a bad lock type is refused on every rank
    if not is_master():
        return
    try:
        write_lock(run, lock_type, exists_ok=exists_ok)
    except FileExistsError:
        raise RuntimeError(f"lock file already exists: {run.lock(lock_type)}") from None


def remove_lock_file(exp_dir: Path, lock_type: LockType, *, missing_ok: bool = False) -> None:
    """Removes ``exp_dir/.lock_<lock_type>`` (master rank only).

    Raises:
        RuntimeError: The lock does not exist and ``missing_ok`` is false.
    """
    run = RunDir(exp_dir)
    run.lock(lock_type)
    if not is_master():
        return
    try:
        remove_lock(run, lock_type, missing_ok=missing_ok)
    except FileNotFoundError:
        raise RuntimeError(f"lock file not found: {run.lock(lock_type)}") from None


def has_lock_file(exp_dir: Path, lock_type: LockType | None = None) -> bool:
    """Whether ``exp_dir`` holds the given lock, or any lock when ``lock_type`` is None."""
    types = LOCK_TYPES if lock_type is None else (lock_type,)
    return any(RunDir(exp_dir).lock(t).exists() for t in types)


def read_lock_file(exp_dir: Path, lock_type: LockType) -> LockInfo | None:
    """Parses a lock file; None when there is none."""
    return read_lock(RunDir(exp_dir), lock_type)


def get_ckpt_path(exp_dir: Path, state: State | None = None) -> Path:
    """Defines the path to the checkpoint for a given state.

    Args:
        exp_dir: The experiment directory
        state: The current trainer state

    Returns:
        The path to the PyTorch checkpoint to save or load: ``checkpoints/ckpt.pt`` (the link to
        the newest) without a state, ``checkpoints/ckpt.<num_steps>.pt`` with one.
    """
    run = RunDir(exp_dir)
    return run.link if state is None else run.checkpoint(state.num_steps)


def get_exp_dir(run_dir: Path, run_id: int) -> Path:
    return (Path(run_dir) / f"run_{run_id}").resolve()


# ---------------------------------------------------------------------------------------------
# Config snapshots and diffs


def save_config(config_path: Path, raw_config: DictConfig, *, resolve: bool = True) -> None:
    """Writes the config atomically (master rank only), resolved unless ``resolve`` is false.

    If a different config is already there (a run continued with changed settings), the change is
    logged as a ``-``/``+`` diff and the old file is kept beside it as ``config.<time>.yaml``.
    """
    if not is_master():
        return
    config_path = Path(config_path)
    text = OmegaConf.to_yaml(raw_config, resolve=resolve)
    if config_path.exists():
        old_text = read_regular(config_path).decode("utf-8")
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
    monitor: str | None = conf_field(
        None,
        help="Keep the best checkpoints by this evaluation metric (e.g. valid/loss), the best linked as "
        "checkpoints/best.pt; a checkpoint is saved at every evaluation",
    )
    mode: str | None = conf_field(
        None, help="min or max: which way `monitor` improves (unset: max for names with acc/return/reward)"
    )
    keep_top_k: int = conf_field(1, help="With `monitor`: the best checkpoints kept besides the latest")
    format: str | None = conf_field(
        None,
        help="full (one file, the whole state gathered to rank 0) or sharded (a folder: every rank writes "
        "its shards at once; resumable with any number of processes); unset: sharded under FSDP, else full",
    )


CHECKPOINT_FORMATS = ("full", "sharded")
FSDP_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class FsdpConfig:
    param_dtype: str | None = conf_field(
        None, help="FSDP mixed precision: the dtype parameters are gathered and computed in (e.g. bfloat16)"
    )
    reduce_dtype: str | None = conf_field(
        None, help="FSDP mixed precision: the dtype gradients are reduced in (float32 keeps them exact)"
    )
    hybrid: bool = conf_field(
        False, help="HSDP: shard within each group of shard_size processes (a node), replicate across groups"
    )
    shard_size: int | None = conf_field(
        None, help="With hybrid: the processes one copy is sharded over (default: a node's, LOCAL_WORLD_SIZE)"
    )


@dataclass
class DdpConfig:
    find_unused_parameters: bool = conf_field(
        False,
        help="Let trainable parameters that take no part in a step's loss (a branch not taken, a head "
        "left unused) go without a gradient: DDP then looks for them after each forward pass. Off, such a "
        "parameter stops the run at its first step",
    )


@dataclass
class EarlyStoppingConfig:
    monitor: str | None = conf_field(
        None, help="Stop training (as finished) once this evaluation metric (e.g. valid/loss) stops improving"
    )
    mode: str | None = conf_field(
        None, help="min or max: which way `monitor` improves (unset: max for names with acc/return/reward)"
    )
    patience: int = conf_field(3, help="Evaluations in a row without improvement before stopping")
    min_delta: float = conf_field(0.0, help="An improvement must exceed this")


@dataclass
class _PendingSave:
    """A checkpoint being written in the background (``checkpoint.async_save``)."""

    path: Path
    task: Any  # None on the ranks other than 0 (they write only shards)
    score: "tuple[float, Ranking] | None"
    shards: "Future | None" = None  # checkpoint.format=sharded: the shards being written
    thread: threading.Thread = field(init=False)
    error: BaseException | None = None


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
        config.exp_dir = str(new_exp_dir(str(config.exp_name)))


@dataclass
class TrainerConfig(BaseTrainerConfig):
    """Settings every training loop here shares, beyond the spec's :class:`BaseTrainerConfig`."""

    device: str = conf_field(
        "auto",
        help="auto (CUDA, else MPS, else CPU), cpu, cuda (a distributed job: the local rank's GPU), cuda:N "
        "or mps; the ML_DEVICE environment variable overrides it",
    )
    float32_matmul_precision: str | None = conf_field(
        None,
        help="torch.set_float32_matmul_precision for the run: highest (float32), high (on CUDA, TF32 tensor "
        "cores: faster, inputs rounded to 10 mantissa bits) or medium (bfloat16); null: as torch has it",
    )
    parallel: str = conf_field(
        "ddp", help="With several processes: `ddp` (a model copy per process) or `fsdp` (sharded, FSDP2)"
    )
    sync_every_n_steps: int = conf_field(
        10, help="With several processes: agree on stop signals, the clock and log writes every N steps"
    )
    fast_optimizer: bool = conf_field(
        True,
        help="Step Adam/AdamW with the fused kernel (else torch's default, a per-tensor loop on CPU): much "
        "faster on CPU. A resumed run steps as its checkpoint's optimizer did",
    )
    tune_malloc: bool = conf_field(
        True,
        help="Linux/glibc: keep freed memory for the next step, not fault it back in (ml.utils.malloc)",
    )
    progress_bar: bool = conf_field(
        True, help="On a terminal (stderr), rank 0: a training progress bar, and bars for validation and test"
    )
    early_stopping: EarlyStoppingConfig = conf_field(
        EarlyStoppingConfig(), help="Stop when an evaluation metric stops improving"
    )
    profile: ProfileConfig = conf_field(
        ProfileConfig(), help="torch's profiler over chosen training steps (trace in logs/profile)"
    )
    ddp: DdpConfig = conf_field(DdpConfig(), help="With parallel=ddp: parameters the loss may leave out")
    fsdp: FsdpConfig = conf_field(FsdpConfig(), help="With parallel=fsdp: mixed precision, hybrid sharding")
    activation_checkpointing: bool = conf_field(
        False,
        help="Recompute each shard unit's activations (model.shard_units(): its blocks) in the backward "
        "pass instead of keeping them: less memory, more compute",
    )


def check_interval(key: str, value: float | None) -> None:
    """Refuses an interval (``..._every_n_steps``, ``..._every_n_seconds``) that is not positive: a
    negative one would act as its absolute value, or every step; null turns the interval off."""
    if value is not None and value <= 0:
        raise ConfigError(f"{key} must be positive (or null, to turn it off), got {value}")


def check_trainer_config(config: TrainerConfig) -> None:
    """Refuses a :class:`TrainerConfig` whose shared settings are out of range (one line)."""
    parse_device(config.device)  # its form; whether this machine has it: when the trainer asks
    check_interval("trainer.checkpoint.save_every_n_steps", config.checkpoint.save_every_n_steps)
    check_interval("trainer.checkpoint.save_every_n_seconds", config.checkpoint.save_every_n_seconds)
    if config.float32_matmul_precision not in (None, *MATMUL_PRECISIONS):
        raise ConfigError(
            f"trainer.float32_matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)} (or null), "
            f"got {config.float32_matmul_precision!r}"
        )
    if config.parallel not in PARALLEL_MODES:
        choices = ", ".join(PARALLEL_MODES)
        raise ConfigError(f"trainer.parallel must be one of {choices}, got {config.parallel!r}")
    if config.sync_every_n_steps < 1:
        raise ConfigError(f"trainer.sync_every_n_steps must be positive, got {config.sync_every_n_steps}")
    if config.checkpoint.format is not None and config.checkpoint.format not in CHECKPOINT_FORMATS:
        raise ConfigError(
            f"trainer.checkpoint.format must be full or sharded (or unset), got {config.checkpoint.format!r}"
        )
    for key in ("param_dtype", "reduce_dtype"):
        if getattr(config.fsdp, key) not in (None, *FSDP_DTYPES):
            raise ConfigError(
                f"trainer.fsdp.{key} must be one of {', '.join(FSDP_DTYPES)} (or unset), got "
                f"{getattr(config.fsdp, key)!r}"
            )
    if config.fsdp.shard_size is not None and config.fsdp.shard_size < 1:
        raise ConfigError(f"trainer.fsdp.shard_size must be positive, got {config.fsdp.shard_size}")
    check_profile_config(config.profile)


TrainerConfigT = TypeVar("TrainerConfigT", bound=BaseTrainerConfig)
ModelT = TypeVar("ModelT", bound=BaseModel)
TaskT = TypeVar("TaskT", bound=BaseTask)

Optims = Optimizer | dict[str, Optimizer]
LRScheds = SchedulerAdapter | dict[str, SchedulerAdapter]
SignalHandler = Callable[[], None]


@dataclass
class Session:
    """What one training session works with: built by :meth:`BaseTrainer.set_up`, used by the rest.

    Trainers subclass it for what their loop needs besides (data loaders, environments, ...).
    """

    model: Any
    task: Any
    optim: Any
    lr_sched: Any
    seed: int  # seeds every generator of a fresh run


def _state_of_checkpoint(ckpt: Mapping[str, Any], where: str) -> State:
    """The checkpoint's :class:`State` (a JSON string, or a dict in older checkpoints), validated."""
    if not isinstance(ckpt.get("model"), Mapping | ShardedState):
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


def _end_of_links(path: Path) -> Path:
    """The path a chain of links ends at, the folders above each left as written (another machine
    may mount them elsewhere); a loop is left to the reader, which says so."""
    seen = set()
    while path.is_symlink() and path not in seen:
        seen.add(path)
        path = path.parent / os.readlink(path)
    return path


def _steps_on_cpu(state: Any) -> Any:
    """An optimizer state dict (or a dict of them by name) with every ``step`` tensor on the CPU."""
    if not isinstance(state, Mapping):
        return state
    if "state" not in state or "param_groups" not in state:
        return {name: _steps_on_cpu(part) for name, part in state.items()}
    per_param = state["state"]
    if not isinstance(per_param, Mapping):
        return state
    moved = {
        key: (
            {**value, "step": value["step"].cpu()}
            if isinstance(value, Mapping) and isinstance(value.get("step"), torch.Tensor)
            else value
        )
        for key, value in per_param.items()
    }
    return {**state, "state": moved}


def _tear_down(steps: list[Callable[[], None]], *, quiet: bool) -> None:
    """Runs every step; a step that fails does not skip the others, nor hide the error in flight.

    With ``quiet`` (an error is already propagating: the disk may be full or read-only), failures
    are logged; otherwise the first one is raised after all steps ran.
    """
    first: Exception | None = None
    for step in steps:
        try:
            step()
        except Exception as e:
            if quiet:
                logger.warning("While stopping after an error: %s: %s", type(e).__name__, e)
            elif first is None:
                first = e
    if first is not None:
        raise first


# ---------------------------------------------------------------------------------------------
# The trainer


def warn_unused(section: str, switch: str, config: Any, defaults: Any, names: tuple[str, ...]) -> None:
    """Warns of settings of ``section`` that differ from their defaults while ``switch`` is off:
    they do nothing then, which a user who set them would not expect without a word."""
    changed = [name for name in names if getattr(config, name) != getattr(defaults, name)]
    if changed:
        settings = ", ".join(f"{section}.{name}" for name in changed)
        logger.warning("%s: set without %s.%s, so ignored", settings, section, switch)


def _ranking_of(config: CheckpointConfig) -> Ranking | None:
    """``checkpoint.monitor``, ``mode`` and ``keep_top_k``, checked; None without a monitor."""
    if config.monitor is None:
        warn_unused("trainer.checkpoint", "monitor", config, CheckpointConfig(), ("mode", "keep_top_k"))
        return None
    if config.keep_top_k < 1:
        raise ConfigError(f"trainer.checkpoint.keep_top_k must be positive, got {config.keep_top_k}")
    mode = mode_of(config.monitor, config.mode, "trainer.checkpoint.mode")
    return Ranking(str(config.monitor), mode, int(config.keep_top_k))


def _early_stopping_of(config: EarlyStoppingConfig | None) -> EarlyStopping | None:
    """``trainer.early_stopping``, checked; None without a monitor."""
    if config is None:
        return None
    if config.monitor is None:
        names = ("mode", "patience", "min_delta")
        warn_unused("trainer.early_stopping", "monitor", config, EarlyStoppingConfig(), names)
        return None
    if config.patience < 1:
        raise ConfigError(f"trainer.early_stopping.patience must be positive, got {config.patience}")
    if not config.min_delta >= 0:
        raise ConfigError(f"trainer.early_stopping.min_delta must be 0 or more, got {config.min_delta}")
    mode = mode_of(config.monitor, config.mode, "trainer.early_stopping.mode")
    return EarlyStopping(str(config.monitor), mode, int(config.patience), float(config.min_delta))


def _check_one_direction(ranking: Ranking | None, stopping: EarlyStopping | None) -> None:
    """Refuses one metric that the best checkpoints and early stopping judge in opposite directions
    (the best checkpoint would be the one early stopping gives up on; ``ml runs`` could not say
    which value is best)."""
    if ranking is None or stopping is None or ranking.metric != stopping.monitor:
        return
    if ranking.mode != stopping.mode:
        raise ConfigError(
            f"trainer.checkpoint.mode={ranking.mode} and trainer.early_stopping.mode={stopping.mode} "
            f"judge {ranking.metric} in opposite directions: give both the same mode"
        )


class BaseTrainer(BaseObject[TrainerConfigT], Generic[TrainerConfigT, ModelT, TaskT]):
    """Defines the base trainer type.

    Attributes:
        stop_signal: The stop signal received (agreed on by every rank), or None.
        stop_reason: Why the run ended as finished before its limits (early stopping), or None.
        finished: Whether the run completed: every step, and the trainer's :meth:`finish`.
        early_stopping: The patience count of ``trainer.early_stopping`` (None when off).
        task_type: The kind of task this trainer trains (checked before anything else).
    """

    task_type: type[BaseTask] = BaseTask

    def __init__(self, config: TrainerConfigT) -> None:
        super().__init__(config)
        if _is_missing(config, "exp_dir"):
            type(config).resolve(config)
        self.exp_name: str = config.exp_name
        self.exp_dir = Path(config.exp_dir).expanduser().resolve()
        self.run = RunDir(self.exp_dir, check_log_dir_name(config.log_dir_name))
        self.log_dir = self.run.logs
        self.checkpoint_config: CheckpointConfig = config.checkpoint
        self.loggers: list[BaseLogger] = []
        self.logger = MultiLogger(default_namespace="trainer")
        self.signal_handlers: dict[Signals, list[SignalHandler]] = defaultdict(list)
        self.run_config: DictConfig = self.raw_config
        self._saved_config: DictConfig | None = None  # the config as saved, when not all resolved
        self._previous_status: bytes | None = None  # status.json before this session's (reserve_status)
        self.stop_signal: Signals | None = None
        self.finished = False
        self.distributed = False
        self.allow_config_change = False  # resume even if the model, data, ... changed (the CLI's flag)
        self._pending_signal: Signals | None = None  # distributed: received, not yet agreed on
        self._first_sigint = 0.0
        self._write_due = True  # distributed: whether the ranks agreed to write training logs now
        self._last_ckpt_time_s = 0.0
        self._last_ckpt_step = -1
        self._device_cache: torch.device | None = None
        self._pending_save: _PendingSave | None = None  # checkpoint.async_save: the write in flight
        self._host_snapshot: HostSnapshot | None = None
        self.stop_reason: str | None = None  # why a run ended before its limits (early stopping)
        self._ranking = _ranking_of(self.checkpoint_config)
        self.early_stopping = _early_stopping_of(getattr(config, "early_stopping", None))
        _check_one_direction(self._ranking, self.early_stopping)
        self._score: tuple[int, float] | None = None  # the monitored metric's last (step, value)
        self._session_start_step = 0  # where this session's training began (write_status)
        self._profiler: StepProfiler | None = None  # trainer.profile, while the loop runs (profiling)

    # -- the session, top to bottom

    def train(
        self, model: ModelT, task: TaskT, optimizer: BaseOptimizer, lr_scheduler: BaseLRScheduler
    ) -> None:
        """Runs the training loop.

        Checks the task, sets up (nothing is written to disk, so a task or model that cannot be
        used stops with the run untouched), then runs the session (:meth:`run_session`) and closes
        what the set-up opened. Stop signals are recorded for the whole of it.

        Args:
            model: The current model
            task: The current task
            optimizer: The current optimizer
            lr_scheduler: The current learning rate scheduler

        Raises:
            NotImplementedError: If the subclass does not implement :meth:`set_up` and :meth:`loop`
        """
        self.check_task(task)
        with self.install_signal_handlers(), self.training_context():
            try:
                session = self.set_up(model, task, optimizer, lr_scheduler)
                try:
                    self.run_session(session)
                finally:
                    self.close(session)
            finally:
                stand_down()  # the session is over: a stop signal's watchdog has nothing to end

    def run_session(self, s: Session) -> None:
        """Takes the run, resumes or starts it, loops, finishes or stops, tears down, records.

        Errors propagate after the teardown. Last, rank 0 records how the session ended in
        ``status.json`` (:mod:`ml.run.status`) - unless it never began (another process holds the
        run, the checkpoint or config was refused: bad input leaves the run as it was).
        """
        self.take_run()  # before reading the checkpoint: one process per run
        state = State.init_state()
        began = started = False
        error: BaseException | None = None
        try:
            state = self.resume_or_start(s)
            self._session_start_step = state.num_steps
            began = True
            training_began()  # a stop signal from now on stops the loop with a checkpoint
            self.reserve_status(state)
            self.on_training_start(state, s.task, s.model, s.optim, s.lr_sched)
            started = True
            self.save_config()
            self.log_run_config()
            with self.profiling():
                self.loop(state, s)
            self.sync_ranks(state, force=True)  # a signal received since the last agreement counts too
            if self.stop_signal is None:
                self.finish(state, s)
            if self.stop_signal is not None and not self.finished:  # also one during the finish
                self.on_exit(self.stop_signal, state, s.task, s.model, s.optim, s.lr_sched)
        except BaseException as e:
            error = e
            raise
        finally:
            steps: list[Callable[[], None]] = [
                (lambda: self.on_training_end(state, s.task, s.model, s.optim, s.lr_sched))
                if started
                else (lambda: self.remove_lock_file("running", missing_ok=True)),
                self.close_loggers,
            ]
            try:
                _tear_down(steps, quiet=error is not None)
            except BaseException as e:
                error = error or e
                raise
            finally:
                if began and is_master():
                    self.write_status(state, error)

    def set_up(
        self, model: ModelT, task: TaskT, optimizer: BaseOptimizer, lr_scheduler: BaseLRScheduler
    ) -> Session:
        """Places the model, builds the optimizer, schedule and data: what the session works with.

        Writes nothing to disk. Raises :class:`ml.errors.UserError` for a task or model that
        cannot be used.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement set_up() (or train())")

    def loop(self, state: State, s: Session) -> None:
        """Trains from ``state`` until the task's limits are met or :attr:`stop_signal` is set."""
        raise NotImplementedError(f"{type(self).__name__} must implement loop() (or train())")

    def finish(self, state: State, s: Session) -> None:
        """The end of a completed run (final checkpoint, last evaluation); sets :attr:`finished`.

        It may stop early for a signal, which is then handled like one during the loop.
        """
        if not self.checkpoint_is_current(state):
            self.save_checkpoint(state, s.task, s.model, s.optim, s.lr_sched)
        self.finished = self.stop_signal is None

    def close(self, s: Session) -> None:
        """Releases what :meth:`set_up` opened (environments, ...), after the session."""
        del s

    @contextmanager
    def profiling(self) -> Iterator[None]:
        """``trainer.profile``'s profiler around the loop, on rank 0 (:mod:`ml.utils.profiling`)."""
        config = getattr(self.config, "profile", None)
        if config is None or config.active is None or not is_master():
            yield
            return
        with StepProfiler(config, self.run.profile, cuda=self.device_type == "cuda") as profiler:
            self._profiler = profiler
            try:
                yield
            finally:
                self._profiler = None

    @contextmanager
    def training_context(self) -> Iterator[None]:
        """Process-wide settings held for the whole of :meth:`train` (restored after): here the
        float32 matmul precision; a trainer adds its own around it."""
        with float32_matmul_precision(getattr(self.config, "float32_matmul_precision", None)):
            if self.device.type == "cuda":
                logger.info("%s", describe_matmul_precision(self.device))
            yield

    def check_task(self, task: Any) -> None:
        """Refuses a task of the wrong kind (one line), and warns when nothing would ever stop training."""
        if not isinstance(task, self.task_type):
            kind = type(self).__name__
            raise ConfigError(f"{kind} needs a {self.task_type.__name__}, got {type(task).__name__}")
        if not getattr(task, "has_limit", True):
            logger.warning(
                "The task sets no max_steps/max_epochs/max_samples/max_seconds: training until stopped"
            )

    def take_run(self) -> None:
        """Rank 0 takes the run's lock; in a distributed job every rank then learns whether it could."""
        error: RunLockedError | None = None
        try:
            self.take_running_lock()
        except RunLockedError as e:
            error = e
        message = broadcast_object(str(error) if error is not None else None)
        if error is not None:
            raise error
        if message is not None:
            raise RunLockedError(message)
        self.remove_lock_file("scheduled", missing_ok=True)  # a submitted job has started

    def resume_or_start(self, s: Session) -> State:
        """Restores the run's newest checkpoint, or seeds a fresh run (with initial weights if configured).

        Either way the loggers then learn the step training continues from, and the evaluations of
        that step the checkpoint does not cover (:meth:`redone_evaluations`), so that the logs of an
        earlier process past the checkpoint (done again now) do not stay beside the new ones.

        The checkpoint is the one :meth:`find_resume_checkpoint` names, found while reading (each
        file read once): a newer one that does not verify is skipped, and the log says so.
        """
        found = newest_verified_checkpoint(self.run, lambda p: read_checkpoint(p, device=self.device))
        if found is not None:
            path, ckpt = found.checkpoint.path, found.value
            for warning in found.warnings:
                logger.warning("%s", warning)
            allowed = self.check_config_change(ckpt, str(path))
            state = self.load_checkpoint(ckpt, s.task, s.model, s.optim, s.lr_sched)  # type: ignore[arg-type]
            # Recorded once the checkpoint loaded: a resume refused after all leaves no record.
            self.record_config_change(allowed)
            logger.info("Resumed from %s at step %d", path, state.num_steps)
            self._rank_resumed(ckpt, state)
            self.tidy_checkpoints(path)
            redone = self.redone_evaluations(ckpt, state, s)
        else:
            seed_everything(s.seed)
            if self.checkpoint_config.load_from_ckpt_path:
                self.load_initial_weights(s.model, self.checkpoint_config.load_from_ckpt_path)
            state = State.init_state()
            redone = frozenset(PHASES)  # no checkpoint: all that was logged is done again
        if is_master():
            for sublogger in self.loggers:
                sublogger.continue_from(state)
                sublogger.on_resume_from(state, redone)
        return state

    def redone_evaluations(self, ckpt: Mapping[str, Any], state: State, s: Session) -> frozenset[str]:
        """The phases whose records at the checkpoint's step it does not cover and this session logs
        again: the loggers drop an earlier process's (:meth:`BaseLogger.on_resume_from`).

        A step's last evaluations come after its checkpoint, which is saved again once each is done
        and says so; a ``kill -9`` in between leaves their records without it. ``valid``: the
        checkpoint does not name its step as the last validated (``last_valid_step``, or the ``rl``
        trainer's ``last_eval_step``; a trainer that saves neither keeps its validations); ``test``:
        the run had not finished (the test is the last thing a run does). Either only where this
        session evaluates that step again (:meth:`evaluates_again`): a record nobody logs again is
        kept. Called after :meth:`load_checkpoint`, which restored :attr:`finished`.
        """
        redone = set()
        validated = ckpt.get("last_valid_step", ckpt.get("last_eval_step"))
        if validated is not None and validated != state.num_steps and self.evaluates_again("valid", state, s):
            redone.add("valid")
        if not self.finished and self.evaluates_again("test", state, s):
            redone.add("test")
        return frozenset(redone)

    def evaluates_again(self, phase: str, state: State, s: Session) -> bool:
        """Whether this session evaluates ``phase`` at the resumed ``state``'s step (a validation a
        stop signal abandoned; the final ones of a run that ends there). Default: yes (a trainer
        that does not say so drops such records, and logs them again if it evaluates)."""
        del phase, state, s
        return True

    def load_initial_weights(self, model: ModelT, path: str) -> None:
        """``checkpoint.load_from_ckpt_path``: model weights only (no optimizer, state or RNG), from a
        checkpoint (a file, or a sharded checkpoint's folder) or from a ``.safetensors`` file written
        by ``ml export``.

        It runs in :meth:`resume_or_start`, after ``set_up`` has wrapped (under FSDP: sharded) the
        model, so the weights go in as a resume's do: a sharded checkpoint's pieces through
        :func:`load_sharded_model`, full weights (a file, an export) through
        :meth:`restore_model_state`, which scatters them into the shards under FSDP.

        In a job every rank reads the file rank 0 finds: a link that a run still training moves on
        (its ``ckpt.pt``) could otherwise give the ranks weights of different steps, which nothing
        would bring together (DDP broadcast rank 0's weights when it wrapped the model, before this).
        """
        where = Path(path).expanduser()
        exported = where.suffix == ".safetensors"  # the name given says which (a link's target may not)
        if self.distributed:
            where = Path(broadcast_object(str(_end_of_links(where))))
        if exported:
            from ml.models.export import read_weights

            weights: Mapping[str, Any] = read_weights(where, device=self.device)[0]
        else:
            weights = read_checkpoint(where, device=self.device)["model"]
        strict = self.checkpoint_config.load_strict
        if isinstance(weights, ShardedState):  # a sharded checkpoint: read into the model piece by piece
            notes = load_sharded_model(model, weights, strict=strict)
        else:
            notes = self.restore_model_state(model, weights, strict=strict)
        for note in notes:
            logger.warning("Initial weights from %s: %s", path, note)
        logger.info("Initial weights loaded from %s", path)

    def check_config_change(self, ckpt: Mapping[str, Any], where: str) -> list[str]:
        """Compares the config a checkpoint was trained with to this run's; stops on a meaningful change.

        The whole diff is logged. Changes of what the run trains (``ml.core.diff.MEANINGFUL``: the
        model, optimizer, data, batch size, updates per step, seed) or of the number of processes
        stop the resume with :class:`ConfigChangedError` (exit code 2), unless the run
        allows config changes (``ml train --allow-config-change``).

        Returns:
            The lines to append to ``<exp_dir>/config_changes.log`` for an allowed meaningful change
            (a header naming the step it applies from, then the diff), [] when there is none; written
            by :meth:`record_config_change` once the checkpoint has loaded.
        """
        old_text = ckpt.get("config")
        if not isinstance(old_text, str):
            return []
        try:
            old_config = OmegaConf.create(old_text)
        except Exception:  # a config that does not parse is not ours to judge
            logger.warning("%s holds a config that cannot be read; not comparing it", where)
            return []
        try:  # what its references (a schedule's length from task.max_steps, ...) stood for then
            old = OmegaConf.to_container(old_config, resolve=True)
        except Exception:  # a secret no longer in the environment, ...: compared as written
            old = OmegaConf.to_container(old_config, resolve=False)
        lines, meaningful = segment_changes(old, OmegaConf.to_container(self.run_config, resolve=True))
        old_world, world = int(ckpt.get("world_size", 1)), get_world_size()
        if old_world != world:
            line = f"number of processes: {old_world} -> {world}"
            lines.append(line)
            meaningful.append(line)
        if not lines:
            return []
        logger.warning("The config differs from the checkpoint's (%s):\n  %s", where, "\n  ".join(lines))
        if meaningful and not self.allow_config_change:
            raise ConfigChangedError(
                f"the config changed since the checkpoint in what the experiment means "
                f"({'; '.join(meaningful)}): continue anyway with --allow-config-change, or start a new run"
            )
        if not meaningful:
            return []
        raw_state = ckpt.get("state")
        step = State.from_json(raw_state).num_steps if isinstance(raw_state, str) else "?"
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        return [f"# {stamp}: allowed at step {step} (--allow-config-change)", *lines]

    def record_config_change(self, lines: list[str]) -> None:
        """Rank 0 appends what :meth:`check_config_change` returned to ``<exp_dir>/config_changes.log``
        (durably), once the resume it allowed has loaded its checkpoint."""
        if not lines or not is_master():
            return
        with open_append(self.run.config_changes) as f:
            f.writelines(f"{line}\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.exp_dir)

    def reserve_status(self, state: State) -> None:
        """Rank 0 marks the session as under way in ``status.json``, keeping room for its end."""
        if not is_master():
            return
        record = status_record(
            step=state.num_steps, elapsed_s=state.elapsed_time_s, signal=None, error=None, finished=False
        )
        try:
            self._previous_status = reserve_status(self.run, record)
        except OSError as e:  # the session goes on; its end is recorded if the disk allows
            logger.warning("Could not write %s: %s", self.run.status, e)

    def write_status(self, state: State, error: BaseException | None) -> None:
        """Writes ``status.json`` (:mod:`ml.run.status`); never raises over the error in flight.

        Refused input (a :class:`UserError` before this session trained a step) puts back the marker
        of the previous session (the run is left as it was); one found after training (a monitored
        metric the validation does not log) fails the run like any other error. A write that fails is logged:
        with an error in flight that error is what propagates (even a Ctrl-C during the write does
        not replace it); without one the run itself succeeded and its checkpoint is durable, so it
        is not failed for a missing marker (``ml runs`` then reads the run from its checkpoint).
        """
        try:
            if isinstance(error, UserError) and state.num_steps == self._session_start_step:
                restore_status(self.run, self._previous_status)
                return
            record = status_record(
                step=state.num_steps,
                elapsed_s=state.elapsed_time_s,
                signal=self.stop_signal.name if self.stop_signal is not None else None,
                error=error,
                finished=self.finished,
                reason=self.stop_reason if self.finished else None,
            )
            write_status(self.run, record)
        except Exception as e:
            logger.warning("Could not write %s: %s: %s", self.run.status, type(e).__name__, e)
        except BaseException as e:
            if error is None:
                raise
            logger.warning("Interrupted while writing %s: %s", self.run.status, type(e).__name__)

    # -- evaluations: the best checkpoints and early stopping

    def training_over(self, state: State, task: TaskT) -> bool:
        """Whether the run is done: the task's limits are met, or early stopping ended it."""
        return task.is_training_over(state) or self.stop_reason is not None

    def check_monitors(self, prefix: str, evaluates: bool, how: str) -> None:
        """Refuses, before the first step, a ``monitor`` the trainer's evaluations cannot give.

        Args:
            prefix: What the evaluation's metric names start with (``valid/``).
            evaluates: Whether evaluations will run during training.
            how: How to make them run (for the message).
        """
        for key, metric, _ in self._monitors():
            if not metric.startswith(prefix):
                raise ConfigError(
                    f"{key}={metric} is not an evaluation metric: name one starting with {prefix}"
                )
            if not evaluates:
                raise ConfigError(f"{key}={metric} needs evaluations during training: {how}")
        for key, metric, mode in self._monitors():  # the direction, which a name may not make plain
            better = "higher" if mode == "max" else "lower"
            setting = key.replace(".monitor", ".mode")
            logger.info(
                "%s=%s: %s is better (%s=%s; by default from its name)", key, metric, better, setting, mode
            )

    def judge_evaluation(self, state: State, metrics: Mapping[str, float], s: Session) -> None:
        """After an evaluation during training: counts early stopping's patience, and ranks the
        step's checkpoint by ``checkpoint.monitor`` (saving one at this step first if there is none).

        Every rank calls it with the same metrics (they are averaged over the ranks).

        Raises:
            ConfigError: A monitored metric is not among ``metrics`` (the message lists them).
        """
        ranking, stopping = self._ranking, self.early_stopping
        for key, metric, _ in self._monitors():
            if metric not in metrics:
                if not self.checkpoint_is_current(state):  # what was trained is kept for a resume
                    self.save_checkpoint(state, s.task, s.model, s.optim, s.lr_sched)
                raise ConfigError(
                    f"{key}={metric} is not among the evaluation's metrics ({', '.join(sorted(metrics))}); "
                    f"the checkpoint of step {state.num_steps} keeps the training: continue it naming one"
                )
        if stopping is not None:
            stopping.update(float(metrics[stopping.monitor]), state.num_steps)
            # (The evaluation at the end of a run that reached its limits stops nothing.)
            if stopping.should_stop and self.stop_reason is None and not s.task.is_training_over(state):
                self.stop_reason = stopping.reason
                logger.warning("Stopping at step %d: %s", state.num_steps, stopping.reason)
        if ranking is None:
            return
        self._score = (state.num_steps, float(metrics[ranking.metric]))
        if not self.checkpoint_is_current(state):
            self.save_checkpoint(state, s.task, s.model, s.optim, s.lr_sched)  # ranked as it is written
            return
        self.wait_for_checkpoint()
        if is_master():
            score_checkpoint(self.run, state.num_steps, self._score[1], ranking)
            keep_older = not self.checkpoint_config.only_save_most_recent
            link_checkpoint(self.run, self.ckpt_path, keep_older=keep_older)

    def _monitors(self) -> list[tuple[str, str, str]]:
        """The monitored metrics: the config key that names each, the metric, its mode."""
        monitors = []
        if self._ranking is not None:
            monitors.append(("trainer.checkpoint.monitor", self._ranking.metric, self._ranking.mode))
        if self.early_stopping is not None:
            stopping = self.early_stopping
            monitors.append(("trainer.early_stopping.monitor", stopping.monitor, stopping.mode))
        return monitors

    def _rank_resumed(self, ckpt: Mapping[str, Any], state: State) -> None:
        """Ranks the checkpoint resumed from by the score it holds: a process killed between
        writing it and listing it in ``scores.json`` would otherwise leave a best one unranked."""
        score, ranking = ckpt.get("score"), self._ranking
        if ranking is None or not isinstance(score, Mapping) or score.get("metric") != ranking.metric:
            return
        self._score = (state.num_steps, float(score["value"]))
        if is_master():
            score_checkpoint(self.run, state.num_steps, self._score[1], ranking)

    def _score_of(self, step: int) -> tuple[float, Ranking] | None:
        """The monitored metric's value at ``step`` (if it was evaluated) and the ranking."""
        if self._ranking is None or self._score is None or self._score[0] != step:
            return None
        return self._score[1], self._ranking

    # -- devices and precision

    @property
    def device(self) -> torch.device:
        """``trainer.device`` (``auto`` for a config without it), unless ``$ML_DEVICE`` overrides it.

        Raises:
            ConfigError: The device is not one this machine has (see :mod:`ml.utils.device`).
        """
        if self._device_cache is None:
            self._device_cache = resolve_device(getattr(self.config, "device", "auto"))
        return self._device_cache

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def weight_precision(self) -> torch.dtype:
        return torch.float64 if self.config.use_double_weight_precision else torch.float32

    # -- distributed jobs

    def setup_distributed(self) -> bool:
        """Joins the job's process group when launched as one of several processes; returns whether.

        The trainer's GPU becomes the process's current one, whatever the job: else a call that
        names no GPU (the data loader's pinning thread, for one) opens a context on GPU 0 as well.
        """
        export_env(dist_env())  # Slurm's ranks as torchrun's, before the local device is chosen
        self._device_cache = None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.distributed = init_distributed(self.device)
        return self.distributed

    @property
    def sync_every_n_steps(self) -> int:
        every = self.__dict__.get("_sync_every")  # read once: asked at every step of a distributed job
        if every is None:
            every = self._sync_every = max(1, int(getattr(self.config, "sync_every_n_steps", 10)))
        return every

    @property
    def signal_received(self) -> bool:
        """Whether this process received a stop signal, whether or not the ranks agreed on it yet
        (:meth:`sync_ranks`): for work this process alone does, with no collective inside, that
        can end at once (the ranks then agree at the next sync)."""
        return self.stop_signal is not None or self._pending_signal is not None

    def sync_ranks(self, state: State, *, force: bool = False) -> None:
        """Every ``sync_every_n_steps`` steps, the ranks agree on what only some of them know.

        One all-reduce of three numbers on the CPU control group (no device sync): the stop
        signal any rank received (then :attr:`stop_signal` is set on all), whether rank 0's loggers
        want to write (then all ranks average their metrics for that write), and rank 0's clock
        (``state.elapsed_time_s``), so that every time-based decision - ``max_seconds``, saving or
        validating every N seconds - comes out the same on every rank. Without a process group the
        clock is simply read.
        """
        if not self.distributed:
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

    def write_logs(
        self, task: TaskT, model: ModelT, state: State, *, final: bool = False, due: bool | None = None
    ) -> None:
        """Sends what the task, model and trainer logged to the sub-loggers that write now.

        In a distributed job the ranks write training logs only at the steps they agreed on in
        :meth:`sync_ranks`; only then are the values materialised and averaged over the ranks,
        each rank's weighted by :meth:`rank_weight`.

        Args:
            task: The task (its logger is one source).
            model: The model (its logger, if it has one, is another).
            state: The current state.
            final: The run's last training step (a stop signal or the task's limit: the loop
                decides it alike on every rank): written whatever the intervals.
            due: ``False`` when the caller asked the loggers already and none writes now (then the
                values logged are only dropped).
        """
        multi = self._log_sources(task, model)
        final = final and state.training
        if due is False and not final and state.training:
            for source in multi:
                source.clear()
            return
        if not self.distributed:
            MultiLogger.write_all(multi, self.loggers, state, force=final)
            return
        if state.training and not (self._write_due or final):
            for source in multi:
                source.clear()
            return
        self._write_due = False
        # The ranks decide on the clock they last agreed on (sync_ranks), up to sync_every_n_steps
        # steps old; the records say when they were written (rank 0 writes them, on its clock).
        now = dataclasses.replace(state, elapsed_time_s=time.time() - state.start_time_s)
        reduce = functools.partial(mean_over_ranks, weight=self.rank_weight())
        MultiLogger.write_all(multi, self.loggers, now, reduce=reduce, force=final)

    def rank_weight(self) -> float:
        """This rank's weight in the job's mean of the values logged at this step: its share of the
        step's samples. Alike on every rank (each covers as many samples) unless a trainer says
        otherwise (``sl``'s stream, whose ranks' last batches of an epoch may differ in size)."""
        return 1.0

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
        # How the session ended, as status.json will say it (an error after finishing aside).
        outcome = "finished" if self.finished else "interrupted" if self.stop_signal is not None else "failed"
        for sublogger in self.loggers:
            sublogger.on_session_end(outcome)
            sublogger.close()

    # -- config and locks

    @property
    def config_path(self) -> Path:
        return self.run.config

    def set_run_config(self, run_config: DictConfig, saved: DictConfig | None = None) -> None:
        """Sets the whole run's config (all sections), saved in config.yaml and in checkpoints.

        Args:
            run_config: The config, resolved.
            saved: The config as saved, when it keeps some values as written (references to
                other keys, secrets: :func:`ml.core.compose.config_to_save`); default: resolved.
        """
        self.run_config = run_config
        self._saved_config = saved

    def saved_config_yaml(self) -> str:
        """The config as ``config.yaml`` and checkpoints hold it (see :meth:`set_run_config`)."""
        saved = self._saved_config
        return OmegaConf.to_yaml(self.run_config if saved is None else saved, resolve=saved is None)

    def save_config(self) -> None:
        saved = self._saved_config
        save_config(self.config_path, self.run_config if saved is None else saved, resolve=saved is None)

    def add_lock_file(self, lock_type: LockType, *, exists_ok: bool = False) -> None:
        add_lock_file(self.exp_dir, lock_type=lock_type, exists_ok=exists_ok)

    def remove_lock_file(self, lock_type: LockType, *, missing_ok: bool = False) -> None:
        remove_lock_file(self.exp_dir, lock_type=lock_type, missing_ok=missing_ok)

    def take_running_lock(self) -> None:
        """Takes ``.lock_running`` for this process (:func:`ml.run.locks.take_running_lock`).

        A lock left by a process that died on this host is taken over; one held by a live process
        raises :class:`RunLockedError`. Only the master rank takes it.
        """
        if is_master():
            take_running_lock(self.run)

    # -- checkpoints

    def get_ckpt_path(self, state: State | None = None) -> Path:
        return get_ckpt_path(self.exp_dir, state)

    @property
    def ckpt_path(self) -> Path:
        return self.get_ckpt_path()

    def find_resume_checkpoint(self) -> Path | None:
        """The checkpoint this run continues from: the newest that verifies
        (:func:`ml.run.checkpoints.newest_verified_checkpoint`, with
        :func:`ml.utils.checkpoint.verify_checkpoint`).

        Normally what ``checkpoints/ckpt.pt`` links to; a numbered checkpoint newer than the link's
        target (a run stopped between writing it and swapping the link) is complete, so then that
        one; without a link, the newest numbered one. One that does not verify (truncated, changed
        since it was written, not a regular file) is skipped for the next older one, with a warning
        naming both. None for a fresh run.

        Raises:
            CheckpointError: ``ckpt.pt`` links to a file that is gone or outside the run's
                ``checkpoints/``, or no checkpoint verifies.
        """
        found = newest_verified_checkpoint(self.run, verify_checkpoint)
        if found is None:
            return None
        for warning in found.warnings:
            logger.warning("%s", warning)
        return found.checkpoint.path

    def tidy_checkpoints(self, resumed: Path) -> None:
        """After resuming from ``resumed``: the link names it, and with ``only_save_most_recent``
        no other numbered checkpoint is kept (a killed run can leave one before retention ran; a
        damaged newer one resuming skipped goes too, as the next save would remove it).

        Called by the lock holder, so no other process writes here; only rank 0 acts.
        """
        if is_master():
            link_checkpoint(self.run, resumed, keep_older=not self.checkpoint_config.only_save_most_recent)

    def checkpoint_is_current(self, state: State) -> bool:
        """Whether the newest checkpoint (saved or resumed from) holds ``state``'s step."""
        return self._last_ckpt_step == state.num_steps

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
            loaded = read_checkpoint(ckpt, device=self.device if device is None else device)
        ckpt_dict: dict[str, Any] = loaded
        state = _state_of_checkpoint(ckpt_dict, where)  # validated before anything is restored
        task.on_after_load_checkpoint(ckpt_dict)
        weights = ckpt_dict["model"]
        if isinstance(weights, ShardedState):  # each rank reads the pieces it holds now
            notes = load_sharded_model(model, weights, strict=strict)
        else:
            notes = self.restore_model_state(model, weights, strict=strict)
        for note in notes:
            logger.warning("Loading %s into the model: %s", where, note)
        if "task" in ckpt_dict:
            task.load_state_dict(ckpt_dict["task"], strict=strict)
        if optims is not None:
            sharded = {k: v for k, v in ckpt_dict.items() if isinstance(v, ShardedState) and k != "model"}
            if sharded:
                load_sharded_optims(model, optims, sharded)
            elif "optim" not in ckpt_dict:
                raise CheckpointError(f"{where} has no optimizer state")
            else:
                self.restore_optim_state(model, optims, ckpt_dict["optim"])
        lr_state = ckpt_dict.get("lr", ckpt_dict.get("lr_sched"))
        if lr_scheds is not None and lr_state is not None:
            try:
                _load_named(lr_scheds, lr_state, "lr schedulers")
            except (KeyError, ValueError, TypeError) as e:  # another kind of schedule's state
                raise CheckpointError(
                    f"the checkpoint's learning-rate schedule ({type(e).__name__}: {first_line(e)}) does not "
                    "fit lr_scheduler: was it changed since? continue with the one it was saved with (the "
                    "run's config.yaml)"
                ) from e
        rng_ranks = ckpt_dict.get("rng_ranks")
        if isinstance(rng_ranks, list) and len(rng_ranks) == get_world_size():
            set_rng_state(rng_ranks[get_rank()])  # as many processes: each continues its own generators
        elif "rng" in ckpt_dict:
            set_rng_state(ckpt_dict["rng"])
        stopping = ckpt_dict.get("early_stopping")
        if self.early_stopping is not None and isinstance(stopping, Mapping):
            self.early_stopping.load_state_dict(dict(stopping))
            # A run that early stopping ended has nothing left to do (unless the patience grew).
            self.stop_reason = self.early_stopping.reason if self.early_stopping.should_stop else None
            if self.stop_reason is not None:
                logger.warning(
                    "The checkpoint's %s: nothing more to train (raise trainer.early_stopping.patience "
                    "to go on)",
                    self.stop_reason,
                )
        load_logger_states(self.loggers, ckpt_dict.get("loggers"))  # e.g. the MLflow run to continue
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
        sharded = self.checkpoint_format == "sharded"
        ckpt_path = self.run.sharded_checkpoint(state.num_steps) if sharded else self.get_ckpt_path(state)
        # What only the ranks together hold (sharded weights, each rank's environments) is
        # gathered first: every rank takes part, then rank 0 alone writes. (A sharded checkpoint
        # gathers no tensor: every rank writes its own shards.)
        model_state, optim_state = self.gather_checkpoint_parts(model, optims)
        rng_ranks = all_gather_object(get_rng_state()) if self.distributed else None
        asynchronous = self.checkpoint_config.async_save
        shards: Future | None = None
        skeletons: dict[str, Any] = {}
        if sharded:
            # Rank 0 makes the folder the shards go to, then every rank writes its own into it.
            folder = self._sharded_folder(state.num_steps)
            skeletons, shards = save_shards(folder, model, optims, asynchronous=asynchronous)
            model_state, optim_state = None, None
        if not is_master():  # every rank keeps the same record of when the last save was
            self._last_ckpt_time_s = state.elapsed_time_s
            self._last_ckpt_step = state.num_steps
            if shards is not None:  # the other ranks' shards are written in the background too
                self._start_background_save(_PendingSave(ckpt_path, None, None, shards), None)
            return ckpt_path
        ckpt: dict[str, Any] = {
            "format_version": CHECKPOINT_FORMAT,
            "model": model_state,
            "task": task.state_dict(),
            "state": state.to_json(),
            "config": self.saved_config_yaml(),
            "rng": get_rng_state(),
            "world_size": get_world_size(),
        }
        if sharded:
            del ckpt["model"]
            ckpt["sharded"] = skeletons  # the tensors are in the folder: read_checkpoint puts them back
        if rng_ranks is not None:  # every rank's generators, for a resume with as many processes
            ckpt["rng_ranks"] = rng_ranks
        if optim_state is not None:
            ckpt["optim"] = optim_state
        if lr_scheds is not None:
            ckpt["lr"] = _named_state(lr_scheds)
        if self.early_stopping is not None:
            ckpt["early_stopping"] = self.early_stopping.state_dict()
        score = self._score_of(state.num_steps)
        if score is not None:  # ranks it again if a crash kept it from scores.json (resume_or_start)
            ckpt["score"] = {"metric": score[1].metric, "value": score[0]}
        if loggers := logger_states(self.loggers):  # what a logger continues from (an MLflow run's id)
            ckpt["loggers"] = loggers
        self.update_state_dict(ckpt)
        check_loadable(ckpt)

        if asynchronous:
            if self._host_snapshot is None:
                self._host_snapshot = HostSnapshot()
            # A copy the next optimizer step cannot change; the write does not block the loop.
            snapshot = self._host_snapshot.take(ckpt)
            del ckpt, model_state, optim_state
            self._start_background_save(_PendingSave(ckpt_path, task, score, shards), snapshot)
            self._last_ckpt_time_s = state.elapsed_time_s
            self._last_ckpt_step = state.num_steps
            return ckpt_path
        self._write_checkpoint(ckpt, ckpt_path, score)
        self._last_ckpt_time_s = state.elapsed_time_s
        self._last_ckpt_step = state.num_steps
        task.on_after_save_checkpoint(ckpt_path)
        return ckpt_path

    @property
    def checkpoint_format(self) -> str:
        """``checkpoint.format`` as it applies: ``sharded`` under FSDP unless set, else ``full``."""
        return checkpoint_format(str(getattr(self.config, "parallel", "ddp")), self.checkpoint_config.format)

    def _sharded_folder(self, step: int) -> Path | None:
        """Rank 0 makes the folder the ranks write the shards of ``step`` into; every rank learns it
        (None: the step's checkpoint exists, its shards are kept), or rank 0's error."""
        folder: Path | None = None
        error: CheckpointWriteError | None = None
        if is_master():
            try:
                folder = begin_sharded_checkpoint(self.run, step)
            except CheckpointWriteError as e:
                error = e
        said = broadcast_object(
            (None if folder is None else str(folder), None if error is None else str(error))
        )
        if error is not None:
            raise error
        if said[1] is not None:
            raise CheckpointWriteError(said[1])
        return None if said[0] is None else Path(said[0])

    def _start_background_save(self, pending: _PendingSave, ckpt: dict[str, Any] | None) -> None:
        # Not a daemon: an interpreter that exits still finishes the write (and its link).
        pending.thread = threading.Thread(
            target=self._write_in_background, args=(pending, ckpt), name="ml-checkpoint"
        )
        self._pending_save = pending
        pending.thread.start()

    def _write_in_background(self, pending: _PendingSave, ckpt: dict[str, Any] | None) -> None:
        try:
            if pending.shards is not None:  # every rank: its shards, copied to host memory, written
                wait_for_shards(pending.path, pending.shards)
            if ckpt is not None:  # rank 0: the file, or the sharded folder's ml.pt, then the link
                self._write_checkpoint(ckpt, pending.path, pending.score)
        except BaseException as e:  # raised in the training thread, by _finish_save
            pending.error = e

    def _write_checkpoint(
        self, ckpt: dict[str, Any], ckpt_path: Path, score: tuple[float, Ranking] | None
    ) -> None:
        """Writes ``ckpt`` durably, ranks it by ``score``, links it and applies retention
        (:mod:`ml.run.checkpoints`; rank 0). For a sharded checkpoint (a folder, whose shards every
        rank has written) ``ckpt`` is what goes beside the shards."""
        step = int(ckpt_path.name.split(".")[1])
        keep_older = not self.checkpoint_config.only_save_most_recent
        if "sharded" in ckpt:
            publish_sharded_checkpoint(  # ml.pt gets what ties it to its shards (the manifest's SHA-256)
                self.run,
                step,
                lambda f, bound: torch.save({**ckpt, **bound}, f),
                keep_older=keep_older,
                score=score,
            )
            return
        write_checkpoint_file(
            self.run, step, lambda f: torch.save(ckpt, f), keep_older=keep_older, score=score
        )

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
        if pending.task is not None:  # rank 0's save (the other ranks' wrote only their shards)
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
        """Loads checkpointed optimizer state (on every rank).

        Each value lands where a fresh optimizer keeps it, whatever device the checkpoint was read
        onto: torch's ``load_state_dict`` moves every state tensor to its parameter's device except
        ``step``, which it leaves where it is unless the group is fused or capturable (then it goes
        to the parameter's device too). A ``step`` read onto the GPU beside parameters on the CPU
        would not fit them, and one on the GPU of a plain Adam makes each step read it back (a host
        sync per parameter); so every ``step`` is handed over on the CPU, where torch wants it.
        """
        del model
        try:
            _load_named(optims, _steps_on_cpu(state), "optimizers")
        except ValueError as e:  # torch's: other parameter groups, or other sizes in them
            raise optimizer_misfit(str(e).splitlines()[0]) from e

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

    # -- signals

    def add_signal_handler(self, sig: Signals, handler: SignalHandler) -> None:
        """Registers ``handler`` to run (after the checkpoint) when the loop stops for ``sig``."""
        self.signal_handlers[sig].append(handler)

    @contextmanager
    def install_signal_handlers(
        self, signals: tuple[Signals, ...] = (Signals.SIGTERM, Signals.SIGINT, Signals.SIGUSR1)
    ) -> Iterator[None]:
        """Routes ``signals`` to :attr:`stop_signal` while the block runs, then restores the old handlers.

        The handler only records the signal; a second SIGINT raises ``KeyboardInterrupt``. The
        ``ml`` command's own recorder (:mod:`ml.utils.signals`) is what is restored, and it stays
        until the process exits, so a signal after training cannot cut the last writes short.
        """

        def on_signal(signum: int, frame: Any) -> None:
            del frame
            sig = Signals(signum)
            now = time.monotonic()
            if sig == Signals.SIGINT and Signals.SIGINT in (self.stop_signal, self._pending_signal):
                # In a job, one Ctrl-C reaches a worker twice: from the terminal and passed on by
                # torchrun. A second SIGINT within a second is that same keypress.
                if not (self.distributed and now - self._first_sigint < 1.0):
                    raise KeyboardInterrupt
                return
            if sig == Signals.SIGINT:
                self._first_sigint = now
            arm_watchdog(sig)  # before training began, a start-up that never ends must not keep it
            if self.distributed or dist_env().is_distributed:  # acted on once the ranks agree (sync_ranks)
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
            if self.distributed or dist_env().is_distributed:
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

        Called by the session (:meth:`run_session`) once the loop returned for a signal that set
        :attr:`stop_signal`; never from inside the signal handler itself.
        """
        logger.info("Stopping on %s at step %d: saving a checkpoint", sig.name, state.num_steps)
        self.wait_for_checkpoint()  # a write in flight decides whether ckpt.pt exists
        # In a distributed job every rank must take the same decision (saving may be collective).
        if not self.checkpoint_is_current(state) or (not self.distributed and not self.ckpt_path.exists()):
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
        if self._profiler is not None:
            self._profiler.step()
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
