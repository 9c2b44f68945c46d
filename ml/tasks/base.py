"""Defines :class:`BaseTask`, the base class of every task, and its stopping limits.

A task owns the data (or environments) and the objective. It is an ``nn.Module`` so that any state
it keeps in buffers is checkpointed with the run, and it receives every trainer hook (without the
``task`` argument). The trainer stops when :meth:`BaseTask.is_training_over` says so.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ml.core.config import BaseConfig, BaseObject, conf_field
from ml.core.state import State
from ml.loggers.base import MultiLogger

logger = logging.getLogger(__name__)


@dataclass
class BaseTaskConfig(BaseConfig):
    max_steps: int | None = conf_field(None, help="Stop after this many optimizer steps")
    max_epochs: int | None = conf_field(None, help="Stop after this many passes over the training data")
    max_samples: int | None = conf_field(None, help="Stop after this many training samples")
    max_seconds: float | None = conf_field(None, help="Stop after this many seconds of training")


TaskConfigT = TypeVar("TaskConfigT", bound=BaseTaskConfig)


class BaseTask(BaseObject[TaskConfigT], nn.Module):
    """The base task: hooks, stopping limits and a logger.

    Hooks receive the arguments the trainer's hooks receive, minus ``task``. The defaults do
    nothing, so subclasses override only the ones they need.
    """

    def __init__(self, config: TaskConfigT) -> None:
        nn.Module.__init__(self)
        BaseObject.__init__(self, config)
        self.logger = MultiLogger(default_namespace="task")
        for key in ("max_steps", "max_epochs", "max_samples", "max_seconds"):
            value = getattr(config, key)
            if value is not None and value <= 0:
                raise ValueError(f"task.{key} must be positive, got {value}")
        # Kept as plain values: the trainer asks is_training_over at every step, and reading a
        # config node costs microseconds.
        self._limits = (config.max_steps, config.max_epochs, config.max_samples, config.max_seconds)

    def is_training_over(self, state: State) -> bool:
        """Whether any configured limit (steps, epochs, samples, seconds) has been reached."""
        max_steps, max_epochs, max_samples, max_seconds = self._limits
        return (
            (max_steps is not None and state.num_steps >= max_steps)
            or (max_epochs is not None and state.num_epochs >= max_epochs)
            or (max_samples is not None and state.num_samples >= max_samples)
            or (max_seconds is not None and state.elapsed_time_s >= max_seconds)
        )

    @property
    def has_limit(self) -> bool:
        cfg = self.config
        return any(v is not None for v in (cfg.max_steps, cfg.max_epochs, cfg.max_samples, cfg.max_seconds))

    def on_step_start(self, state: State, model: nn.Module, optim: Any, lr_sched: Any) -> None:
        """Called before each training step."""

    def on_step_end(
        self, state: State, loss_dict: dict[str, torch.Tensor], model: nn.Module, optim: Any, lr_sched: Any
    ) -> None:
        """Called after each training step with that step's losses."""

    def on_epoch_start(self, state: State, model: nn.Module, optim: Any, lr_sched: Any) -> None:
        """Called at the start of each epoch."""

    def on_epoch_end(self, state: State, model: nn.Module, optim: Any, lr_sched: Any) -> None:
        """Called at the end of each epoch."""

    def on_training_start(self, state: State, model: nn.Module, optim: Any, lr_sched: Any) -> None:
        """Called once before the first step (also on resume)."""

    def on_training_end(self, state: State, model: nn.Module, optim: Any, lr_sched: Any) -> None:
        """Called once after the last step, also when training stops early."""

    def on_after_load_checkpoint(self, ckpt: dict[str, Any]) -> None:
        """Called with the loaded checkpoint dict before its parts are restored."""

    def on_after_save_checkpoint(self, ckpt_path: Path) -> None:
        """Called with the path of each checkpoint once it is safely on disk."""
