"""Several ``ml train`` processes on one experiment at once: real subprocesses, a real RUN_DIR.

- Many fresh runs of one experiment started together each get their own ``run_<N>`` folder.
- A run is trained by one process at a time: a second process continuing it while the first is
  alive is refused with one line naming the holder (pid and host) and changes nothing on disk; of
  several processes released at the same instant exactly one wins.
- A lock left by a process that died on this host is reported and taken over; a lock naming a
  process on another host is never taken over (its liveness cannot be checked from here).

The runs train ``SumSignTask`` of ``tests/e2e/test_cli.py`` (no data set to load). Where processes
must start together, each is held in a shell until one write to a FIFO lets all of them ``exec ml``
at once (:class:`StartLine`). Where they must reach the run folder at the same instant, their
launcher section names ``ml_race_gate``, a module that holds each process at import (every other
component already imported, just before the components are built and the folder claimed) until
the test creates the gate file.
"""

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ml.run.checkpoints import newest_checkpoint
from ml.run.layout import RunDir
from tests.e2e.test_cli import ML, TIMEOUT_S, Files, _env, files, ml
from tests.reliability.test_hostile_input import one_error_line, snapshot, snapshot_diff

__all__ = ["files"]

# 8 racers by default; `make reliability` sets ML_RELIABILITY_RACERS=64 (`make test` skips the race).
NUM_RACERS = int(os.environ.get("ML_RELIABILITY_RACERS", "") or 8)
BASE_ARGS = ("task.threshold=0",)  # USER_CONFIG leaves task.threshold required
FAST = ("task.max_steps=1", "trainer.valid_at_end=false", "trainer.test_at_end=false", "logger=[]")
SLOW_STEP = "task.step_sleep_s=0.02"  # a continuation can then be caught while it trains

GATE_MODULE = '''\
"""Holds the importing process until $ML_RACE_GATE exists; re-exports the `single` launcher."""

import os
import time
from pathlib import Path

from ml.launchers.single import SingleLauncher

__all__ = ["SingleLauncher"]

_gate = Path(os.environ["ML_RACE_GATE"])
(_gate.parent / f"ready.{os.getpid()}").touch()
_deadline = time.monotonic() + 900
while not _gate.exists():
    if time.monotonic() > _deadline:
        raise SystemExit("ml_race_gate: the gate was never opened")
    time.sleep(0.02)
(_gate.parent / f"released.{os.getpid()}").write_text(repr(time.time()))
'''
# The launcher section is the last one composed (after every other component is imported) and
# `ml train` does not use it: the gate holds each process right before it builds and claims.
GATED = "launcher.name=ml_race_gate:SingleLauncher"


@dataclass(frozen=True)
class Gate:
    """The gate module's folder and the gate file; :meth:`env` runs ``ml`` through it."""

    lib: Path
    folder: Path

    @property
    def path(self) -> Path:
        return self.folder / "open"

    def env(self, files: Files, run_dir: Path) -> dict[str, str]:
        env = _env(files, run_dir)
        env["PYTHONPATH"] = os.pathsep.join([str(self.lib), env["PYTHONPATH"]])
        env["ML_RACE_GATE"] = str(self.path)
        return env

    def ready(self) -> int:
        return len(list(self.folder.glob("ready.*")))

    def release_times(self) -> list[float]:
        return [float(p.read_text()) for p in self.folder.glob("released.*")]


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    lib = tmp_path / "gate_lib"
    lib.mkdir()
    (lib / "ml_race_gate.py").write_text(GATE_MODULE)
    folder = tmp_path / "gate"
    folder.mkdir()
    return Gate(lib, folder)


@dataclass
class Proc:
    """A running ``ml`` process whose output goes to files (no pipe can fill up and block it)."""

    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        return self.popen.wait(timeout=timeout)


# Marks itself held ($1.held.<pid>), reads one line from the FIFO $2, prints the time as the
# first line of its stdout and becomes `ml` (exec: the pid stays the same); after the hold there is
# no fork and no file to create.
# `ml` starts at a lower priority, so the processes already importing torch do not delay the
# exec of the others; the test restores the priority once all have started.
HOLD_SCRIPT = (
    ': > "$1.held.$$"; read -r _ < "$2"; printf "%s\\n" "$EPOCHREALTIME"; shift 2; exec nice -n 10 "$@"'
)


