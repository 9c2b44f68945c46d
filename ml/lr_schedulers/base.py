"""Defines :class:`BaseLRScheduler` and :class:`SchedulerAdapter`.

A schedule is a pure function of the training state (the step counter): it returns a scale that
multiplies each parameter group's initial learning rate. Because it is pure, resuming needs nothing
but the restored step. :class:`SchedulerAdapter` binds a schedule to one optimizer; the trainer
calls :meth:`SchedulerAdapter.step` *before* each optimizer step, so the very first update already
uses the warmed-up rate for step 0.
"""

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, TypeVar

from torch.optim import Optimizer

from ml.core.config import BaseConfig, BaseObject
from ml.core.state import State


@dataclass
class BaseLRSchedulerConfig(BaseConfig):
    """Config shared by all learning-rate schedules."""


LRSchedulerConfigT = TypeVar("LRSchedulerConfigT", bound=BaseLRSchedulerConfig)


class BaseLRScheduler(BaseObject[LRSchedulerConfigT]):
    """A learning-rate schedule."""

    @abstractmethod
    def get_lr_scale(self, state: State) -> float:
        """The factor applied to the initial learning rate at ``state.num_steps``."""

    def get(self, optim: Optimizer) -> "SchedulerAdapter":
        """Binds this schedule to an optimizer."""
        return SchedulerAdapter(self, optim)


class SchedulerAdapter:
    """Applies a schedule's scale to every parameter group of one optimizer.

    Each group's ``initial_lr`` is recorded when the adapter is made (or kept, if the group already
    has one), and ``lr = initial_lr * scale`` is set on every :meth:`step`.
    """

    def __init__(self, scheduler: BaseLRScheduler, optim: Optimizer) -> None:
        self.scheduler = scheduler
        self.optim = optim
        self.lr_scale = 1.0
        for group in optim.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def step(self, state: State) -> None:
        self.lr_scale = float(self.scheduler.get_lr_scale(state))
        for group in self.optim.param_groups:
            group["lr"] = group["initial_lr"] * self.lr_scale

    @property
    def lr(self) -> float:
        """The current learning rate of the first parameter group."""
        return float(self.optim.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """The adapter's own state (not the optimizer's): the last scale applied."""
        return {"lr_scale": self.lr_scale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lr_scale = float(state_dict["lr_scale"])
