"""Defines :class:`BaseModel`, the base class of every model.

A model is an ``nn.Module`` built from its config dataclass. It has its own :class:`MultiLogger`
(namespace ``model``) for values it wants to report, such as activation statistics.
"""

from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from ml.core.config import BaseConfig, BaseObject
from ml.loggers.base import MultiLogger


@dataclass
class BaseModelConfig(BaseConfig):
    """Config shared by all models."""


ModelConfigT = TypeVar("ModelConfigT", bound=BaseModelConfig)


class BaseModel(BaseObject[ModelConfigT], nn.Module):
    """An ``nn.Module`` built from a config; subclasses define layers and ``forward``."""

    def __init__(self, config: ModelConfigT) -> None:
        nn.Module.__init__(self)
        BaseObject.__init__(self, config)
        self.logger = MultiLogger(default_namespace="model")
