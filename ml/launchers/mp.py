"""Defines the ``mp`` launcher: ``ml train`` in several processes on this machine, without torchrun.

``ml launch CONFIG launcher.name=mp launcher.nproc_per_node=2`` starts the processes with
``torch.multiprocessing`` (spawn) and gives each the environment torchrun would: ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1`` and a free
``MASTER_PORT`` (and ``OMP_NUM_THREADS=1`` unless set, as torchrun does). Each then runs the ``ml``
program as torchrun's workers do (``python -m ml.entry train CONFIG ...``), so DDP, FSDP, the
shared run folder, resume and the stop protocol are exactly those of a torchrun job.

The launching process stays and watches:

- a process that fails (non-zero exit, or killed) ends the others (SIGTERM, then SIGKILL after
  ``launcher.kill_after_s``) and ``ml launch`` exits with its code (1 if killed by a signal);
- a stop signal (SIGTERM, SIGUSR1, SIGINT) to the launching process is passed on to every process,
  which checkpoint at the next agreed step and exit; ``ml launch`` then exits with their code (0,
  130 for Ctrl-C). The processes are in a process group of their own, so a terminal's Ctrl-C
  reaches each of them once, through the launcher; and they receive SIGTERM if the launcher dies
  (``PR_SET_PDEATHSIG``), so they never train on as orphans.
"""

import contextlib
import ctypes
import logging
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from ml.core.config import conf_field
from ml.core.registry import register_launcher
from ml.errors import EXIT_FAILURE, ConfigError
from ml.launchers.base import BaseLauncher, BaseLauncherConfig

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass
class MultiprocessingLauncherConfig(BaseLauncherConfig):
    nproc_per_node: int = conf_field(2, help="Processes on this machine (one per GPU, or CPU processes)")
    kill_after_s: float = conf_field(
        30.0, help="After a process fails, seconds the others get to end on SIGTERM before SIGKILL"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no one listens on now (rank 0's store takes it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_environment(local_rank: int, nproc: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for one worker of a single-node job."""
    env = {
        "RANK": str(local_rank),
        "LOCAL_RANK": str(local_rank),
        "GROUP_RANK": "0",
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"  # as torchrun: N processes, each with every core's threads, thrash
    return env


def _run_rank(local_rank: int, nproc: int, port: int, parent: int, argv: list[str]) -> None:
    """One spawned process: joins its own process group, then runs ``ml ARGV`` as rank ``local_rank``."""
    import importlib

    os.setpgid(0, 0)  # the launcher passes signals on; a terminal's Ctrl-C must not reach us twice
    with contextlib.suppress(OSError, AttributeError):  # not Linux: orphans are possible there
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before the line above
        sys.exit(EXIT_FAILURE)
    os.environ.update(rank_environment(local_rank, nproc, port))
    sys.argv = ["ml", *argv]
    # The ml program itself, as torchrun's workers run it (`python -m ml.entry`): its signal
    # handling, error reporting and exit codes. Imported by name: the command line it runs is the
    # top of the import graph, above this module.
    sys.exit(importlib.import_module("ml.entry").main())


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


@register_launcher("mp")
class MultiprocessingLauncher(BaseLauncher[MultiprocessingLauncherConfig]):
    """Spawns ``nproc_per_node`` processes of ``ml train`` and watches them (see the module docstring)."""

    def launch(self, args: list[str], config: DictConfig) -> int:
        import torch.multiprocessing as mp

        from ml.core.compose import build_objects
        from ml.utils.signals import take_early_signal, training_began

        nproc = self.config.nproc_per_node
        if nproc < 1:
            raise ConfigError(f"launcher.nproc_per_node must be positive, got {nproc}")
        if self.config.kill_after_s < 0:
            raise ConfigError(f"launcher.kill_after_s must not be negative, got {self.config.kill_after_s}")
        build_objects(config)  # bad input stops here with one line, not once per process
        port = free_port()
        sys.stdout.flush()
        sys.stderr.flush()
        stops: list[int] = []
        processes: list[Any] = []

        def send(signum: int) -> None:
            for process in processes:
                if process.exitcode is None:
                    with contextlib.suppress(ProcessLookupError):  # it has just ended
                        os.kill(process.pid, signum)

        def forward(signum: int, frame: Any) -> None:
            del frame
            stops.append(signum)
            send(signum)

        handled = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
        previous = {sig: signal.signal(sig, forward) for sig in handled}
        training_began()  # stop signals are this launcher's to pass on now: no start-up watchdog here
        early = take_early_signal()  # one that came while `ml` started
        if early is not None:
            stops.append(early)
        try:
            context = mp.start_processes(
                _run_rank,
                args=(nproc, port, os.getpid(), ["train", *args]),
                nprocs=nproc,
                join=False,
                start_method="spawn",
            )
            processes.extend(context.processes)
            for sig in list(stops):  # one that came before they existed: they stop before training
                send(sig)
            return self._watch(processes, stops)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _watch(self, processes: list[Any], stops: list[int]) -> int:
        """Waits for every process; ends the others when one fails. Returns the exit code."""
        while any(p.exitcode is None for p in processes):
            multiprocessing.connection.wait(
                [p.sentinel for p in processes if p.exitcode is None], timeout=1.0
            )
            failed = [(rank, p.exitcode) for rank, p in enumerate(processes) if p.exitcode not in (None, 0)]
            if failed and not stops:  # after a stop signal, exit codes like 130 are the plan
                # Those that failed since the last look (the others may have failed because of them).
                which = "; ".join(f"rank {rank} {_describe_exit(code)}" for rank, code in failed)
                print(f"ml: {which}; ending the other ranks", file=sys.stderr)
                self._end(processes)
                code = failed[0][1]
                return code if code > 0 else EXIT_FAILURE
        codes = [p.exitcode for p in processes]
        return next((c if c > 0 else EXIT_FAILURE for c in codes if c != 0), 0)

    def _end(self, processes: list[Any]) -> None:
        """SIGTERM to every process still running; SIGKILL to those left after ``kill_after_s``."""
        for p in processes:
            if p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):  # it has just ended
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.kill_after_s
        for rank, p in enumerate(processes):
            p.join(max(deadline - time.monotonic(), 0.0))
            if p.exitcode is None:
                grace = self.config.kill_after_s
                logger.warning("Rank %d did not end within %.0f s of SIGTERM: killing it", rank, grace)
                p.kill()
                p.join()