@dataclass(frozen=True)
class StartLine:
    """Holds spawned processes before they exec ``ml``; :meth:`release` lets them all go at once."""

    folder: Path

    @property
    def fifo(self) -> Path:
        return self.folder / "go"

    def held(self) -> int:
        return len(list(self.folder.glob("p.held.*")))

    def prefix(self) -> list[str]:
        return ["bash", "-c", HOLD_SCRIPT, "bash", str(self.folder / "p"), str(self.fifo)]

    def release(self, procs: list[Proc]) -> list[float]:
        """Releases every held process (one line each); returns the times they exec'd ``ml``."""
        fd = os.open(self.fifo, os.O_WRONLY)
        try:
            os.write(fd, b"\n" * len(procs))
            wait_until("every process execs ml", lambda: len(_exec_times(procs)) == len(procs), procs, 120)
        finally:
            os.close(fd)
        for proc in procs:  # back to the normal priority (as root; otherwise they stay niced)
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, proc.pid, 0)
        return _exec_times(procs)


def _exec_times(procs: list[Proc]) -> list[float]:
    """The times held processes printed (first stdout line) on their way to ``exec ml``."""
    times = []
    for proc in procs:
        first = proc.out.read_text().partition("\n")
        if first[1]:
            times.append(float(first[0]))
    return times


def start(args: list[str], env: dict[str, str], logs: Path, name: str, line: StartLine | None = None) -> Proc:
    """Starts ``ml ARGS`` with stdout and stderr going to ``logs/name.out`` and ``logs/name.err``;
    with a ``line``, held there until it is released."""
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    prefix = line.prefix() if line is not None else []
    with out.open("wb") as o, err.open("wb") as e:
        popen = subprocess.Popen([*prefix, *ML, *args], env=env, stdout=o, stderr=e)
    return Proc(popen, out, err)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Every process a test starts; whatever still runs at the end (a failed test) is killed."""
    started: list[Proc] = []
    yield started
    for proc in started:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGCONT)
            proc.popen.kill()
            proc.popen.wait()


def wait_until(what: str, condition: Callable[[], bool], procs: list[Proc], timeout: float) -> None:
    """Polls ``condition``; fails when the deadline passes or one of ``procs`` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            if proc.popen.poll() is not None:
                pytest.fail(
                    f"pid {proc.pid} exited {proc.popen.returncode} before {what}:\n{proc.stderr[-3000:]}"
                )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _train_lines(exp_dir: Path) -> int:
    metrics = exp_dir / "logs" / "metrics.jsonl"
    return metrics.read_text().count('"phase": "train"') if metrics.exists() else 0


def _ckpt_step(exp_dir: Path) -> int:
    link = exp_dir / "checkpoints" / "ckpt.pt"
    return int(os.readlink(link).split(".")[1])


