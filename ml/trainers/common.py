"""Defines the set-up and tear-down that every training loop shares (used by ``sl`` and ``rl``).

:func:`run_session` takes the run's lock, resumes from the run's checkpoint (or seeds a fresh run
and loads configured initial weights), calls the start hooks, saves the config, runs the trainer's
loop, then either checkpoints for a signal or finishes, and always tears down: end hooks, lock,
loggers. Errors propagate after the teardown. Last, rank 0 records how the session ended in
``<exp_dir>/status.json`` (see :func:`run_session`), which ``ml runs`` reads.
"""

import datetime
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ml.core.compose import ConfigError
from ml.core.config import conf_field
from ml.core.state import State
from ml.tasks.base import BaseTask
from ml.trainers.base import BaseTrainer, BaseTrainerConfig, RunLockedError
from ml.utils.checkpoint import load_model_state, read_checkpoint
from ml.utils.distributed import broadcast_object, is_master
from ml.utils.seeding import seed_everything

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass
class TrainerConfig(BaseTrainerConfig):
    """Settings every training loop here shares, beyond the spec's :class:`BaseTrainerConfig`."""

    parallel: str = conf_field(
        "ddp", help="With several processes: `ddp` (a model copy per process) or `fsdp` (sharded, FSDP2)"
    )
    sync_every_n_steps: int = conf_field(
        10, help="With several processes: agree on stop signals, the clock and log writes every N steps"
    )
    fast_optimizer: bool = conf_field(
        True,
        help="Step Adam/AdamW with the fused kernel (else multi-tensor ops): much faster on CPU. "
        "A resumed run steps as its checkpoint's optimizer did",
    )
    tune_malloc: bool = conf_field(
        True,
        help="Linux/glibc: keep freed memory for the next step, not fault it back in (ml.utils.malloc)",
    )


def check_common_config(config: TrainerConfig) -> None:
    if config.parallel not in PARALLEL_MODES:
        choices = ", ".join(PARALLEL_MODES)
        raise ConfigError(f"trainer.parallel must be one of {choices}, got {config.parallel!r}")
    if config.sync_every_n_steps < 1:
        raise ConfigError(f"trainer.sync_every_n_steps must be positive, got {config.sync_every_n_steps}")


def take_lock_on_all_ranks(trainer: BaseTrainer) -> None:
    """Rank 0 takes the run's lock; in a distributed job every rank then learns whether it could."""
    error: RunLockedError | None = None
    try:
        trainer.take_running_lock()
    except RunLockedError as e:
        error = e
    message = broadcast_object(str(error) if error is not None else None)
    if error is not None:
        raise error
    if message is not None:
        raise RunLockedError(message)
    trainer.remove_lock_file("scheduled", missing_ok=True)  # a submitted job has started


logger = logging.getLogger(__name__)


def check_task(trainer: BaseTrainer, task: Any, task_cls: type[BaseTask]) -> None:
    """Refuses a task of the wrong kind (one line), and warns when nothing would ever stop training."""
    if not isinstance(task, task_cls):
        kind = type(trainer).__name__
        raise ConfigError(f"{kind} needs a {task_cls.__name__}, got {type(task).__name__}")
    if not task.has_limit:
        logger.warning(
            "The task sets no max_steps/max_epochs/max_samples/max_seconds: training until stopped"
        )


def load_initial_weights(trainer: BaseTrainer, model: Any, path: str) -> None:
    """``checkpoint.load_from_ckpt_path``: model weights only (no optimizer, state or RNG)."""
    ckpt = read_checkpoint(path, device=trainer._device)
    for note in load_model_state(model, ckpt["model"], strict=trainer.checkpoint_config.load_strict):
        logger.warning("Initial weights from %s: %s", path, note)
    logger.info("Initial weights loaded from %s", path)


# Changing these between the segments of one run changes what the run means: the model, the
# optimizer, the data and how it is batched, the seed (and the number of processes, checked apart).
# Everything else (limits such as task.max_steps, logging, checkpointing, validation frequency,
# workers, launcher) may change freely.
MEANINGFUL = (
    "model.",
    "optimizer.",
    "task.",
    "trainer.batches_per_step",
    "trainer.use_double_weight_precision",
)
FREE_TASK_KEYS = ("max_steps", "max_epochs", "max_samples", "max_seconds", "num_workers", "pin_memory")
FREE_TASK_SECTIONS = ("valid_dl.", "test_dl.")


class ConfigChangedError(ConfigError):
    """The config changed since the checkpoint in a way that changes the experiment."""


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def is_meaningful(key: str) -> bool:
    """Whether changing ``key`` (dotted) between segments of a run changes the experiment."""
    if not key.startswith(MEANINGFUL) and key not in {m.rstrip(".") for m in MEANINGFUL}:
        return False
    if key.startswith("task."):
        rest = key[len("task.") :]
        if rest.startswith(FREE_TASK_SECTIONS) or rest.split(".")[-1] in FREE_TASK_KEYS:
            return False
    return True


