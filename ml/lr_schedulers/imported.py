"""Defines the schedule section of a torch schedule named by import path.

``lr_scheduler: {name: "torch.optim.lr_scheduler:StepLR", step_size: 100, gamma: 0.5}`` steps
``torch.optim.lr_scheduler.StepLR`` with the trainer. The section's keys are the class's keyword
arguments (:func:`ml.core.registry.config_from_signature`; ``optimizer`` and ``last_epoch`` are the
adapter's). A torch schedule counts its own steps and may read the learning rate it set last, so
it is not a scale of the step like the registered ones: :class:`TorchSchedulerAdapter` steps it
until its count is the trainer's, before each update (update ``k`` uses the rate torch gives after
``k`` of its steps, as in torch's ``optimizer.step(); scheduler.step()`` loop), and its state goes
into every checkpoint, so a resumed run continues it exactly. Schedules that need a metric
(``ReduceLROnPlateau``) or other schedules (``SequentialLR``) cannot be built from a config section.
"""

import enum
import warnings
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from ml.core.config import BaseConfig
from ml.core.registry import config_from_signature
from ml.core.state import State
from ml.errors import CheckpointError, RegistryError
from ml.lr_schedulers.base import BaseLRScheduler, BaseLRSchedulerConfig, SchedulerAdapter
from ml.optimizers.imported import section_kwargs

_BUILDERS: dict[type, type["ImportedLRScheduler"]] = {}
_ADAPTER_ARGUMENTS = ("optimizer", "last_epoch", "verbose")
# Torch warns when its schedule steps before the optimizer ever did through `optimizer.step`; the
# trainers' direct fused Adam step (ml.optimizers.fast) does not go through it.
_STEP_ORDER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


class TorchSchedulerAdapter(SchedulerAdapter):
    """Steps a torch schedule along with the trainer's step counter; its state is checkpointed."""

    def __init__(self, scheduler: "ImportedLRScheduler", optim: Optimizer) -> None:
        super().__init__(scheduler, optim)
        self.settings = section_kwargs(scheduler.config)
        self.torch_scheduler = scheduler.scheduler_class(optim, **self.settings)

    def step(self, state: State) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _STEP_ORDER_WARNING, UserWarning)
            while self.torch_scheduler.last_epoch < state.num_steps:
                self.torch_scheduler.step()
        group = self.optim.param_groups[0]
        self.lr_scale = float(group["lr"]) / float(group["initial_lr"]) if group["initial_lr"] else 1.0

    def state_dict(self) -> dict[str, Any]:
        settings = {key: _plain(value) for key, value in self.settings.items()}
        return {
            **super().state_dict(),
            "torch_scheduler": self.torch_scheduler.state_dict(),
            "settings": settings,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continues the saved schedule; refuses one whose settings the config changed since.

        Raises:
            CheckpointError: A setting of the section differs from the one the schedule was saved
                with: torch would take the saved one back silently (its settings are part of its
                state, some under other names or in the optimizer's groups).
        """
        super().load_state_dict(state_dict)
        saved_settings = state_dict.get("settings", {})  # (none in a checkpoint from before they were)
        for key, value in self.settings.items():
            if key in saved_settings and saved_settings[key] != _plain(value):
                raise CheckpointError(
                    f"lr_scheduler.{key}: the checkpoint's {type(self.torch_scheduler).__name__} has "
                    f"{saved_settings[key]!r}, the config {_plain(value)!r}; a torch schedule keeps its "
                    f"settings in its state, so continue with {saved_settings[key]!r}, or start a new run"
                )
        saved = state_dict["torch_scheduler"]
        if len(self.optim.param_groups) == 1:  # (see _one_group)
            saved = _one_group(self.torch_scheduler.state_dict(), saved)
        self.torch_scheduler.load_state_dict(saved)


def _plain(value: Any) -> Any:
    """A setting as a checkpoint holds it (``weights_only`` loading takes no enums): an enum's value."""
    return value.value if isinstance(value, enum.Enum) else value


def _one_group(fresh: Any, saved: Any) -> Any:
    """``saved`` with each per-group list of two equal values as one value, where ``fresh`` (this
    schedule's own state, over one group) has one.

    A run without weight decay had two parameter groups (equal but for their parameters) before it
    had one (:func:`ml.optimizers.builtin.grouped_optimizer`); torch pairs a schedule's per-group
    lists (``base_lrs``, ``_last_lr``, ``max_lrs``, ...) with the groups, so the older checkpoints'
    lists must shrink with them. Anything else is left as saved.
    """
    if isinstance(fresh, dict) and isinstance(saved, dict):
        return {key: _one_group(fresh[key], value) if key in fresh else value for key, value in saved.items()}
    if isinstance(fresh, list) and isinstance(saved, list):
        if len(fresh) == 1 and len(saved) == 2 and saved[0] == saved[1]:
            return [saved[0]]
        if len(fresh) == len(saved):
            return [_one_group(f, v) for f, v in zip(fresh, saved, strict=True)]
    return saved


class ImportedLRScheduler(BaseLRScheduler[BaseLRSchedulerConfig]):
    """Binds :attr:`scheduler_class` (set per class by :func:`adapt`) to an optimizer."""

    scheduler_class: ClassVar[type[LRScheduler]]

    def __init__(self, config: BaseLRSchedulerConfig) -> None:
        super().__init__(config)
        # Made once over a stand-in optimizer: a bad value is refused with the config, before a run
        # folder is claimed.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.scheduler_class(SGD([nn.Parameter(torch.zeros(1))], lr=1.0), **section_kwargs(config))

    def get_lr_scale(self, state: State) -> float:
        raise TypeError(
            f"{self.scheduler_class.__name__} is a stateful torch schedule: bind it with get(optim)"
        )

    def get(self, optim: Optimizer) -> SchedulerAdapter:
        return TorchSchedulerAdapter(self, optim)


def adapt(cls: type) -> tuple[type, type[BaseConfig]] | None:
    """``(component class, config class)`` for a torch ``LRScheduler`` subclass, else None.

    Raises:
        RegistryError: The schedule needs a metric at every step (``ReduceLROnPlateau``).
    """
    if issubclass(cls, ReduceLROnPlateau):
        raise RegistryError(
            f"{cls.__qualname__} steps on a validation metric, not with the trainer's steps: "
            "use a schedule of the step (torch.optim.lr_scheduler:StepLR, cosine, ...)"
        )
    if not issubclass(cls, LRScheduler):
        return None
    config_cls = config_from_signature(cls, BaseLRSchedulerConfig, skip=_ADAPTER_ARGUMENTS)
    if cls not in _BUILDERS:
        _BUILDERS[cls] = type(
            f"{cls.__name__}Builder", (ImportedLRScheduler,), {"scheduler_class": cls, "__module__": __name__}
        )
    return _BUILDERS[cls], config_cls
