"""Defines the optimizer section of a torch optimizer named by import path (``torch.optim:SGD``).

``optimizer: {name: "torch.optim:SGD", lr: 0.1, momentum: 0.9}`` builds ``torch.optim.SGD`` over the
model's trainable parameters with those keyword arguments. The section's keys are the class's
keyword arguments with their defaults (:func:`ml.core.registry.config_from_signature`), so an
unknown key is refused and ``config.yaml`` records every value the run used. Any subclass of
``torch.optim.Optimizer`` works: torch's, or another library's (``pytorch_optimizer:Lion``).

All trainable parameters form one group with the class's own weight decay: unlike the registered
optimizers (``adamw``, ``lion``, ...), which leave biases and norms undecayed, the class is called
exactly as the section says.
"""

import dataclasses
from typing import Any, ClassVar

import torch
from omegaconf import OmegaConf
from torch import nn

from ml.core.config import BaseConfig
from ml.core.registry import config_from_signature
from ml.optimizers.base import BaseOptimizer, BaseOptimizerConfig

_BUILDERS: dict[type, type["ImportedOptimizer"]] = {}


def section_kwargs(config: Any) -> dict[str, Any]:
    """A signature-made section's values as keyword arguments (tuples as tuples, enums as enums)."""
    instance: Any = OmegaConf.to_object(config) if OmegaConf.is_config(config) else config
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance) if f.name != "name"}


class ImportedOptimizer(BaseOptimizer[BaseOptimizerConfig]):
    """Builds :attr:`optimizer_class` (set per class by :func:`adapt`) from the section's keywords."""

    optimizer_class: ClassVar[type[torch.optim.Optimizer]]

    def __init__(self, config: BaseOptimizerConfig) -> None:
        super().__init__(config)
        # The class checks its arguments when made: made once over a stand-in parameter here, a bad
        # value (lr=-1) is refused with the config, before a run folder is claimed.
        self.optimizer_class([nn.Parameter(torch.zeros(1))], **section_kwargs(config))

    def get(self, model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters to optimize")
        return self.optimizer_class(params, **section_kwargs(self.config))


def adapt(cls: type) -> tuple[type, type[BaseConfig]] | None:
    """``(component class, config class)`` for a ``torch.optim.Optimizer`` subclass, else None."""
    if not issubclass(cls, torch.optim.Optimizer):
        return None
    config_cls = config_from_signature(cls, BaseOptimizerConfig, skip=("params",))
    if cls not in _BUILDERS:
        _BUILDERS[cls] = type(
            f"{cls.__name__}Builder", (ImportedOptimizer,), {"optimizer_class": cls, "__module__": __name__}
        )
    return _BUILDERS[cls], config_cls