def check_config_change(trainer: BaseTrainer, ckpt: dict[str, Any], where: str) -> None:
    """Compares the config a checkpoint was trained with to this run's; stops on a meaningful change.

    The whole diff is logged. Changes of the model, optimizer, data, batch size, seed or number of
    processes stop the resume with :class:`ConfigChangedError` (exit code 2), unless the run allows
    config changes (``ml train --allow-config-change``); then the diff is appended to
    ``<exp_dir>/config_changes.log`` with the step it applies from.
    """
    from omegaconf import OmegaConf

    from ml.utils.atomic import fsync_dir
    from ml.utils.distributed import get_world_size

    old_text = ckpt.get("config")
    if not isinstance(old_text, str):
        return
    try:
        old = OmegaConf.to_container(OmegaConf.create(old_text), resolve=False)
    except Exception:  # a config that does not parse is not ours to judge
        logger.warning("%s holds a config that cannot be read; not comparing it", where)
        return
    new = OmegaConf.to_container(trainer.run_config, resolve=True)
    old_flat, new_flat = _flat(old), _flat(new)
    changed = sorted(
        k
        for k in old_flat.keys() | new_flat.keys()
        if old_flat.get(k, "<unset>") != new_flat.get(k, "<unset>")
    )
    lines = [f"{k}: {old_flat.get(k, '<unset>')} -> {new_flat.get(k, '<unset>')}" for k in changed]
    old_world, world = int(ckpt.get("world_size", 1)), get_world_size()
    meaningful = [line for k, line in zip(changed, lines, strict=True) if is_meaningful(k)]
    if old_world != world:
        line = f"number of processes: {old_world} -> {world}"
        lines.append(line)
        meaningful.append(line)
    if not lines:
        return
    logger.warning("The config differs from the checkpoint's (%s):\n  %s", where, "\n  ".join(lines))
    if meaningful and not trainer.allow_config_change:
        raise ConfigChangedError(
            f"the config changed since the checkpoint in what the experiment means "
            f"({'; '.join(meaningful)}): continue anyway with --allow-config-change, or start a new run"
        )
    if meaningful and is_master():
        state = json.loads(ckpt["state"]) if isinstance(ckpt.get("state"), str) else {}
        log = trainer.exp_dir / "config_changes.log"
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        with open(log, "a") as f:
            f.write(f"# {stamp}: allowed at step {state.get('num_steps', '?')} (--allow-config-change)\n")
            f.writelines(f"{line}\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(trainer.exp_dir)


def _resume_loggers(trainer: BaseTrainer, state: State) -> None:
    """Lets rank 0's loggers drop what they logged after ``state`` (see ``BaseLogger.on_resume``)."""
    if is_master():
        for sublogger in trainer.loggers:
            sublogger.on_resume(state)


def resume_or_start(
    trainer: BaseTrainer, task: Any, model: Any, optim: Any, lr_sched: Any, seed: int
) -> State:
    """Restores the run's checkpoint, or seeds a fresh run (with initial weights if configured).

    Either way the loggers then learn the step training continues from, so that the logs of an
    earlier process past the checkpoint (done again now) do not stay beside the new ones.
    """
    path = trainer.find_resume_checkpoint()
    if path is not None:
        ckpt = read_checkpoint(path, device=trainer._device)
        check_config_change(trainer, ckpt, str(path))
        state = trainer.load_checkpoint(cast(Any, ckpt), task, model, optim, lr_sched)
        logger.info("Resumed from %s at step %d", path, state.num_steps)
        trainer.tidy_checkpoints(path)
        _resume_loggers(trainer, state)
        return state
    seed_everything(seed)
    if trainer.checkpoint_config.load_from_ckpt_path:
        load_initial_weights(trainer, model, trainer.checkpoint_config.load_from_ckpt_path)
    state = State.init_state()
    _resume_loggers(trainer, state)
    return state


def run_session(
    trainer: BaseTrainer,
    task: Any,
    model: Any,
    optim: Any,
    lr_sched: Any,
    *,
    seed: int,
    loop: Callable[[State], None],
    finish: Callable[[State], None],
) -> None:
    """Runs ``loop`` (then ``finish``, unless a signal stopped it) inside the run's lock and hooks.

    Args:
        trainer: The trainer whose run this is.
        task: The task, model, optimizer and scheduler adapter being trained.
        model: See ``task``.
        optim: See ``task``.
        lr_sched: See ``task``.
        seed: Seeds every generator of a fresh run.
        loop: Trains from the resumed state until done or :attr:`BaseTrainer.stop_signal` is set.
        finish: The end of a completed run (final checkpoint, last evaluation); it may stop early
            for a signal, which is then handled like one during ``loop``.

    The run-status marker: once the teardown is done (end hooks, lock removed, loggers closed),
    rank 0 atomically writes ``<exp_dir>/status.json``::

        {"state": "finished", "step": 1500, "signal": null, "error": null, "elapsed_s": 61.2,
         "time": "2026-11-28T21:40:00+00:00", "pid": 4242, "host": "node7"}

    ``state`` is ``finished`` (``loop`` and ``finish`` completed and no stop signal arrived),
    ``interrupted`` (a stop signal - ``signal`` names it - ended the run with its checkpoint; also a
    ``KeyboardInterrupt``, i.e. a second Ctrl-C, then ``signal`` is ``SIGINT`` and ``error`` is
    ``"KeyboardInterrupt"``: the checkpoint may be older than ``step``), or ``failed`` (any other
    exception, teardown errors included; ``error`` is ``"<type>: <first line>"``, and ``signal``
    names a stop signal that had arrived before). ``step`` is the state's step count at the end.

    The marker is written only for a session that began (lock taken, checkpoint resumed or fresh
    run seeded), and not when the input was refused (the command line's exit-2 errors: a bad
    config or checkpoint, another process holding the run): those leave the run, and the marker
    of its previous session, as they were. Writing it never hides the error in flight (a failed
    write is logged). A process killed with SIGKILL writes nothing: the old marker stays, with a
    stale ``.lock_running``, which readers give precedence.
    """
    take_lock_on_all_ranks(trainer)  # before reading the checkpoint: one process per run
    began = False
    started = False
    state = State.init_state()
    failed = False
    error: BaseException | None = None
    try:
        state = resume_or_start(trainer, task, model, optim, lr_sched, seed)
        began = True
        trainer.on_training_start(state, task, model, optim, lr_sched)
        started = True
        trainer.save_config()
        trainer.log_run_config()
        loop(state)
        trainer.sync_ranks(state, force=True)  # a signal received since the last agreement counts too
        if trainer.stop_signal is None:
            finish(state)
        if trainer.stop_signal is not None:  # also a signal during the final evaluation
            trainer.on_exit(trainer.stop_signal, state, task, model, optim, lr_sched)
    except BaseException as e:
        failed = True
        error = e
        raise
    finally:
        steps: list[Callable[[], None]] = [
            (lambda: trainer.on_training_end(state, task, model, optim, lr_sched))
            if started
            else (lambda: trainer.remove_lock_file("running", missing_ok=True)),
            trainer.close_loggers,
        ]
        try:
            _tear_down(steps, quiet=failed)
        except BaseException as e:
            if error is None:
                error = e
            raise
        finally:
            if began and is_master():
                _write_status(trainer, state, error)


_STATUS_FILE = "status.json"  # read by ml.tools.experiments (``ml runs``)


def _status_record(trainer: BaseTrainer, state: State, error: BaseException | None) -> dict[str, Any]:
    """What ``status.json`` says about a session that ended with ``error`` (None: no error)."""
    sig = trainer.stop_signal
    signal_name = sig.name if sig is not None else None
    message = None
    if error is None:
        outcome = "interrupted" if sig is not None else "finished"
    elif isinstance(error, KeyboardInterrupt):  # a second Ctrl-C: stopped at once
        outcome, signal_name, message = "interrupted", "SIGINT", "KeyboardInterrupt"
    else:
        text = str(error).strip()
        first = text.splitlines()[0] if text else ""
        outcome, message = "failed", (f"{type(error).__name__}: {first}" if first else type(error).__name__)
    return {
        "state": outcome,
        "step": state.num_steps,
        "signal": signal_name,
        "error": message,
        "elapsed_s": round(float(state.elapsed_time_s), 3),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def _write_status(trainer: BaseTrainer, state: State, error: BaseException | None) -> None:
    """Writes ``<exp_dir>/status.json`` atomically; never raises over the error in flight.

    Refused input (exit 2) leaves the marker alone. A write that fails is logged: with an error in
    flight that error is what propagates (even a Ctrl-C during the write does not replace it);
    without one the run itself succeeded and its checkpoint is durable, so it is not failed for a
    missing marker (``ml runs`` then reads the run from its checkpoint).
    """
    from ml.cli import _is_bad_input  # the command line's own rule, so marker and exit code agree

    if error is not None and not isinstance(error, KeyboardInterrupt) and _is_bad_input(error):
        return
    from ml.utils.atomic import atomic_write_text

    try:
        record = _status_record(trainer, state, error)
        atomic_write_text(trainer.exp_dir / _STATUS_FILE, json.dumps(record, indent=2) + "\n")
    except Exception as e:
        logger.warning("Could not write %s: %s: %s", trainer.exp_dir / _STATUS_FILE, type(e).__name__, e)
    except BaseException as e:
        if error is None:
            raise
        logger.warning("Interrupted while writing %s: %s", trainer.exp_dir / _STATUS_FILE, type(e).__name__)


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
