"""Defines ``lion``, ``adan``, ``shampoo``, ``lamb`` and ``prodigy``: the ``pytorch-optimizer`` library's.

Each has a config of its own (the fields ``ml train --help`` lists), the same decay / no-decay
parameter groups as the built-in ones (:func:`ml.optimizers.builtin.weight_decay_param_groups`:
biases and norms are not decayed), and builds the library's class when the trainer asks for the
optimizer, so the library is imported only by a run that uses one (install it with
``pip install 'ml[optimizers]'``). Any other class of the library is reachable by import path,
``optimizer: {name: "pytorch_optimizer:AdaBelief", ...}`` (:mod:`ml.optimizers.imported`).
"""

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from omegaconf import OmegaConf
from torch import nn

from ml.core.config import conf_field
from ml.core.registry import register_optimizer
from ml.optimizers.base import BaseOptimizer, BaseOptimizerConfig
from ml.optimizers.builtin import grouped_optimizer

LIBRARY = "pytorch_optimizer"
INSTALL_HINT = "pip install 'ml[optimizers]' (the pytorch-optimizer package)"


@dataclass
class LibraryOptimizerConfig(BaseOptimizerConfig):
    """Fields every library optimizer here has."""

    lr: float = conf_field(1e-3, help="Learning rate (the schedule scales it)")
    weight_decay: float = conf_field(0.0, help="Weight decay of the decayed parameter group")
    default_decay: bool = conf_field(True, help="Decay parameters of custom modules (not bias/norm/layer)")


@dataclass
class LionConfig(LibraryOptimizerConfig):
    """Config of ``lion`` (EvoLved Sign Momentum; pytorch_optimizer.Lion)."""

    name: str = conf_field("lion", help="Registered name, or `package.module:ClassName`")
    lr: float = conf_field(1e-4, help="Learning rate: 3-10x smaller than AdamW's for the same task")
    beta1: float = conf_field(0.9, help="Interpolation of the update's momentum (0 <= beta1 < 1)")
    beta2: float = conf_field(0.99, help="Decay of the momentum kept (0 <= beta2 < 1)")
    weight_decay: float = conf_field(0.0, help="Decoupled weight decay: 3-10x AdamW's for the same task")


@dataclass
class AdanConfig(LibraryOptimizerConfig):
    """Config of ``adan`` (Adaptive Nesterov momentum; pytorch_optimizer.Adan)."""

    name: str = conf_field("adan", help="Registered name, or `package.module:ClassName`")
    beta1: float = conf_field(0.98, help="Decay of the gradient's running mean (0 <= beta1 < 1)")
    beta2: float = conf_field(0.92, help="Decay of the gradient difference's running mean (0 <= beta2 < 1)")
    beta3: float = conf_field(0.99, help="Decay of the squared term's running mean (0 <= beta3 < 1)")
    eps: float = conf_field(1e-8, help="Added to the denominator for numerical stability")
    weight_decouple: bool = conf_field(False, help="Decoupled weight decay (AdamW-style) instead of L2")


@dataclass
class ShampooConfig(LibraryOptimizerConfig):
    """Config of ``shampoo`` (pytorch_optimizer.Shampoo: preconditioned by each weight's row and
    column statistics)."""

    name: str = conf_field("shampoo", help="Registered name, or `package.module:ClassName`")
    momentum: float = conf_field(0.0, help="Momentum factor (0: none)")
    preconditioning_compute_steps: int = conf_field(1, help="Updates between recomputing the preconditioners")
    matrix_eps: float = conf_field(1e-6, help="Added to the statistics' diagonal before the inverse roots")


@dataclass
class LambConfig(LibraryOptimizerConfig):
    """Config of ``lamb`` (layer-wise adaptive Adam for large batches; pytorch_optimizer.Lamb)."""

    name: str = conf_field("lamb", help="Registered name, or `package.module:ClassName`")
    beta1: float = conf_field(0.9, help="Decay of the gradient's running mean (0 <= beta1 < 1)")
    beta2: float = conf_field(0.999, help="Decay of the squared gradient's running mean (0 <= beta2 < 1)")
    eps: float = conf_field(1e-6, help="Added to the denominator for numerical stability")


