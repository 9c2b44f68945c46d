"""End-to-end tests of stopping and resuming: real ``ml train`` subprocesses, real signals, real files.

A run stopped by SIGTERM (or SIGINT) at a random mid-epoch step and continued with
``ml train <exp_dir>/config.yaml`` must end with exactly the model, optimizer and generator tensors
of a run that never stopped, after the same sequence of samples, with its counters continuing and
no metric logged twice. SIGUSR1 checkpoints and exits. A run killed with SIGKILL at a random moment
(perhaps while saving) is continued from its last complete checkpoint, through a ``ckpt.pt`` that
always names a loadable file, and ends the same way as the uninterrupted run.

The task and model live in ``resume_task.py`` (this folder goes on the subprocesses' PYTHONPATH).
Each training batch appends its sample indices to ``indices.txt``; the tests poll that file to
interrupt at a chosen step.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.e2e.resume_task import read_indices
from tests.same import assert_same

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 120

NUM_SAMPLES = 48
BATCH_SIZE = 4
BATCHES_PER_STEP = 2
STEPS_PER_EPOCH = NUM_SAMPLES // (BATCH_SIZE * BATCHES_PER_STEP)  # 6
MAX_STEPS = 16  # two full epochs and part of a third

CONFIG = f"""\
# ml train resume.yaml task.indices_file=...
model: {{name: "resume_task:DropoutBNModel", hidden: 16, dropout: 0.2}}
task:
  name: "resume_task:IndexedTask"
  num_samples: {NUM_SAMPLES}
  max_steps: {MAX_STEPS}
  step_sleep_s: 0.03
  train_dl: {{batch_size: {BATCH_SIZE}, num_workers: 2, shuffle: true, drop_last: true}}
  valid_dl: {{batch_size: 24}}
  test_dl: {{batch_size: 24}}
optimizer: {{name: adamw, lr: 1e-2}}
lr_scheduler: {{name: cosine, warmup_steps: 3}}
trainer:
  name: sl
  exp_name: resume
  batches_per_step: {BATCHES_PER_STEP}
  deterministic: true
  valid_every_n_steps: 5
  checkpoint: {{save_every_n_steps: 1000}}
logger:
  - {{name: jsonl, write_every_n_steps: 1}}
"""

# ---------------------------------------------------------------------------------------------
# Running ``ml train``


@dataclass
class Run:
    """One experiment: its RUN_DIR, the files the test reads, and the process training it now."""

    run_dir: Path
    overrides: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None
    segments: int = 0

    @property
    def exp_dir(self) -> Path:
        return self.run_dir / "resume" / "run_0"

    @property
    def indices_file(self) -> Path:
        return self.exp_dir / "indices.txt"

    @property
    def checkpoints(self) -> Path:
        return self.exp_dir / "checkpoints"

    @property
    def stderr_path(self) -> Path:
        return self.run_dir / f"stderr.{self.segments}.txt"

    def start(self, config: Path) -> subprocess.Popen:
        """Starts the run (the first time) or continues it from its ``config.yaml`` (after that).

        Output goes to files, not pipes: DataLoader workers orphaned by a SIGKILL keep a pipe open
        for seconds.
        """
        self.segments += 1
        env = dict(os.environ)
        env.pop("ML_EXP_NAME", None)
        env["RUN_DIR"] = str(self.run_dir)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
        env["OMP_NUM_THREADS"] = "1"  # tiny model; several processes share few cores
        env["PYTHONUNBUFFERED"] = "1"
        if self.segments == 1:
            args = [str(config), f"task.indices_file={self.indices_file}", *self.overrides]
        else:
            args = [str(self.exp_dir / "config.yaml")]  # how a user continues a run
        with (
            (self.run_dir / f"stdout.{self.segments}.txt").open("w") as out,
            self.stderr_path.open("w") as err,
        ):
            # A session of its own: a signal may go to its whole process group, as torchrun's does.
            self.proc = subprocess.Popen(
                [*ML, "train", *args], env=env, stdout=out, stderr=err, start_new_session=True
            )
        return self.proc

    def wait(self) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def finish(self, expected_code: int = 0) -> str:
        """Waits for the process; asserts its exit code; returns its stderr."""
        code = self.wait()
        stderr = self.stderr()
        assert code == expected_code, f"exit {code}\n{stderr}"
        return stderr

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def steps_reached(self) -> int:
        rows = read_indices(self.indices_file)
        return rows[-1][0] if rows else 0

    def wait_for(self, what: str, condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
        """Polls ``condition`` until it holds; fails if the process exits or time runs out first."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"the run exited ({self.proc.returncode}) before {what}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.005)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "resume.yaml"
    path.write_text(CONFIG)
    return path


