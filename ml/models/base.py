"""Defines :class:`BaseModel`, the base class of every model.

A model is an ``nn.Module`` built from its config dataclass. It has its own :class:`MultiLogger`
(namespace ``model``) for values it wants to report, such as activation statistics.
:func:`eval_mode` is how the trainers evaluate a model without changing the modes its user chose.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from ml.core.config import BaseConfig, BaseObject
from ml.loggers.base import MultiLogger


@dataclass
class BaseModelConfig(BaseConfig):
    """Config shared by all models."""


ModelConfigT = TypeVar("ModelConfigT", bound=BaseModelConfig)


class BaseModel(nn.Module, BaseObject[ModelConfigT]):
    """An ``nn.Module`` built from a config; subclasses define layers and ``forward``.

    ``nn.Module`` comes first among the bases: FSDP2 re-classes a sharded module, which needs the
    instance layout of a plain ``nn.Module`` subclass.
    """

    def __init__(self, config: ModelConfigT) -> None:
        nn.Module.__init__(self)
        BaseObject.__init__(self, config)
        self.logger = MultiLogger(default_namespace="model")

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one, each gathered just before it runs (and, with
        ``trainer.activation_checkpointing``, whose activations are recomputed): a model's repeated
        blocks. By default each child module holding trainable parameters; a model whose blocks sit
        deeper (``self.blocks = nn.ModuleList(...)``) returns them: ``return list(self.blocks)``."""
        return [child for child in self.children() if any(p.requires_grad for p in child.parameters())]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then every module back in the mode it was in.

    ``model.train()`` afterwards would also switch on a submodule the user keeps in eval mode (a
    frozen batch norm, whose running statistics must not move).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