@dataclass
class ProdigyConfig(LibraryOptimizerConfig):
    """Config of ``prodigy`` (Adam that estimates its own step size; pytorch_optimizer.Prodigy)."""

    name: str = conf_field("prodigy", help="Registered name, or `package.module:ClassName`")
    lr: float = conf_field(1.0, help="Multiplier of the estimated step size (leave at 1; schedules scale it)")
    beta1: float = conf_field(0.9, help="Decay of the gradient's running mean (0 <= beta1 < 1)")
    beta2: float = conf_field(0.999, help="Decay of the squared gradient's running mean (0 <= beta2 < 1)")
    d0: float = conf_field(1e-6, help="Initial estimate of the step size")


LibraryConfigT = TypeVar("LibraryConfigT", bound=LibraryOptimizerConfig)


class LibraryOptimizer(BaseOptimizer[LibraryConfigT]):
    """Builds :attr:`class_name` of ``pytorch_optimizer`` over the decay / no-decay parameter groups.

    The config's ``beta1``, ``beta2`` (, ``beta3``) become the library's ``betas`` tuple; every other
    field but ``name`` and ``default_decay`` is passed as the keyword argument of the same name.

    Raises:
        ValueError: A rate, beta or decay is out of range.
    """

    class_name: ClassVar[str]

    def __init__(self, config: LibraryConfigT) -> None:
        super().__init__(config)
        if importlib.util.find_spec(LIBRARY) is None:  # refused with the config, before a run folder
            raise ValueError(f"optimizer {self.config.name} needs the {LIBRARY} library: {INSTALL_HINT}")
        values = self._values()
        for key in ("lr", "weight_decay", "eps", "momentum", "d0", "matrix_eps"):
            if key in values and values[key] < 0:
                raise ValueError(f"optimizer.{key} must be non-negative (>= 0), got {values[key]}")
        for key in ("beta1", "beta2", "beta3"):
            if key in values and not 0 <= values[key] < 1:
                raise ValueError(f"optimizer.{key} must be in [0, 1), got {values[key]}")
        if values.get("preconditioning_compute_steps", 1) < 1:
            raise ValueError("optimizer.preconditioning_compute_steps must be positive (>= 1)")

    def _values(self) -> dict[str, Any]:
        values = OmegaConf.to_container(self.raw_config, resolve=True)
        assert isinstance(values, dict)
        return {str(key): value for key, value in values.items()}

    def get(self, model: nn.Module) -> torch.optim.Optimizer:
        library = importlib.import_module(LIBRARY)
        kwargs = self._values()
        del kwargs["name"]
        weight_decay, default_decay = kwargs.pop("weight_decay"), kwargs.pop("default_decay")
        betas = tuple(kwargs.pop(key) for key in ("beta1", "beta2", "beta3") if key in kwargs)
        if betas:
            kwargs["betas"] = betas
        optimizer_class = getattr(library, self.class_name)
        return grouped_optimizer(optimizer_class, model, weight_decay, default_decay, **kwargs)


@register_optimizer("lion")
class LionOptimizer(LibraryOptimizer[LionConfig]):
    class_name = "Lion"


@register_optimizer("adan")
class AdanOptimizer(LibraryOptimizer[AdanConfig]):
    class_name = "Adan"


@register_optimizer("shampoo")
class ShampooOptimizer(LibraryOptimizer[ShampooConfig]):
    class_name = "Shampoo"


@register_optimizer("lamb")
class LambOptimizer(LibraryOptimizer[LambConfig]):
    class_name = "Lamb"


@register_optimizer("prodigy")
class ProdigyOptimizer(LibraryOptimizer[ProdigyConfig]):
    class_name = "Prodigy"