class Reference:
    """The uninterrupted run (``num_workers=2``) that the interrupted runs are compared with."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._checked = False

    def finished(self) -> Run:
        """Waits for it to end (it trains in the background) and checks it reached ``MAX_STEPS``."""
        if not self._checked:
            self.run.finish()
            assert os.readlink(self.run.checkpoints / "ckpt.pt") == f"ckpt.{MAX_STEPS}.pt"
            self._checked = True
        return self.run


@pytest.fixture(scope="module")
def references(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Reference]]:
    """Uninterrupted runs by worker count, each started by the first test that asks for it."""
    started: dict[int, Reference] = {}
    yield started
    for ref in started.values():
        ref.run.kill()


def _reference(references: dict[int, Reference], config: Path, num_workers: int, root: Path) -> Reference:
    if num_workers not in references:
        (root / f"reference_{num_workers}").mkdir()
        run = Run(root / f"reference_{num_workers}", _workers(num_workers))
        run.start(config)
        references[num_workers] = Reference(run)
    return references[num_workers]


@pytest.fixture
def reference(
    references: dict[int, Reference], config: Path, tmp_path_factory: pytest.TempPathFactory
) -> Reference:
    """The uninterrupted run with the shared config (two workers)."""
    return _reference(references, config, 2, tmp_path_factory.getbasetemp())


def _workers(num_workers: int) -> tuple[str, ...]:
    return (f"task.train_dl.num_workers={num_workers}",)


# ---------------------------------------------------------------------------------------------
# What a run left behind


def _records(exp_dir: Path) -> list[dict]:
    lines = (exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _train_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r["phase"] == "train"]


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _ckpt_step(name: str) -> int:
    match = re.fullmatch(r"ckpt\.(\d+)\.pt", name)
    assert match, f"ckpt.pt points to {name!r}, not a complete checkpoint"
    return int(match.group(1))


def _comparable_metrics(records: list[dict]) -> dict[tuple[int, str], dict[str, float]]:
    """(step, phase) -> the metrics that do not depend on timing (a step redone after a kill -9 is
    logged twice; its last record counts)."""
    return {
        (r["step"], r["phase"]): {k: v for k, v in r["metrics"].items() if not k.endswith("_per_s")}
        for r in records
    }


def _assert_same_training(
    run: Run, ref: Run, indices: list[tuple[int, list[int]]], parts: tuple[str, ...]
) -> None:
    """``run`` ended exactly where the uninterrupted ``ref`` did, after the same samples."""
    assert indices == read_indices(ref.indices_file)
    assert len(indices) == MAX_STEPS * BATCHES_PER_STEP
    final, expected = _load(run.checkpoints / "ckpt.pt"), _load(ref.checkpoints / "ckpt.pt")
    for part in parts:
        assert_same(final[part], expected[part], part)
    state, ref_state = json.loads(final["state"]), json.loads(expected["state"])
    counters = ("num_steps", "num_epochs", "num_samples", "num_epoch_steps", "num_epoch_samples")
    assert {k: state[k] for k in counters} == {k: ref_state[k] for k in counters}
    assert state["num_steps"] == MAX_STEPS
    assert _comparable_metrics(_records(run.exp_dir)) == _comparable_metrics(_records(ref.exp_dir))


ALL_PARTS = ("model", "optim", "lr", "task", "rng", "sampler")


def _mid_epoch_step(rng: random.Random) -> int:
    """A random step from which the run stops mid-epoch even if it overshoots by two steps."""
    return rng.choice([s for s in range(2, MAX_STEPS - 2) if s % STEPS_PER_EPOCH in (1, 2, 3)])


def _stop_by_signal(
    run: Run, config: Path, sig: signal.Signals, expected_code: int, seed: str, group: bool = False
) -> int:
    """Starts ``run``, sends ``sig`` once step k (random, mid-epoch) began, to the process or to its
    whole process group (its data-loader workers too); returns the stop step."""
    k = _mid_epoch_step(random.Random(seed))
    run.start(config)
    run.wait_for(f"step {k}", lambda: run.steps_reached() >= k)
    assert run.proc is not None
    if group:
        os.killpg(run.proc.pid, sig)
    else:
        run.proc.send_signal(sig)
    stderr = run.finish(expected_code)
    assert "Traceback" not in stderr
    assert f"Stopping on {sig.name}" in stderr

    link = run.checkpoints / "ckpt.pt"
    stop = _ckpt_step(os.readlink(link))
    assert k <= stop <= k + 2, (k, stop)  # the step in progress finishes, then the run stops
    assert stop % STEPS_PER_EPOCH != 0  # mid-epoch
    assert run.steps_reached() == stop  # no batch of the next step was started
    # save_every_n_steps is large: the signal's checkpoint is the only one.
    assert sorted(p.name for p in run.checkpoints.iterdir()) == sorted([f"ckpt.{stop}.pt", "ckpt.pt"])
    assert json.loads(_load(link)["state"])["num_steps"] == stop
    assert not (run.exp_dir / ".lock_running").exists()
    records = _records(run.exp_dir)
    assert _train_steps(records) == list(range(1, stop + 1))
    assert "test" not in {r["phase"] for r in records}  # stopping is not finishing
    return stop


def _resume_to_the_end(run: Run, config: Path, stop: int) -> None:
    run.start(config)
    stderr = run.finish()
    assert "Traceback" not in stderr
    assert f"Resumed from {run.checkpoints / 'ckpt.pt'} at step {stop}" in stderr
    records = _records(run.exp_dir)
    assert _train_steps(records) == list(range(1, MAX_STEPS + 1))  # the counter continues
    keys = [(r["step"], r["phase"]) for r in records]
    assert len(keys) == len(set(keys)), "a (step, phase) was logged twice"
    assert [r["step"] for r in records if r["phase"] == "test"] == [MAX_STEPS]
    assert os.readlink(run.checkpoints / "ckpt.pt") == f"ckpt.{MAX_STEPS}.pt"
    assert not (run.exp_dir / ".lock_running").exists()


# ---------------------------------------------------------------------------------------------
# Stop by signal, resume, compare


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [2, 0])
def test_sigterm_mid_epoch_then_resume_is_bit_exact(
    num_workers: int,
    config: Path,
    references: dict[int, Reference],
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    # Both with random draws in __getitem__: in workers they are seeded per sample, in the main
    # process they come from the checkpointed generators.
    reference = _reference(references, config, num_workers, tmp_path_factory.getbasetemp())
    run = Run(tmp_path, _workers(num_workers))
    try:
        # To the process group, as torchrun and `timeout` send it: the workers get it too, and
        # torch's handler in a worker ended it (the run then failed without a checkpoint).
        stop = _stop_by_signal(run, config, signal.SIGTERM, 0, seed=f"sigterm-{num_workers}", group=True)
        _resume_to_the_end(run, config, stop)
    finally:
        run.kill()
    _assert_same_training(run, reference.finished(), read_indices(run.indices_file), ALL_PARTS)


@pytest.mark.slow
def test_sigint_checkpoints_exits_130_and_resumes(config: Path, reference: Reference, tmp_path: Path) -> None:
    run = Run(tmp_path)
    try:
        stop = _stop_by_signal(run, config, signal.SIGINT, 130, seed="sigint")
        _resume_to_the_end(run, config, stop)
    finally:
        run.kill()
    _assert_same_training(run, reference.finished(), read_indices(run.indices_file), ALL_PARTS)


@pytest.mark.slow
def test_sigusr1_checkpoints_and_exits_0(config: Path, tmp_path: Path) -> None:
    run = Run(tmp_path, _workers(0))
    try:
        _stop_by_signal(run, config, signal.SIGUSR1, 0, seed="sigusr1")
    finally:
        run.kill()


# ---------------------------------------------------------------------------------------------
# Kill -9, rerun


def _kill_at_a_random_step(run: Run, rng: random.Random) -> None:
    """Waits for a random step, then a random part of it (a step takes more than 60 ms)."""
    step = rng.randint(4, MAX_STEPS - 2)
    run.wait_for(f"step {step}", lambda: run.steps_reached() >= step)
    time.sleep(rng.uniform(0.0, 0.08))


def _wait_for_a_save(run: Run, rng: random.Random) -> None:
    """Waits until a checkpoint (after the first) is being written: its temp file exists."""
    del rng
    checkpoints = run.checkpoints
    run.wait_for("a save in progress", lambda: any(n.endswith(".tmp") for n in os.listdir(checkpoints)))


@pytest.mark.slow
@pytest.mark.parametrize("moment", [_kill_at_a_random_step, _wait_for_a_save], ids=["random", "while_saving"])
def test_kill_9_then_rerun_resumes_from_the_last_complete_checkpoint(
    moment: Callable[[Run, random.Random], None], config: Path, reference: Reference, tmp_path: Path
) -> None:
    # A checkpoint every 3 steps; a 16 MiB buffer in the task makes each save take tens of ms.
    run = Run(tmp_path, ("trainer.checkpoint.save_every_n_steps=3", "task.ballast_mb=16"))
    link = run.checkpoints / "ckpt.pt"
    try:
        run.start(config)
        run.wait_for("the first checkpoint", link.exists)
        moment(run, random.Random(f"kill-{moment.__name__}"))
        assert run.proc is not None
        killed_pid = run.proc.pid
        run.proc.send_signal(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL  # and reaped: its pid is gone, so its lock is stale

        reached = run.steps_reached()
        assert reached < MAX_STEPS
        indices_before = read_indices(run.indices_file)
        assert link.is_symlink()
        last = _ckpt_step(os.readlink(link))  # a complete checkpoint, never a temp file
        assert json.loads(_load(link)["state"])["num_steps"] == last  # loadable with weights_only
        assert last % 3 == 0 and 3 <= last <= reached
        assert f"pid: {killed_pid}" in (run.exp_dir / ".lock_running").read_text()  # left behind

        # Rerun: takes over the dead process's lock and resumes at the last complete checkpoint.
        run.start(config)
        stderr = run.finish()
        assert "Traceback" not in stderr
        assert f"Taking over the running lock of dead process {killed_pid}" in stderr
        assert f"Resumed from {link} at step {last}" in stderr
    finally:
        run.kill()

    assert _ckpt_step(os.readlink(link)) == MAX_STEPS
    _load(link)
    assert not (run.exp_dir / ".lock_running").exists()
    # A save cut short left a temp file; the resumed run removed it. The old checkpoint went too.
    names = {p.name for p in run.checkpoints.iterdir()}
    assert names == {f"ckpt.{MAX_STEPS}.pt", "ckpt.pt"}
    assert set(_train_steps(_records(run.exp_dir))) == set(range(1, MAX_STEPS + 1))

    # The steps after the checkpoint were done again, on the same samples as before the kill.
    rows = read_indices(run.indices_file)
    kept = [row for row in indices_before if row[0] <= last]
    lost, redone = indices_before[len(kept) :], rows[len(indices_before) :]
    assert redone[0][0] == last + 1
    assert redone[: len(lost)] == lost
    # The task holds the ballast buffer, which the reference's has not: compare everything else.
    parts = ("model", "optim", "lr", "rng", "sampler")
    _assert_same_training(run, reference.finished(), kept + redone, parts)


@pytest.mark.slow
def test_a_second_sigint_while_saving_stops_at_once_without_a_partial_file(
    config: Path, tmp_path: Path
) -> None:
    run = Run(tmp_path, ("trainer.checkpoint.save_every_n_steps=3", "task.ballast_mb=32"))
    link = run.checkpoints / "ckpt.pt"
    try:
        run.start(config)
        run.wait_for("the first checkpoint", link.exists)
        _wait_for_a_save(run, random.Random(0))  # the periodic one at step 6, which takes ~70 ms
        assert run.proc is not None
        run.proc.send_signal(signal.SIGINT)
        time.sleep(0.02)  # two SIGINTs pending at once count as one: then it stops the normal way
        run.proc.send_signal(signal.SIGINT)
        code = run.wait()
    finally:
        run.kill()
    stderr = run.stderr()
    assert not [n for n in os.listdir(run.checkpoints) if n.endswith(".tmp")]  # the partial file is gone
    assert _ckpt_step(os.readlink(link)) in (3, 6)  # the save was cut short (3), or had just ended
    _load(link)
    assert not (run.exp_dir / ".lock_running").exists()
    assert code == 130, stderr  # even when torch.save's zip writer fails while unwinding
    assert stderr.splitlines()[-1] == "ml: interrupted" or "Stopping on SIGINT" in stderr
