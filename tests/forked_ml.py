"""Many short ``ml`` commands for the start-up cost of one: each runs in its own process, forked from
one that has already imported torch and ml.

The bad-input cases (``tests/e2e/test_cli.py``, ``tests/reliability/test_hostile_input.py``) are
dozens of ``ml train`` commands that each stop within a fraction of a second of work, after 1.2 to
2.4 s of CPU importing torch (and ``torch._dynamo``, which torch's optimizers import): most of
the suite's time went into those imports. Here one interpreter imports what the ``ml`` console
script imports, in its order (:mod:`ml.entry` first, which listens for signals and slows the
collector), and nothing more runs in it; each command is then a child forked from it that takes the
command's arguments, environment (``PYTHONPATH``'s folders put on ``sys.path`` as at start-up),
working directory and output files, and exits through :func:`ml.entry.main` as the script does.
Its exit code, stdout, stderr and files on disk are the command's own.

What a forked command cannot show is the start-up itself (a signal during it, the collector while
importing, what a fresh interpreter imports): the tests of those start the real script. The
interpreter-wide settings read once at start-up (``PYTHONUNBUFFERED``, ``OMP_NUM_THREADS`` when the
OpenMP runtime loads) are the ones the tests use: unbuffered output, one thread.

Run as a script by :func:`run_forked`; not a test module.
"""

from __future__ import annotations

import gc
import importlib
import importlib.machinery
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "ml"  # the console script; the children's sys.argv[0]


@dataclass(frozen=True)
class Command:
    """``ml ARGS`` with this environment, in ``cwd`` (None: the caller's), killed after ``timeout_s``."""

    args: list[str]
    env: dict[str, str]
    cwd: str | None = None
    timeout_s: float = 120.0


def run_forked(commands: Sequence[Command], parallel: int = 2) -> list[subprocess.CompletedProcess[str]]:
    """Runs every command, ``parallel`` at a time, each in a child of one process that imported torch
    and ml once; returns their results in order. A command past its timeout is killed (SIGKILL):
    return code -9, and its stderr ends with a ``TIMEOUT after ... s`` line."""
    with tempfile.TemporaryDirectory(prefix="forked_ml_") as folder:
        work = Path(folder)
        cwd = os.getcwd()
        (work / "commands.json").write_text(json.dumps([asdict(c) | {"cwd": c.cwd or cwd} for c in commands]))
        # The caller's PYTHONPATH too: the ml it selects (a checkout's) is the one imported.
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        budget = sum(c.timeout_s for c in commands) + 60
        server = subprocess.run(
            [sys.executable, __file__, str(work), str(parallel)],
            env=env,
            capture_output=True,
            text=True,
            timeout=budget,
        )
        assert server.returncode == 0, f"the forking process failed:\n{server.stderr[-3000:]}"
        codes = json.loads((work / "codes.json").read_text())
        results = []
        for number, command in enumerate(commands):
            out = (work / f"{number}.out").read_text(errors="replace")
            err = (work / f"{number}.err").read_text(errors="replace")
            if codes[number] is None:
                err += f"\nTIMEOUT after {command.timeout_s} s\n"
            code = -signal.SIGKILL if codes[number] is None else codes[number]
            results.append(subprocess.CompletedProcess([str(SCRIPT), *command.args], code, out, err))
        return results


def _child(work: Path, number: int, command: dict) -> None:
    """Becomes the command: its folder, environment, output files and arguments; then ml's main."""
    import ml.entry

    os.chdir(command["cwd"])
    os.environ.clear()
    os.environ.update(command["env"])
    # At start-up PYTHONPATH's folders come right after the script's own folder.
    sys.path[1:1] = [p for p in command["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    # The command's own start-up must find the ml imported here, or it would test another one.
    spec = importlib.machinery.PathFinder.find_spec("ml", sys.path)
    if spec is not None and spec.origin != ml.__file__:
        raise SystemExit(f"forked_ml: the command would import ml from {spec.origin}, not {ml.__file__}")
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    for fd, suffix in ((1, "out"), (2, "err")):
        out = os.open(work / f"{number}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    sys.argv = [str(SCRIPT), *command["args"]]
    sys.exit(ml.entry.main())  # unwinds out of _serve: the interpreter's own exit, atexit hooks and all


def _serve(work: Path, parallel: int) -> None:
    commands = json.loads((work / "commands.json").read_text())
    codes: list[int | None] = [None] * len(commands)
    waiting = list(range(len(commands)))
    running: dict[int, tuple[int, float]] = {}  # pid -> (command number, deadline)
    while waiting or running:
        while waiting and len(running) < parallel:
            number = waiting.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(work, number, commands[number])
            running[pid] = (number, time.monotonic() + commands[number]["timeout_s"])
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            number, deadline = running.pop(pid)
            if time.monotonic() <= deadline:
                codes[number] = os.waitstatus_to_exitcode(status)
            continue
        for pid, (_, deadline) in running.items():
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)  # reaped above, its code left None: a timeout
        time.sleep(0.01)
    (work / "codes.json").write_text(json.dumps(codes))


if __name__ == "__main__":
    sys.path[0] = str(SCRIPT.parent)  # as for the console script, not this file's folder
    # In the script's order: ml.entry first (it listens for signals and slows the collector), then
    # the command, torch, what torch's optimizers import when the first one is made, and the
    # built-in components' modules.
    for module in ("ml.entry", "ml.cli", "torch", "torch._dynamo", "ml.core.registry"):
        importlib.import_module(module)
    for kind in sys.modules["ml.core.registry"].KINDS:
        sys.modules["ml.core.registry"].registered_names(kind)
    gc.collect()
    gc.freeze()  # no child's collection walks (and so copies) the imported objects
    _serve(Path(sys.argv[1]), int(sys.argv[2]))
