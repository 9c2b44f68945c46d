"""Defines the built-in optimizers (``adam``, ``adamw``, ``sgd``) and their weight-decay grouping.

All three split a model's trainable parameters into a decayed and a non-decayed parameter group with
:func:`weight_decay_param_groups` (one group when there is no decay, see below). The rule, applied
to each parameter's owning module(s):

1. biases (a parameter whose name has a ``bias`` part: ``bias``, ``in_proj_bias``, ``bias_ih_l0``)
   are not decayed;
2. parameters of normalization layers (batch, instance, layer, group and RMS norms) are not decayed;
3. parameters of the standard weight-bearing layers (linear, bilinear, convolutions, embeddings,
   recurrent layers, multi-head attention) are decayed; embeddings are deliberately kept in this
   group;
4. any other parameter (one a custom module registers directly, e.g. a learned positional table or
   a temperature) is decayed when ``default_decay`` is true (the default), else not.

A parameter shared by several modules appears once, and is left undecayed if any of its owners says
so. With no weight decay the split changes nothing, so there is one group: each group costs the
optimizer its own pass per step (10 us of Adam's 255 on a 64-256-256-10 MLP). Frozen parameters
(``requires_grad=False``) are left out. ``foreach``/``fused`` are left to the torch defaults here;
the trainers then switch Adam and AdamW to the fused kernel (``trainer.fast_optimizer``, see
:mod:`ml.optimizers.fast`).
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ml.core.config import conf_field
from ml.core.registry import register_optimizer
from ml.optimizers.base import BaseOptimizer, BaseOptimizerConfig

_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # batch and instance norms, lazy and synchronized ones included
    nn.LayerNorm,
    nn.GroupNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())  # torch >= 2.4

_WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.RNNBase,
    nn.MultiheadAttention,
)


OptimizerT = TypeVar("OptimizerT", bound=torch.optim.Optimizer)


def _is_bias(param_name: str) -> bool:
    return "bias" in param_name.split("_")


def _should_decay(module: nn.Module, param_name: str, default_decay: bool) -> bool:
    """Applies the module docstring's rule to one ``(owning module, parameter name)`` pair."""
    if _is_bias(param_name) or isinstance(module, _NORM_LAYERS):
        return False
    if isinstance(module, _WEIGHT_LAYERS):
        return True
    return default_decay


def weight_decay_param_groups(
    model: nn.Module, weight_decay: float, default_decay: bool = True
) -> list[dict[str, Any]]:
    """Splits a model's trainable parameters into a decayed and a non-decayed group (one without decay).

    The rule is the one in this module's docstring. Parameters keep the order of
    ``model.parameters()`` within each group, so the optimizer's state dict is the same from run to
    run. With ``weight_decay`` 0 there is one group, in the order of ``model.parameters()``.

    Args:
        model: The model whose parameters are grouped.
        weight_decay: The decay of the decayed group (the other group gets 0).
        default_decay: Whether to decay parameters the rule does not classify (rule 4).

    Returns:
        Up to two torch parameter groups, ``{"params": [...], "weight_decay": ...}``, decayed first;
        an empty group is left out.

    Raises:
        ValueError: If the model has no trainable parameter.
    """
    if weight_decay == 0:
        params = list(_trainable_parameters(model))
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters to optimize")
        return [{"params": params, "weight_decay": 0.0}]
    decay, no_decay = _split_by_decay(model, default_decay)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def _split_by_decay(model: nn.Module, default_decay: bool) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    no_decay_ids: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not _should_decay(module, name, default_decay):
                no_decay_ids.add(id(param))

    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in _trainable_parameters(model):
        (no_decay if id(param) in no_decay_ids else decay).append(param)
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimize")
    return decay, no_decay


def grouped_optimizer(
    optimizer: Callable[..., OptimizerT],
    model: nn.Module,
    weight_decay: float,
    default_decay: bool,
    **kwargs: Any,
) -> OptimizerT:
    """``optimizer(weight_decay_param_groups(...), **kwargs)``.

    Without decay the optimizer also loads a state saved in two groups (decayed parameters first,
    both without decay), as checkpoints held it before such a run had one group.
    """
    groups = weight_decay_param_groups(model, weight_decay, default_decay)
    built = optimizer(groups, **kwargs)
    if weight_decay == 0:
        decay, no_decay = _split_by_decay(model, default_decay)
        if decay and no_decay:
            position = {id(p): i for i, p in enumerate(groups[0]["params"])}
            built.register_load_state_dict_pre_hook(
                _from_split_groups([position[id(p)] for p in decay + no_decay], len(decay))
            )
    return built


def _from_split_groups(
    positions: list[int], num_decayed: int
) -> Callable[[Any, dict[str, Any]], dict[str, Any] | None]:
    """A load hook: an optimizer state saved with the decayed group (``num_decayed`` parameters)
    first and the other second, both without decay, as one group in ``model.parameters()`` order;
    ``positions[k]`` is where the ``k``-th saved parameter now stands. Any other state (other group
    sizes: the rule would now sort the parameters otherwise) is left to torch's own checks."""

    def merge(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any] | None:
        groups = state_dict.get("param_groups", [])
        saved = [i for group in groups for i in group["params"]]
        if (
            len(groups) != 2
            or len(optimizer.param_groups) != 1
            or [len(group["params"]) for group in groups] != [num_decayed, len(positions) - num_decayed]
            or any(group.get("weight_decay") != 0 for group in groups)
            or not all(isinstance(i, int) for i in saved)
        ):
            return None
        now = dict(zip(saved, positions, strict=True))
        return {
            "state": {now[i]: value for i, value in state_dict["state"].items()},
            "param_groups": [{**groups[0], "params": list(range(len(positions)))}],
        }

    return merge