def _finished_run(files: Files, run_dir: Path, *extra: str, gate: Gate | None = None) -> Path:
    """A finished 2-step run of USER_CONFIG (its steps sleep, so a continuation trains slowly)."""
    args = ["task.max_steps=2", SLOW_STEP, "trainer.checkpoint.save_every_n_steps=5", *extra]
    env = _env(files, run_dir) if gate is None else gate.env(files, run_dir)
    command = [*ML, "train", str(files.user), *BASE_ARGS, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return run_dir / "user" / "run_0"


# ---------------------------------------------------------------------------------------------
# Fresh runs


@pytest.mark.slow
def test_fresh_runs_started_together_get_distinct_folders(
    files: Files,
    gate: Gate,
    tmp_path: Path,
    procs: list[Proc],
    record_property: Callable[[str, object], None],
) -> None:
    """Proves that NUM_RACERS (64 in ``make reliability``) ``ml train`` processes of one experiment,
    started within one second (held before ``exec``, then let go together) and released again at the
    same instant right before they claim a folder, all exit 0 and end up in distinct ``run_<N>``
    folders (run_0..run_<NUM_RACERS - 1>),
    each holding its own process's config.yaml (told apart by task.seed) and a checkpoint, with no
    lock left behind."""
    run_dir = tmp_path / "runs"
    env = gate.env(files, run_dir)
    line = StartLine(tmp_path / "start_line")
    line.folder.mkdir()
    os.mkfifo(line.fifo)
    for i in range(NUM_RACERS):
        args = ["train", str(files.user), *BASE_ARGS, GATED, *FAST, f"task.seed={i}"]
        procs.append(start(args, env, tmp_path / "logs", f"racer_{i}", line))
    wait_until("every racer is spawned", lambda: line.held() == NUM_RACERS, procs, 120)
    begin = time.monotonic()
    exec_times = line.release(procs)
    spawn_spread = max(exec_times) - min(exec_times)
    assert spawn_spread < 1.0, f"the {NUM_RACERS} ml processes started over {spawn_spread:.2f} s"
    wait_until("every racer reaches the gate", lambda: gate.ready() == NUM_RACERS, procs, 900)
    gate.path.touch()
    released = time.monotonic()
    codes = [proc.wait(timeout=600) for proc in procs]
    end = time.monotonic()
    release_spread = max(gate.release_times()) - min(gate.release_times())
    record_property("wall_s", round(end - begin, 1))
    record_property("after_release_s", round(end - released, 1))
    print(
        f"\n{NUM_RACERS} racers: ml started within {spawn_spread:.2f} s, all at the gate after "
        f"{released - begin:.1f} s, released within {release_spread:.2f} s, all done {end - released:.1f} s "
        f"later ({end - begin:.1f} s in all)"
    )

    failures = [
        f"racer {i} (pid {p.pid}) exit {c}: {p.stderr[-2000:]}"
        for i, (p, c) in enumerate(zip(procs, codes, strict=True))
        if c != 0
    ]
    assert failures == []
    for proc in procs:
        assert "Traceback" not in proc.stderr and "error" not in proc.stderr.lower(), proc.stderr

    exp_root = run_dir / "user"
    assert sorted(p.name for p in exp_root.iterdir()) == sorted(f"run_{n}" for n in range(NUM_RACERS))
    claimed: dict[Path, int] = {}
    for i, proc in enumerate(procs):
        reported = [
            line.split("ml: run directory", 1)[1].strip()
            for line in proc.stderr.splitlines()
            if line.startswith("ml: run directory")
        ]
        assert len(reported) == 1, proc.stderr
        exp_dir = Path(reported[0])
        assert exp_dir not in claimed, f"racers {claimed[exp_dir]} and {i} both trained in {exp_dir}"
        claimed[exp_dir] = i
    for exp_dir, i in claimed.items():
        config = yaml.safe_load((exp_dir / "config.yaml").read_text())
        assert config["task"]["seed"] == i, f"{exp_dir}/config.yaml is not racer {i}'s"
        assert Path(config["trainer"]["exp_dir"]) == exp_dir
        assert os.readlink(exp_dir / "checkpoints" / "ckpt.pt") == "ckpt.1.pt"
        assert (exp_dir / "checkpoints" / "ckpt.1.pt").stat().st_size > 0
        assert not (exp_dir / ".lock_running").exists()
    assert {p.parent for p in claimed} == {exp_root}


# ---------------------------------------------------------------------------------------------
# Continuing one run twice


@pytest.mark.slow
def test_a_second_continuation_of_a_live_run_is_refused_and_changes_nothing(
    files: Files, tmp_path: Path, procs: list[Proc]
) -> None:
    """Proves that while one process continues a run, a second ``ml train <exp_dir>/config.yaml``
    exits 2 with exactly one stderr line naming the live pid and host of the first, and leaves
    every file of the run (names, sizes, sha256) as it was; the first then finishes normally."""
    run_dir = tmp_path / "runs"
    exp_dir = _finished_run(files, run_dir)
    args = ["train", str(exp_dir / "config.yaml"), "task.max_steps=100000"]
    first = start(args, _env(files, run_dir), tmp_path / "logs", "first")
    procs.append(first)
    steps_before = _train_lines(exp_dir)
    wait_until(
        "the first continuation trains", lambda: _train_lines(exp_dir) >= steps_before + 3, [first], 120
    )

    first.popen.send_signal(signal.SIGSTOP)  # its logs and checkpoints stop growing
    try:
        before = snapshot(run_dir)
        second = ml(files, *args, run_dir=run_dir)
        after = snapshot(run_dir)
    finally:
        first.popen.send_signal(signal.SIGCONT)

    line = one_error_line(second)
    assert f"pid {first.pid} on {socket.gethostname()}" in line, line
    assert "already being trained" in line
    assert snapshot_diff(before, after) == []

    first.popen.send_signal(signal.SIGTERM)
    assert first.wait() == 0, first.stderr[-3000:]
    assert not (exp_dir / ".lock_running").exists()


@pytest.mark.slow
def test_of_continuations_released_together_exactly_one_trains(
    files: Files, gate: Gate, tmp_path: Path, procs: list[Proc]
) -> None:
    """Proves that of 4 continuations of one run released at the same instant right before they
    take the run's lock, exactly one trains and the other 3 exit 2 with one line naming the
    winner's pid; the winner then stops cleanly on SIGTERM."""
    run_dir = tmp_path / "runs"
    gate.path.touch()  # open while the run is made, so that its config names the gate
    exp_dir = _finished_run(files, run_dir, GATED, gate=gate)
    gate.path.unlink()
    for proc_file in gate.folder.iterdir():
        proc_file.unlink()

    env = gate.env(files, run_dir)
    args = ["train", str(exp_dir / "config.yaml"), "task.max_steps=100000"]
    racers = [start(args, env, tmp_path / "logs", f"continue_{i}") for i in range(4)]
    procs.extend(racers)
    wait_until("every continuation reaches the gate", lambda: gate.ready() == len(racers), racers, 300)
    gate.path.touch()

    deadline = time.monotonic() + 300
    while sum(p.popen.poll() is not None for p in racers) < len(racers) - 1:
        assert time.monotonic() < deadline, [p.stderr[-500:] for p in racers]
        time.sleep(0.1)
    time.sleep(1.0)  # a second winner would have had time to start training too
    running = [p for p in racers if p.popen.poll() is None]
    assert len(running) == 1, [(p.pid, p.popen.poll(), p.stderr[-500:]) for p in racers]
    winner = running[0]
    for loser in racers:
        if loser is winner:
            continue
        result = subprocess.CompletedProcess(
            loser.popen.args, loser.wait(), loser.out.read_text(), loser.stderr
        )
        line = one_error_line(result)
        assert f"pid {winner.pid} on {socket.gethostname()}" in line, line
    winner.popen.send_signal(signal.SIGTERM)
    assert winner.wait() == 0, winner.stderr[-3000:]
    assert not (exp_dir / ".lock_running").exists()


# ---------------------------------------------------------------------------------------------
# Locks left behind


@pytest.mark.slow
def test_a_dead_processs_lock_is_reported_and_taken_over(
    files: Files, tmp_path: Path, procs: list[Proc]
) -> None:
    """Proves that after ``kill -9`` of a training process, continuing the run prints one warning
    naming the dead pid, takes the lock over, resumes from the last checkpoint, finishes (exit 0)
    and removes the lock."""
    run_dir = tmp_path / "runs"
    args = [*BASE_ARGS, "task.max_steps=100000", SLOW_STEP, "trainer.checkpoint.save_every_n_steps=3"]
    victim = start(["train", str(files.user), *args], _env(files, run_dir), tmp_path / "logs", "victim")
    procs.append(victim)
    exp_dir = run_dir / "user" / "run_0"
    ckpt = exp_dir / "checkpoints" / "ckpt.pt"
    wait_until("a checkpoint", lambda: ckpt.is_symlink() and _train_lines(exp_dir) >= 4, [victim], 120)
    victim.popen.kill()
    victim.wait()
    lock = (exp_dir / ".lock_running").read_text()
    assert f"pid: {victim.pid}\n" in lock  # the stale lock is really there

    # The link's target, or a newer checkpoint the kill left unlinked (it landed between writing
    # one and swapping the link): resume takes the newest complete one either way.
    newest = newest_checkpoint(RunDir(exp_dir))
    assert newest is not None and newest.step is not None
    step = newest.step
    result = ml(files, "train", exp_dir / "config.yaml", f"task.max_steps={step + 3}", run_dir=run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    naming = [line for line in result.stderr.splitlines() if re.search(rf"\b{victim.pid}\b", line)]
    assert len(naming) == 1, result.stderr
    assert naming[0].startswith("[W "), naming[0]  # a warning
    assert "lock" in naming[0], naming[0]
    assert f"Resumed from {newest.path}" in result.stderr
    assert _ckpt_step(exp_dir) == step + 3
    assert not (exp_dir / ".lock_running").exists()


@pytest.mark.parametrize("owner", ["live", "dead"])
def test_a_lock_of_another_host_is_refused_with_one_line(files: Files, tmp_path: Path, owner: str) -> None:
    """Proves that a ``.lock_running`` naming a process on another host (alive or not: its pid means
    nothing here) makes ``ml train <exp_dir>/config.yaml`` exit 2 with one line naming that pid and
    host, leaving the run, lock included, untouched."""
    run_dir = tmp_path / "runs"
    exp_dir = _finished_run(files, run_dir)
    if owner == "live":
        pid = os.getpid()
    else:
        gone = subprocess.Popen(["true"])
        gone.wait()
        pid = gone.pid
    host = f"elsewhere-{socket.gethostname()}"
    (exp_dir / ".lock_running").write_text(f"pid: {pid}\nhost: {host}\ntime: 2026-01-01T00:00:00+00:00\n")
    before = snapshot(run_dir)
    result = ml(files, "train", exp_dir / "config.yaml", "task.max_steps=4", run_dir=run_dir)
    line = one_error_line(result)
    assert f"pid {pid} on {host}" in line, line
    assert snapshot_diff(before, snapshot(run_dir)) == []
