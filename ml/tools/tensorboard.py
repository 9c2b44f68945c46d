"""Defines ``ml tensorboard EXP_DIR [EXP_DIR ...] [--port N]``: TensorBoard on a run's logs.

Each argument is a run folder (its ``logs/tensorboard``, or the log folder its config names) or an
experiment folder holding ``run_<N>`` folders (each of its runs with TensorBoard logs). TensorBoard
runs as a child process (``python -m tensorboard.main``), bound to 127.0.0.1 only, on a free port
the system picks (``--port 0``, the default; TensorBoard binds it itself, so no other process can
take it in between) or the one given. The runs are shown side by side, each named after its
folder (``--logdir_spec digits/run_0:PATH,...``; TensorBoard's runs are then ``digits/run_0/train``...).

Once TensorBoard serves, ``TensorBoard: http://127.0.0.1:PORT/`` is printed and the command waits;
Ctrl-C or SIGTERM stops TensorBoard (and anything it started) and exits 0. TensorBoard ending on
its own is a failure (exit 1). Without the tensorboard package, the command says how to install it.
"""

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import IO

from ml.run.layout import RunDir, run_number
from ml.tools import tool_parser

HOST = "127.0.0.1"
_SERVING = re.compile(r"^TensorBoard \S+ at (http://\S+?:(\d+)/?)")
_STOP_TIMEOUT_S = 10.0
_RECENT_LINES = 20


def _tensorboard_dir(run: Path) -> Path | None:
    folder = RunDir.of(run).logs / "tensorboard"
    return folder if folder.is_dir() else None


def find_logdirs(args: list[str]) -> list[tuple[str, Path]]:
    """``(name, tensorboard folder)`` of each run the arguments name, in order, without repeats.

    A run is named after its folder and its experiment's (``digits/run_0``), with more of its path
    when two runs would otherwise share a name (``a/digits/run_0``, ``b/digits/run_0``).

    Raises:
        BadInput: An argument is no folder, or holds no TensorBoard logs (nor runs with some).
    """
    from ml.errors import BadInput

    runs: dict[Path, Path] = {}  # run folder -> its tensorboard folder
    for arg in args:
        path = Path(arg).expanduser()
        if not path.is_dir():
            raise BadInput(f"no such run folder: {arg}")
        path = path.resolve()
        own = _tensorboard_dir(path)
        found = [(path, own)] if own is not None else []
        if not found:
            for run in sorted((p for p in path.glob("run_*") if p.is_dir()), key=run_number):
                folder = _tensorboard_dir(run)
                if folder is not None:
                    found.append((run, folder))
        if not found:
            raise BadInput(
                f"no TensorBoard logs in {arg}: no logs/tensorboard/ folder (is {{name: tensorboard}} "
                "in the run's logger list?), nor runs (run_<N>) that have one"
            )
        for run, folder in found:
            if "," in str(folder):
                raise BadInput(f"TensorBoard cannot read a log folder whose path has a comma: {folder}")
            runs.setdefault(run, folder)
    return list(zip(_names(list(runs)), runs.values(), strict=True))


def _names(runs: list[Path]) -> list[str]:
    """The shortest path endings (two parts at least) that tell the runs apart, as run names."""
    names = [str(run) for run in runs]
    for depth in range(2, max(len(run.parts) for run in runs) + 1):
        names = ["/".join(run.parts[-depth:]).lstrip("/") for run in runs]
        if len(set(names)) == len(names):
            break
    # `:` ends a name and `,` an entry in --logdir_spec; a leading `/` would make it read as a path.
    return [re.sub(r"[:,]", "_", name).lstrip("/") or "run" for name in names]


def tensorboard_command(logdirs: list[tuple[str, Path]], port: int) -> list[str]:
    """The command line that starts TensorBoard on these folders, bound to 127.0.0.1."""
    spec = ",".join(f"{name}:{folder}" for name, folder in logdirs)
    server = [sys.executable, "-m", "tensorboard.main", "--host", HOST, "--port", str(port)]
    return [*server, "--logdir_spec", spec]


def _check_installed() -> None:
    import importlib.util

    from ml.errors import BadInput

    try:
        spec = importlib.util.find_spec("tensorboard")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise BadInput(
            f"TensorBoard is not installed: run `{Path(sys.executable).name} -m pip install tensorboard` "
            "(or `pip install 'ml-trainer[tensorboard]'`)"
        )


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it if ``ml`` dies (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Server:
    """The TensorBoard child process; a thread reads its output, spots the URL and passes the rest on."""

    def __init__(self, command: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=env,
            start_new_session=True,  # its own process group: stopped as a whole, not hit by our Ctrl-C
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.url: str | None = None
        self.port: int | None = None
        self.recent: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            match = _SERVING.match(line) if self.url is None else None
            if match is not None:
                self.url, self.port = match.group(1).rstrip("/") + "/", int(match.group(2))
                continue
            self.recent = [*self.recent[-_RECENT_LINES + 1 :], line.rstrip()]
            sys.stderr.write(line)  # TensorBoard's own warnings and errors stay visible
            sys.stderr.flush()

    def last_words(self) -> str:
        lines = [line for line in self.recent if line.strip()]
        return lines[-1].strip() if lines else "no output"

    def stop(self) -> int | None:
        """Stops TensorBoard and what it started (SIGTERM, then SIGKILL); returns its exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        else:  # it ended on its own; what it started may still be there
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self._reader.join(timeout=_STOP_TIMEOUT_S)
        return self.process.returncode


@contextlib.contextmanager
def _stop_requests() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM (or a SIGTERM that arrived while ``ml`` was starting)."""
    from ml.utils.signals import take_early_signal

    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if take_early_signal() is not None:
            stop.set()
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "tensorboard",
        "Start TensorBoard on runs' logs, on 127.0.0.1; Ctrl-C or SIGTERM stops it.",
    )
    parser.add_argument(
        "exp_dirs", metavar="EXP_DIR", nargs="+", help="a run folder, or an experiment folder holding run_<N>"
    )
    parser.add_argument(
        "--port", type=int, default=0, help="the port (default 0: a free one the system picks)"
    )
    return parser


def main(argv: list[str]) -> int:
    """``ml tensorboard``: serves until stopped; 0 when stopped by a signal, 1 when TensorBoard fails."""
    from ml.errors import BadInput

    args = _parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise BadInput(f"--port {args.port}: give a port from 1 to 65535, or 0 for a free one")
    logdirs = find_logdirs(args.exp_dirs)
    _check_installed()
    with _stop_requests() as stop:
        server = _Server(tensorboard_command(logdirs, args.port))
        announced = False
        try:
            while not stop.is_set() and server.process.poll() is None:
                if server.url is not None and not announced:
                    announced = True
                    for name, folder in logdirs:
                        print(f"ml: {name}: {folder}", file=sys.stderr)
                    print(f"TensorBoard: {server.url}", flush=True)
                stop.wait(0.1)
        finally:
            code = server.stop()
    if stop.is_set():
        return 0
    what = "stopped" if server.url is not None else "did not start"
    print(f"ml: error: TensorBoard {what} (exit code {code}): {server.last_words()}", file=sys.stderr)
    return 1