def _trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    # ``parameters()`` yields a shared parameter once.
    return (param for param in model.parameters() if param.requires_grad)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class AdamConfig(BaseOptimizerConfig):
    """Config of the ``adam`` optimizer (``torch.optim.Adam``)."""

    name: str = conf_field("adam", help="Registered name, or `package.module:ClassName`")
    lr: float = conf_field(1e-3, help="Learning rate (the schedule scales it)")
    beta1: float = conf_field(0.9, help="Decay of the gradient's running mean (0 <= beta1 < 1)")
    beta2: float = conf_field(0.999, help="Decay of the squared gradient's running mean (0 <= beta2 < 1)")
    eps: float = conf_field(1e-8, help="Added to the denominator for numerical stability")
    weight_decay: float = conf_field(0.0, help="L2 penalty (Adam) on the decayed parameter group")
    default_decay: bool = conf_field(True, help="Decay parameters of custom modules (not bias/norm/layer)")


@dataclass
class AdamWConfig(AdamConfig):
    """Config of the ``adamw`` optimizer (``torch.optim.AdamW``, decoupled weight decay)."""

    name: str = conf_field("adamw", help="Registered name, or `package.module:ClassName`")
    weight_decay: float = conf_field(1e-2, help="Decoupled weight decay of the decayed parameter group")


def _check_adam(config: AdamConfig) -> None:
    _check(config.lr >= 0, f"optimizer.lr must be non-negative (>= 0), got {config.lr}")
    _check(0 <= config.beta1 < 1, f"optimizer.beta1 must be in [0, 1), got {config.beta1}")
    _check(0 <= config.beta2 < 1, f"optimizer.beta2 must be in [0, 1), got {config.beta2}")
    _check(config.eps >= 0, f"optimizer.eps must be non-negative (>= 0), got {config.eps}")
    _check(
        config.weight_decay >= 0,
        f"optimizer.weight_decay must be non-negative (>= 0), got {config.weight_decay}",
    )


@register_optimizer("adam")
class AdamOptimizer(BaseOptimizer[AdamConfig]):
    """Builds ``torch.optim.Adam`` over the decay / no-decay parameter groups (one without decay).

    Raises:
        ValueError: If a field is out of range.
    """

    torch_optimizer: type[torch.optim.Adam] | type[torch.optim.AdamW] = torch.optim.Adam

    def __init__(self, config: AdamConfig) -> None:
        super().__init__(config)
        _check_adam(config)

    def get(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        return grouped_optimizer(
            self.torch_optimizer,
            model,
            cfg.weight_decay,
            cfg.default_decay,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
        )


@register_optimizer("adamw", AdamWConfig)
class AdamWOptimizer(AdamOptimizer):
    """Builds ``torch.optim.AdamW`` (decoupled weight decay) over the same parameter groups."""

    torch_optimizer = torch.optim.AdamW


@dataclass
class SGDConfig(BaseOptimizerConfig):
    """Config of the ``sgd`` optimizer (``torch.optim.SGD``)."""

    name: str = conf_field("sgd", help="Registered name, or `package.module:ClassName`")
    lr: float = conf_field(1e-2, help="Learning rate (the schedule scales it)")
    momentum: float = conf_field(0.0, help="Momentum factor (0: plain SGD)")
    nesterov: bool = conf_field(False, help="Use Nesterov momentum (needs momentum > 0)")
    weight_decay: float = conf_field(0.0, help="L2 penalty on the decayed parameter group")
    default_decay: bool = conf_field(True, help="Decay parameters of custom modules (not bias/norm/layer)")


@register_optimizer("sgd")
class SGDOptimizer(BaseOptimizer[SGDConfig]):
    """Builds ``torch.optim.SGD`` over the decay / no-decay parameter groups (one without decay).

    Raises:
        ValueError: If a field is out of range, or ``nesterov`` is set without momentum.
    """

    def __init__(self, config: SGDConfig) -> None:
        super().__init__(config)
        _check(config.lr >= 0, f"optimizer.lr must be non-negative (>= 0), got {config.lr}")
        _check(config.momentum >= 0, f"optimizer.momentum must be non-negative (>= 0), got {config.momentum}")
        _check(
            config.weight_decay >= 0,
            f"optimizer.weight_decay must be non-negative (>= 0), got {config.weight_decay}",
        )
        _check(
            not config.nesterov or config.momentum > 0,
            f"optimizer.nesterov needs a positive optimizer.momentum (> 0), got {config.momentum}",
        )

    def get(self, model: nn.Module) -> torch.optim.SGD:
        cfg = self.config
        return grouped_optimizer(
            torch.optim.SGD,
            model,
            cfg.weight_decay,
            cfg.default_decay,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
        )
