"""``ml`` commands for a fraction of their start-up cost: each runs in its own process, forked from
one that has already imported torch and ml (a zygote, one per test process, started on first use).

An ``ml train`` process spends about 2.4 of its 2.5 CPU-seconds importing torch and
``torch._dynamo`` (which torch's optimizers import), and the suite starts a few hundred of them on
two cores. Here one interpreter imports what the ``ml`` console script imports, in its order
(:mod:`ml.entry` first, which listens for signals and slows the collector), freezes those objects
for the collector, and runs nothing else. Each command is a child forked from it that takes the
command's arguments, environment (``PYTHONPATH``'s folders put on ``sys.path`` as at start-up),
working directory and output files, reseeds torch's and NumPy's global generators from fresh
entropy (as a new interpreter starts them), and exits through :func:`ml.entry.main` as the script
does. Its exit code, stdout, stderr and files on disk are the command's own; the zygote itself is
never changed by one, and a command dies with it (a test stopped mid-batch leaves no orphan).

What a forked command cannot show, and which tests therefore start the real script:

- the start-up itself: a signal during it, the collector while importing, what a fresh interpreter
  imports (``tests/test_import.py``), settings read once at start-up (``PYTHONUNBUFFERED``,
  ``PYTHONSAFEPATH`` and the other interpreter flags, ``OMP_NUM_THREADS`` when the OpenMP runtime
  loads, malloc's environment);
- a process the test signals, kills or talks to while it runs (those need its pid at once);
- a run resumed in another process, compared with one that was not: forked commands share the
  zygote's string-hash seed, where two real processes differ, so a resume that depends on set
  order would pass here.

Use :func:`run_ml` (one command, like ``subprocess.run``) or :func:`run_forked` (a batch, side by
side). Callers in several threads take turns: one batch runs at a time. The zygote is this file
run as a script; not a test module.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import importlib
import importlib.machinery
import json
import multiprocessing.process
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "ml"  # the console script; the children's sys.argv[0]
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Command:
    """``ml ARGS`` with this environment, in ``cwd`` (None: the caller's), killed after ``timeout_s``."""

    args: list[str]
    env: dict[str, str]
    cwd: str | None = None
    timeout_s: float = 120.0


def run_ml(
    args: Sequence[str], env: dict[str, str], cwd: str | Path | None = None, timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """``ml ARGS`` to completion, as ``subprocess.run(..., capture_output=True, text=True)`` runs it."""
    return run_forked([Command([str(a) for a in args], env, None if cwd is None else str(cwd), timeout_s)])[0]


def run_forked(commands: Sequence[Command], parallel: int = 1) -> list[subprocess.CompletedProcess[str]]:
    """Runs every command, ``parallel`` at a time, each forked from the zygote; returns their results
    in order. A command past its timeout is killed, and then, once the batch has ended,
    ``subprocess.TimeoutExpired`` is raised for the first such command, as ``subprocess.run`` does."""
    with tempfile.TemporaryDirectory(prefix="forked_ml_") as folder:
        work = Path(folder)
        cwd = os.getcwd()
        (work / "commands.json").write_text(json.dumps([asdict(c) | {"cwd": c.cwd or cwd} for c in commands]))
        with _ONE_BATCH_AT_A_TIME:  # callers in threads take turns
            _zygote().run(work, parallel, budget_s=sum(c.timeout_s for c in commands) + 60)
        codes = json.loads((work / "codes.json").read_text())
        results = []
        for number, (command, code) in enumerate(zip(commands, codes, strict=True)):
            out = (work / f"{number}.out").read_text(errors="replace")
            err = (work / f"{number}.err").read_text(errors="replace")
            argv = [str(SCRIPT), *command.args]
            if code is None:
                raise subprocess.TimeoutExpired(argv, command.timeout_s, output=out, stderr=err)
            results.append(subprocess.CompletedProcess(argv, code, out, err))
        return results


class _Zygote:
    """This file run as a script: it imports, then forks each batch of commands it is sent (the path
    of a folder holding ``commands.json``, on a line of its stdin) and answers ``done FOLDER`` once
    that folder's ``codes.json`` is written. It ends when its stdin closes (this process's exit)."""

    def __init__(self) -> None:
        # The caller's PYTHONPATH too: the ml it selects (a checkout's) is the one imported. Not
        # the ML_ variables of the test that happens to start it: each child has its command's own.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ML_")}
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (read when it fails; closed with this process)
        self._process = subprocess.Popen(
            [sys.executable, __file__],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def alive(self) -> bool:
        return self._process.poll() is None

    def run(self, work: Path, parallel: int, budget_s: float) -> None:
        assert self._process.stdin is not None and self._process.stdout is not None
        answer = ""
        try:
            self._process.stdin.write(f"{parallel} {work}\n")
            self._process.stdin.flush()
            ready, _, _ = select.select([self._process.stdout], [], [], budget_s)
            answer = self._process.stdout.readline() if ready else ""
        finally:
            if answer != f"done {work}\n":  # failed, or interrupted: the next batch needs a new one
                self._process.kill()
                self._process.wait()
        if answer != f"done {work}\n":
            self._log.seek(0)
            raise AssertionError(f"the zygote failed:\n{self._log.read()[-3000:].decode(errors='replace')}")

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


_ZYGOTE: _Zygote | None = None
_ONE_BATCH_AT_A_TIME = threading.Lock()


def _zygote() -> _Zygote:
    global _ZYGOTE
    if _ZYGOTE is None or not _ZYGOTE.alive():
        _ZYGOTE = _Zygote()
        atexit.register(_ZYGOTE.close)
    return _ZYGOTE


_ZYGOTE_PYTHON_PATH: list[str] = []  # in the zygote: its own PYTHONPATH's folders


def _python_path(env: dict[str, str]) -> list[str]:
    """``PYTHONPATH``'s folders as the interpreter puts them on ``sys.path`` at start-up (an empty
    entry is the current directory)."""
    value = env.get("PYTHONPATH", "")
    return [os.path.abspath(p) for p in value.split(os.pathsep)] if value else []


def _child(work: Path, number: int, command: dict) -> None:
    """Becomes the command: its folder, environment, output files, arguments and random state; then
    ml's main."""
    import ml.entry

    # Ends with the zygote (a test stopped mid-batch, a batch past its budget): no orphan trains on.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    for fd, suffix in ((1, "out"), (2, "err")):
        out = os.open(work / f"{number}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    os.chdir(command["cwd"])
    os.environ.clear()
    os.environ.update(command["env"])
    # At start-up PYTHONPATH's folders come right after the script's own folder: the command's,
    # in place of the zygote's.
    sys.path[1 : 1 + len(_ZYGOTE_PYTHON_PATH)] = _python_path(command["env"])
    # The command's own start-up must find the ml imported here, or it would test another one.
    spec = importlib.machinery.PathFinder.find_spec("ml", sys.path)
    if spec is not None and spec.origin != ml.__file__:
        raise SystemExit(f"forked_ml: the command would import ml from {spec.origin}, not {ml.__file__}")
    # A new process's generators start from fresh entropy, not from the zygote's state (Python's
    # random module reseeds itself after a fork; torch's and NumPy's do not).
    sys.modules["torch"].seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    sys.argv = [str(SCRIPT), *command["args"]]
    # What a process it spawns (the mp launcher's ranks) runs first, as for the script: the script
    # as its main module, relative paths from the command's folder.
    sys.modules["__main__"].__file__ = str(SCRIPT)
    multiprocessing.process.ORIGINAL_DIR = os.getcwd()
    # Unwinds out of the zygote's loop: the interpreter's own exit, atexit hooks and all.
    sys.exit(ml.entry.main())


def _serve_batch(work: Path, parallel: int) -> None:
    commands = json.loads((work / "commands.json").read_text())
    codes: list[int | None] = [None] * len(commands)  # None: killed at its deadline
    waiting = list(range(len(commands)))
    running: dict[int, tuple[int, float]] = {}  # pid -> (command number, deadline)
    timed_out: set[int] = set()
    while waiting or running:
        while waiting and len(running) < parallel:
            number = waiting.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(work, number, commands[number])
            running[pid] = (number, time.monotonic() + commands[number]["timeout_s"])
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            number, _ = running.pop(pid)
            if pid in timed_out:
                timed_out.discard(pid)  # its code stays None (and its pid may be given again)
            else:
                codes[number] = os.waitstatus_to_exitcode(status)
            continue
        for pid, (_, deadline) in running.items():
            if time.monotonic() > deadline and pid not in timed_out:
                os.kill(pid, signal.SIGKILL)
                timed_out.add(pid)
        time.sleep(0.01)
    (work / "codes.json").write_text(json.dumps(codes))


if __name__ == "__main__":
    sys.path[0] = str(SCRIPT.parent)  # as for the console script, not this file's folder
    _ZYGOTE_PYTHON_PATH = _python_path(dict(os.environ))
    assert sys.path[1 : 1 + len(_ZYGOTE_PYTHON_PATH)] == _ZYGOTE_PYTHON_PATH, sys.path
    # In the script's order: ml.entry first (it listens for signals and slows the collector), then
    # the command, torch, what torch's optimizers import when the first one is made, and the
    # built-in components' modules.
    for module in ("ml.entry", "ml.cli", "torch", "torch._dynamo", "ml.core.registry"):
        importlib.import_module(module)
    for kind in sys.modules["ml.core.registry"].KINDS:
        sys.modules["ml.core.registry"].registered_names(kind)
    gc.collect()
    gc.freeze()  # no child's collection walks (and so copies) the imported objects
    for line in sys.stdin:  # "PARALLEL FOLDER", until the test process closes our stdin
        parallel, folder = line.rstrip("\n").split(" ", 1)
        _serve_batch(Path(folder), int(parallel))
        print("done", folder, flush=True)
