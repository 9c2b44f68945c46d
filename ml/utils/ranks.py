"""Where a process stands in a distributed job, read from the launcher's environment, without torch.

torchrun's variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)
win over an ``srun`` step's (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``, ...). Kept apart
from :mod:`ml.utils.distributed` so that the command line can name its rank (in log lines and
errors) without paying for ``import torch``.
"""

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass


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


def _tasks_on_node(tasks_per_node: str, node_id: str) -> int:
    """The number of tasks on node ``node_id`` of a step, from Slurm's compressed list: ``2(x3),1``
    is 2 tasks on each of the first 3 nodes, then 1 (uneven when the tasks do not divide the nodes).

    Raises:
        ConfigError: The two variables do not fit (an environment not made by ``srun``).
    """
    from ml.errors import ConfigError

    try:
        node, first = int(node_id), 0
        for part in tasks_per_node.split(","):
            count, _, repeat = part.partition("(x")
            first += int(repeat.rstrip(")")) if repeat else 1
            if node < first:
                return int(count)
    except ValueError:
        pass
    raise ConfigError(
        f"SLURM_NODEID={node_id!r} names no node of SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r}: "
        "run it as a Slurm step (srun), or unset the SLURM_ variables"
    )


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
        local_world = _tasks_on_node(tasks_per_node, env.get("SLURM_NODEID", "0"))
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
