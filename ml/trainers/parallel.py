"""Defines how a model is spread over the processes of a distributed job: DDP or FSDP2.

- ``ddp``: every process holds the whole model; gradients are averaged by
  :class:`~torch.nn.parallel.DistributedDataParallel` during the backward pass.
- ``fsdp``: parameters, gradients and optimizer state are sharded over the processes with FSDP2
  (:func:`torch.distributed.fsdp.fully_shard`), for models that do not fit one device. The model
  chooses its shard units (``model.shard_units()``, by default each child module holding trainable
  parameters: its blocks), each gathered just before it runs, then the root. ``trainer.fsdp``:
  mixed precision (``param_dtype: bfloat16`` computes in bf16 from fp32 shards, ``reduce_dtype:
  float32`` reduces gradients exactly), and ``hybrid`` (HSDP): a 2-D mesh that shards within each
  group of ``shard_size`` processes (a node) and replicates across the groups, so that the
  all-gathers of every step stay inside a node.
- ``trainer.activation_checkpointing`` (any mode, one process too): each shard unit's activations
  are recomputed in the backward pass rather than kept (:func:`torch.distributed._composable.checkpoint`,
  which leaves the parameters' names as they are, so checkpoints are the same either way).

Checkpoints: ``trainer.checkpoint.format=full`` holds full, unsharded state dicts either way: under
FSDP they are gathered with :mod:`torch.distributed.checkpoint.state_dict` (a collective every rank
joins), and written by rank 0 alone. ``sharded`` (the default under FSDP) writes every rank's
shards at once (:mod:`ml.utils.sharded`). Both resume with any number of processes, with or without FSDP.
"""

import os
from typing import Any

import torch
from torch import nn

from ml.errors import ConfigError, UnusedParametersError


def fsdp_mesh_shape(
    world_size: int, *, hybrid: bool, shard_size: int | None, local_world_size: int
) -> tuple[int, ...]:
    """The device mesh FSDP shards over: ``(world_size,)``, or with ``hybrid`` (HSDP)
    ``(replicas, shard_size)`` - the shard groups are consecutive ranks (a node's, by default).

    Raises:
        ConfigError: ``shard_size`` does not divide the processes into whole groups.
    """
    if not hybrid:
        return (world_size,)
    size = shard_size or local_world_size
    if size > world_size or world_size % size:
        raise ConfigError(
            f"trainer.fsdp.shard_size={size} does not divide the {world_size} processes into whole shard "
            "groups: set it to a divisor (a node's processes), or hybrid=false"
        )
    return (world_size // size, size)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one (and activation checkpointing recomputes): the model's
    ``shard_units()`` (:meth:`ml.models.base.BaseModel.shard_units`), else each child holding
    trainable parameters."""
    choose = getattr(model, "shard_units", None)
    if callable(choose):
        return list(choose())
    return [child for child in model.children() if any(p.requires_grad for p in child.parameters())]


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def wrap_model(
    model: nn.Module,
    device: torch.device,
    mode: str,
    *,
    distributed: bool = True,
    fsdp: Any = None,
    ddp: Any = None,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """The module the training step runs: ``model`` wrapped in DDP, or ``model`` sharded in place
    (``distributed=False``: ``model`` itself). ``fsdp`` and ``ddp`` hold ``trainer.fsdp``'s and
    ``trainer.ddp``'s settings."""
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for unit in shard_units(model):
            checkpoint(unit)
    if not distributed:
        return model
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        world_size = torch.distributed.get_world_size()
        shape = fsdp_mesh_shape(
            world_size,
            hybrid=bool(getattr(fsdp, "hybrid", False)),
            shard_size=getattr(fsdp, "shard_size", None),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
        )
        names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
        policy = MixedPrecisionPolicy(
            param_dtype=_dtype(getattr(fsdp, "param_dtype", None)),
            reduce_dtype=_dtype(getattr(fsdp, "reduce_dtype", None)),
        )
        for unit in shard_units(model):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=bool(getattr(ddp, "find_unused_parameters", False)),
    )


