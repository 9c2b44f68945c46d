"""Defines how a model is spread over the processes of a distributed job: DDP or FSDP2.

- ``ddp``: every process holds the whole model; gradients are averaged by
  :class:`~torch.nn.parallel.DistributedDataParallel` during the backward pass.
- ``fsdp``: parameters, gradients and optimizer state are sharded over the processes with FSDP2
  (:func:`torch.distributed.fsdp.fully_shard`), for models that do not fit one device. Each child
  module holding parameters becomes its own shard unit (gathered just before it runs), then the root.

Checkpoints hold full, unsharded state dicts either way: under FSDP they are gathered with
:mod:`torch.distributed.checkpoint.state_dict` (a collective every rank joins), and written by rank
0 alone, so a checkpoint can be resumed with any number of processes, with or without FSDP.
"""

from typing import Any

import torch
from torch import nn


def wrap_model(model: nn.Module, device: torch.device, mode: str) -> nn.Module:
    """The module the training step runs: ``model`` wrapped in DDP, or ``model`` sharded in place."""
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        for child in model.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_model_state(model: nn.Module) -> dict[str, Any]:
    """The whole model's state dict on the CPU, gathered from every rank (all ranks call this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optim_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state, unsharded, keyed by parameter name (all ranks call this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_full_model_state(model: nn.Module, state: dict[str, Any], *, strict: bool) -> None:
    """Loads a full state dict into a sharded model; each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_full_optim_state(model: nn.Module, optim: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Loads an optimizer state saved by :func:`full_optim_state` into a sharded model's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optim, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )
