"""Defines how a process finds its place in a distributed job, and the few collectives trainers use.

A job is described by torchrun's variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) or, inside an ``srun`` step, by Slurm's (``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_NTASKS``, ``SLURM_STEP_NODELIST``, ...); torchrun's win when both are
set. :func:`init_distributed` turns Slurm's into torchrun's (so ``env://`` initialisation and
:func:`ml.utils.device.detect_device` see one convention), pins the local device and joins the
process group: NCCL on CUDA, gloo on the CPU.

Besides the default group, a gloo group carries the trainers' small control messages (the stop
flag, the shared clock, whether to write logs): on CPU tensors, so agreeing on them never waits
for the GPU.
"""

import logging
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ml.utils.ranks import dist_env, export_env

logger = logging.getLogger(__name__)

_control_group: Any = None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device | None = None, timeout_s: float = 600.0) -> bool:
    """Joins the job's process group if this is a distributed job; returns whether it is one.

    Idempotent. Pins ``device`` (default: :func:`~ml.utils.device.detect_device` once Slurm's
    variables are exported) when it is a CUDA device and uses NCCL there, gloo otherwise.
    """
    global _control_group
    if is_initialized():
        return dist.get_world_size() > 1
    info = dist_env()
    if not info.is_distributed:
        return False
    export_env(info)
    if device is None:
        from ml.utils.device import detect_device

        device = detect_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )
    _control_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    logger.info("Joined the %s process group as rank %d of %d", backend, info.rank, info.world_size)
    return info.world_size > 1


def barrier() -> None:
    """Waits until every rank gets here (on the CPU control group)."""
    if is_initialized():
        dist.barrier(group=control_group())


def destroy_distributed() -> None:
    """Leaves the process group (if one was joined)."""
    global _control_group
    if is_initialized():
        dist.destroy_process_group()
    _control_group = None


def control_group() -> Any:
    """The gloo group for small CPU-side messages (the default group itself when it is gloo)."""
    return _control_group if _control_group is not None else dist.group.WORLD


def get_rank() -> int:
    """This process's global rank: the process group's if one exists, else the launcher's, else 0."""
    if is_initialized():
        return dist.get_rank()
    return dist_env().rank


def get_world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    return dist_env().world_size


def is_master() -> bool:
    """True on the one process that writes files and logs (global rank 0)."""
    return get_rank() == 0


def all_max(values: list[float]) -> list[float]:
    """The element-wise maximum of ``values`` over all ranks (on the CPU control group)."""
    return _all_reduced(values, "MAX")


def all_sum(values: list[float]) -> list[float]:
    """The element-wise sum of ``values`` over all ranks (on the CPU control group)."""
    return _all_reduced(values, "SUM")


def _all_reduced(values: list[float], op: str) -> list[float]:
    if not is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op), group=control_group())
    return tensor.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (over the CPU control group)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=control_group())
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=control_group())
    return box[0]


def mean_over_ranks(scalars: dict[str, float], weight: float = 1.0) -> dict[str, float]:
    """Averages each named value over the ranks that logged it, each weighted by its rank's
    ``weight`` (its share of the step's samples: see ``BaseTrainer.rank_weight``).

    A value every rank logged alike (an evaluation's, agreed on) comes back as it is, not as a sum
    divided again, which rounds (three ranks' 0.1 would come back as 0.10000000000000002).
    """
    if not is_initialized():
        return scalars
    logged: dict[str, list[tuple[float, float]]] = {}
    for rank_weight, part in all_gather_object((weight, scalars)):
        for name, value in part.items():
            logged.setdefault(name, []).append((rank_weight, value))
    return {name: _weighted_mean(parts) for name, parts in logged.items()}


def _weighted_mean(parts: list[tuple[float, float]]) -> float:
    first_weight, first = parts[0]
    if all(value == first for _, value in parts):
        return first
    if all(weight == first_weight for weight, _ in parts):  # the plain mean, rounded as it always was
        return sum(value for _, value in parts) / len(parts)
    return sum(weight * value for weight, value in parts) / sum(weight for weight, _ in parts)