def expects_every_gradient(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped in DDP that waits for a gradient of every trainable parameter
    (``trainer.ddp.find_unused_parameters=false``): see :func:`require_every_gradient`."""
    return isinstance(model, nn.parallel.DistributedDataParallel) and not model.find_unused_parameters


def require_every_gradient(model: nn.Module, step: str) -> None:
    """Raises :class:`~ml.errors.UnusedParametersError`, after a step's backward pass, for trainable
    parameters of ``model`` (the module in a DDP that waits for every gradient:
    :func:`expects_every_gradient`) that the loss left out: they have no gradient.

    DDP then never averages the gradients of their bucket: each rank would step on its own (the
    ranks' weights part), and the next forward pass fails with torch's error, which names the
    parameters by number and asks for an argument the config does not reach. The trainers call
    this once, at their first step, before the optimizer's: the run fails (exit 1) in one line
    that names them, before any update. A model that leaves parameters out only at some steps, or
    on some ranks (a rank whose parameters all had gradients waits in DDP's all-reduce for the
    others' and ends with gloo's or NCCL's error), meets torch's error there.
    """
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise UnusedParametersError(
            f"the loss of {step} left out trainable parameters of the model ({shown}), for which DDP "
            "waits; set trainer.ddp.find_unused_parameters=true if the model leaves parameters out "
            "on purpose, or freeze them (requires_grad=False)"
        )


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def share_rank_0_buffers(model: nn.Module) -> None:
    """Gives every rank rank 0's floating buffers (a batch norm's running statistics; all ranks call
    this). FSDP leaves each rank those of its own batches, where DDP broadcasts rank 0's at every
    forward pass; an evaluation then sees the model the checkpoint keeps (rank 0's) on every rank."""
    for buffer in model.buffers():  # every buffer, persistent or not, as DDP broadcasts them
        if not buffer.is_floating_point():
            continue
        if buffer.is_contiguous():
            torch.distributed.broadcast(buffer.data, src=0)
        else:  # NCCL takes only contiguous tensors (gloo copies itself)
            whole = buffer.data.contiguous()
            torch.distributed.broadcast(whole, src=0)
            buffer.data.copy_(whole)


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


def load_full_model_state(model: nn.Module, state: dict[str, Any], *, strict: bool) -> list[str]:
    """Loads a full state dict into a sharded model; each rank keeps its shard (all ranks call this).

    The keys and whole shapes are checked first, as :func:`ml.utils.checkpoint.load_model_state`
    does for a model that is not sharded: under ``strict`` a mismatch raises, naming it; otherwise
    tensors of another shape are left out and what did not fit is returned as notes.

    Raises:
        CheckpointError: ``strict`` and the keys or shapes differ (the message lists them).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from ml.errors import CheckpointError

    own = {name: tuple(t.shape) for name, t in model.state_dict().items()}  # DTensors: whole shapes
    missing = [name for name in own if name not in state]
    unexpected = [name for name in state if name not in own]
    misfits = [
        f"{name} {tuple(t.shape)} vs {own[name]}"
        for name, t in state.items()
        if name in own and isinstance(t, torch.Tensor) and tuple(t.shape) != own[name]
    ]
    notes = [
        f"{what}: {', '.join(names)}"
        for what, names in (
            ("not loaded, shapes differ", misfits),
            ("missing keys", missing),
            ("unexpected keys", unexpected),
        )
        if names
    ]
    if strict and notes:
        raise CheckpointError(f"{'; '.join(notes)} (checkpoint.load_strict=false loads what fits)")
    if misfits:
        state = {
            k: v
            for k, v in state.items()
            if not (isinstance(v, torch.Tensor) and k in own and tuple(v.shape) != own[k])
        }
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))
    return notes


def load_full_optim_state(model: nn.Module, optim: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Loads an optimizer state saved by :func:`full_optim_state` into a sharded model's optimizer.

    An optimizer that keeps no state (SGD without momentum) gets its groups' settings alone: torch's
    loader takes the device from the state's tensors, and fails without any.

    Raises:
        CheckpointError: The checkpoint's parameter groups are not the optimizer's.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if state.get("state"):
        set_optimizer_state_dict(
            model, optim, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
        )
        return
    from ml.utils.checkpoint import optimizer_misfit

    saved = state["param_groups"]
    if [len(group["params"]) for group in saved] != [len(group["params"]) for group in optim.param_groups]:
        raise optimizer_misfit("other parameter groups")
    for group, settings in zip(optim.param_groups, saved, strict=True):
        group.update({key: value for key, value in settings.items() if key != "params"})
