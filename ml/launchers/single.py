"""Defines the ``single`` launcher and :func:`train_in_process`, what ``ml train`` runs.

:func:`train_in_process` composes the config, builds the components, claims the run folder, builds
the trainer and trains, in this process. Started as one of several processes (by torchrun, or by
``srun`` in a Slurm job), it first joins the job's process group; rank 0 alone claims the run
folder and tells the others. Bad input stops before anything is created on disk (a folder this
call claimed is given back), with a :class:`ml.errors.UserError`.
"""

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from ml.core.registry import register_launcher
from ml.errors import EXIT_INTERRUPTED, EXIT_OK, ConfigError, UserError, first_line
from ml.launchers.base import BaseLauncher, BaseLauncherConfig


@dataclass
class SingleLauncherConfig(BaseLauncherConfig):
    """The single-process launcher has no settings."""


@register_launcher("single")
class SingleLauncher(BaseLauncher[SingleLauncherConfig]):
    """Runs ``ml train`` in the calling process."""

    def launch(self, args: list[str], config: DictConfig) -> int:
        del config
        flags = [a for a in args if a.startswith("--")]
        configs = [a for a in args if not a.startswith("--")]
        return train_in_process(configs, allow_config_change="--allow-config-change" in flags)


def train_in_process(args: list[str], *, allow_config_change: bool = False) -> int:
    """``ml train ARGS``: trains in this process; returns the exit code (0, or 130 for Ctrl-C).

    Args:
        args: Config files and ``key=value`` overrides.
        allow_config_change: Continue a run although what it means changed (``--allow-config-change``).

    Raises:
        UserError: Bad input (nothing is left on disk for it).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ml.core.compose import build_objects, compose_args, config_to_save
    from ml.core.registry import lookup
    from ml.launchers.checks import check_before_claim, device_of
    from ml.launchers.slurm import requeue_on_preemption
    from ml.run.claim import has_results

    # A bad file, section or shape is refused before torch is imported (a 0.1 s answer, not 1.5 s);
    # a component's keys are checked against its config class, whose module imports torch.
    root = compose_args(args)
    check_before_claim(root)  # before the components are built (and warn): the error is the one line
    objects = build_objects(root)
    trainer_cls, _ = lookup("trainer", str(root.trainer.name))
    device = device_of(root)  # a device this machine lacks is bad input: refused before the claim
    release = _claim_for_job(root, device)
    try:
        saved = config_to_save(root)  # references to other keys and secrets stay as written
        OmegaConf.resolve(root)
        trainer = trainer_cls(root.trainer)
        trainer.set_run_config(root, saved)
        trainer.allow_config_change = allow_config_change
        trainer.add_loggers(objects.loggers)
    except BaseException as e:
        release()
        if isinstance(e, (ValueError, TypeError, OmegaConfBaseException)) and not isinstance(e, ConfigError):
            raise ConfigError(f"trainer ({root.trainer.name}): {first_line(e)}") from e
        raise
    requeue_on_preemption(trainer)

    try:
        trainer.train(objects.model, objects.task, objects.optimizer, objects.lr_scheduler)
    except BaseException as e:
        # Bad input found while setting up (an unusable task, initial weights that do not fit), an
        # immediate interrupt, or a failure before the session began (a full disk refusing the
        # lock): leave no empty run behind. A failure of training (exit 1) keeps its run folder,
        # with its logs and status.json.
        began = trainer.run.status.exists()
        if (isinstance(e, (UserError, KeyboardInterrupt)) or not began) and not has_results(trainer.run):
            release()
        raise
    from ml.utils.distributed import barrier, is_master

    # The ranks leave together: a rank that tears its process group down while another still
    # works (rank 0 writing the last checkpoint) can abort inside gloo.
    barrier()
    if is_master():
        _report(trainer)
    if trainer.stop_signal == signal.Signals.SIGINT and not trainer.finished:
        return EXIT_INTERRUPTED
    return EXIT_OK


def _claim_for_job(root: Any, device: Any = None) -> Callable[[], None]:
    """Fills ``trainer.exp_dir`` (claiming a new run folder when unset), once for the whole job.

    In a distributed job rank 0 claims the folder and every other rank takes its answer (the
    process group is joined first); a failure to claim is reported on every rank. Returns the
    release of the claimed folder (on rank 0; elsewhere it does nothing).
    """
    from ml.run.claim import claim_run_dir
    from ml.utils.distributed import broadcast_object, init_distributed, is_master

    distributed = init_distributed(device)
    exp_dir, error = None, None
    release: Callable[[], None] = _nothing
    if is_master():
        try:
            path, release = claim_run_dir(root.trainer)
            exp_dir = str(path)
        except UserError as e:
            error = str(e)
    if distributed:
        exp_dir, error = broadcast_object((exp_dir, error))
    if error is not None:
        raise ConfigError(error)
    root.trainer.exp_dir = exp_dir
    return release


def _nothing() -> None:
    return None


def _report(trainer: Any) -> None:
    from ml.utils.progress import write

    def say(line: str) -> None:  # (a reader of stderr that left, `2>&1 | head`, fails nothing)
        write(line, file=sys.stderr)

    say(f"ml: run directory   {trainer.exp_dir}")
    if trainer.ckpt_path.exists():
        say(f"ml: checkpoint      {trainer.ckpt_path} -> {os.readlink(trainer.ckpt_path)}")
    best = trainer.run.best_link
    if best.is_symlink() and best.exists():
        say(f"ml: best checkpoint {best} -> {os.readlink(best)}")
    if trainer.stop_reason is not None:
        say(f"ml: stopped early   {trainer.stop_reason.removeprefix('early stopping: ')}")
    tb = trainer.log_dir / "tensorboard"
    if tb.exists():
        say(f"ml: tensorboard     tensorboard --logdir {tb}")
    for name, value in sorted(getattr(trainer, "final_metrics", {}).items()):
        say(f"ml: {name:<17} {value:.4f}")
