"""Defines the ``torchrun`` launcher: ``ml train`` in several processes, on one node or many.

``ml launch CONFIG launcher.name=torchrun launcher.nproc_per_node=N`` becomes
``torchrun --standalone --nproc-per-node N -m ml.entry train CONFIG ...``. With ``launcher.nnodes=M``
(M > 1) it uses a c10d rendezvous at ``launcher.rdzv_endpoint`` instead, and the same command line
is run on each of the M nodes; torchrun assigns node ranks as they join. Global rank 0 claims the
run folder and tells the others (see :mod:`ml.cli`).

The launching process becomes torchrun (``exec``), so signals sent to it reach torchrun, which
passes SIGTERM and SIGINT on to every worker; the workers checkpoint at the next agreed step.
"""

import os
import sys
from dataclasses import dataclass

from omegaconf import DictConfig

from ml.core.compose import ConfigError
from ml.core.config import conf_field
from ml.core.registry import register_launcher
from ml.launchers.base import BaseLauncher, BaseLauncherConfig


@dataclass
class TorchrunLauncherConfig(BaseLauncherConfig):
    nproc_per_node: int = conf_field(1, help="Processes on each node (one per GPU, or CPU processes)")
    nnodes: int = conf_field(1, help="Nodes (machines) in the job; above 1 the c10d rendezvous is used")
    rdzv_endpoint: str = conf_field("127.0.0.1:29400", help="HOST:PORT of the c10d rendezvous (nnodes > 1)")
    rdzv_id: str = conf_field("${trainer.exp_name}", help="Job id shared by all nodes of one rendezvous")
    max_restarts: int = conf_field(0, help="Times torchrun restarts all workers after one fails")


def torchrun_command(config: TorchrunLauncherConfig, args: list[str]) -> list[str]:
    """The ``python -m torch.distributed.run ...`` command line that trains on ``args``."""
    if config.nproc_per_node < 1 or config.nnodes < 1:
        raise ConfigError(
            f"launcher.nproc_per_node and launcher.nnodes must be positive, got "
            f"{config.nproc_per_node} and {config.nnodes}"
        )
    if config.max_restarts < 0:
        raise ConfigError(f"launcher.max_restarts must not be negative, got {config.max_restarts}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(config.nproc_per_node)]
    if config.nnodes == 1:
        cmd += ["--standalone"]
    else:
        host, sep, port = config.rdzv_endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"launcher.rdzv_endpoint must be HOST:PORT, got {config.rdzv_endpoint!r}")
        cmd += [
            "--nnodes",
            str(config.nnodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            config.rdzv_endpoint,
            "--rdzv-id",
            str(config.rdzv_id),
        ]
    cmd += ["--max-restarts", str(config.max_restarts), "-m", "ml.entry", "train", *args]
    return cmd


@register_launcher("torchrun")
class TorchrunLauncher(BaseLauncher[TorchrunLauncherConfig]):
    """Replaces this process with torchrun, which starts one ``ml train`` per process of the job."""

    def launch(self, args: list[str], config: DictConfig) -> int:
        from ml.core.compose import build_objects

        cmd = torchrun_command(self.config, args)
        build_objects(config)  # bad input stops here with one line, not once per worker
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(cmd[0], cmd)
        return 1  # not reached
