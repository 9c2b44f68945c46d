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
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_control_group: Any = None


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in its job, as the launcher's environment says."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    source: str = "single"  # "torchrun", "slurm" or "single"
    nodelist: str | None = None  # Slurm's node list, for the master's address when MASTER_ADDR is unset

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as ``node[03-05,07],gpu1``."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
            )
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, _, ranges = head.partition("[")
        head = prefix + ranges.split("-")[0].split(",")[0].rstrip("]")
    return head


def slurm_master_port(job_id: str) -> int:
    """A port every task of Slurm job ``job_id`` derives alike: 15000-24999, from the job id."""
    return 15000 + int(job_id) % 10000 if job_id.isdigit() else 29500


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Reads this process's rank and world from torchrun's variables, else from an ``srun`` step's."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        port = env.get("MASTER_PORT")
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=int(env["WORLD_SIZE"]),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(port) if port else None,
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
        local_world = int(tasks_per_node.split("(")[0].split(",")[0])
        port = env.get("MASTER_PORT")
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            world_size=int(env["SLURM_NTASKS"]),
            local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(port) if port else slurm_master_port(env.get("SLURM_JOB_ID", "")),
            source="slurm",
            nodelist=nodelist,
        )
    return DistEnv()


def export_env(info: DistEnv) -> None:
    """Writes ``info`` into torchrun's variables, so ``env://`` and device detection can read them."""
    if info.source != "slurm":
        return
    values = {
        "RANK": info.rank,
        "LOCAL_RANK": info.local_rank,
        "WORLD_SIZE": info.world_size,
        "LOCAL_WORLD_SIZE": info.local_world_size,
        "MASTER_ADDR": info.master_addr or _first_host(info.nodelist or "127.0.0.1"),
        "MASTER_PORT": info.master_port,
    }
    for key, value in values.items():
        os.environ[key] = str(value)


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
    if not is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=control_group())
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


def mean_over_ranks(scalars: dict[str, float]) -> dict[str, float]:
    """Averages each named value over the ranks that logged it."""
    if not is_initialized():
        return scalars
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for part in all_gather_object(scalars):
        for name, value in part.items():
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in sums}
