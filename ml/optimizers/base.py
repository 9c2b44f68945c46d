"""Defines :class:`BaseOptimizer`, the config-built factory of a ``torch.optim.Optimizer``."""

from abc import abstractmethod
from dataclasses import dataclass
from typing import TypeVar

from torch import nn
from torch.optim import Optimizer

from ml.core.config import BaseConfig, BaseObject


@dataclass
class BaseOptimizerConfig(BaseConfig):
    """Config shared by all optimizers."""


OptimizerConfigT = TypeVar("OptimizerConfigT", bound=BaseOptimizerConfig)


class BaseOptimizer(BaseObject[OptimizerConfigT]):
    """Builds the optimizer for a model's parameters."""

    @abstractmethod
    def get(self, model: nn.Module) -> Optimizer:
        """Returns a new optimizer over ``model``'s trainable parameters."""
