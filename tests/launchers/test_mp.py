"""The ``mp`` launcher end to end: real spawned processes, real gloo process groups, no torchrun.

- DDP in 2 processes started by ``launcher.name=mp``, stopped by SIGTERM to the launcher mid-run and
  resumed (by ``mp`` again), follows the loss curve of the same job run uninterrupted by torchrun.
- A process that fails ends the others, and ``ml launch`` exits non-zero at once.

The three launches that need no other's result (torchrun's reference, the mp run to stop, the
failing mp run) start together, in the ``started`` fixture; each test waits for its own.
"""

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.test_distributed import CONFIG, ML, TIMEOUT_S, _env, _only_run, _records, _state, _train_losses

STEPS = 24
# The digits task, slowed (so that SIGTERM lands mid-run) or failing on one rank.
TASK = """\
import os, time
from dataclasses import dataclass

from ml.core.config import conf_field
from ml.examples.digits import DigitsTask, DigitsTaskConfig


@dataclass
class PacedDigitsConfig(DigitsTaskConfig):
    fail_on_rank: int | None = conf_field(None, help="This rank raises at step 3")


class PacedDigitsTask(DigitsTask):
    def __init__(self, config: PacedDigitsConfig) -> None:
        super().__init__(config)

    def compute_loss(self, model, batch, state, output):
        if state.training:
            if os.environ["RANK"] == str(self.config.fail_on_rank) and state.num_steps == 3:
                raise RuntimeError("planned failure on rank " + os.environ["RANK"])
            time.sleep(float(os.environ.get("PACED_STEP_SLEEP_S", "0")))  # not config: resume may change it
        return super().compute_loss(model, batch, state, output)
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("mp")
    (tmp / "dist.yaml").write_text(CONFIG)
    (tmp / "paced.yaml").write_text(CONFIG.replace("name: digits,", "name: 'paced_task:PacedDigitsTask',"))
    (tmp / "paced_task.py").write_text(TASK)
    return tmp


def _ml(*args: str, run_dir: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**_env(run_dir), "PYTHONPATH": str(cwd), "PACED_STEP_SLEEP_S": "0"}
    return subprocess.run(
        [*ML, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def _timed_ml(*args: str, run_dir: Path, cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """``_ml``'s result, and the seconds the command took."""
    began = time.monotonic()
    result = _ml(*args, run_dir=run_dir, cwd=cwd)
    return result, time.monotonic() - began


@dataclass
class Started:
    torchrun: Future  # the job run by torchrun, uninterrupted: `_ml`'s result
    paced: subprocess.Popen[str]  # the paced job in 2 processes by mp, for a test to stop
    paced_err: Path  # its stderr
    failing: Future  # the job in 2 processes by mp, rank 1 failing at step 3: `_timed_ml`'s


@pytest.fixture(scope="module")
def started(folder: Path) -> Iterator[Started]:
    """The launches that need no other's result, started together."""
    with ThreadPoolExecutor(max_workers=2) as pool, (folder / "paced.stderr").open("w") as paced_err:
        torchrun = pool.submit(
            _ml,
            *("launch", "dist.yaml", "launcher.name=torchrun", "launcher.nproc_per_node=2"),
            run_dir=folder / "torchrun",
            cwd=folder,
        )
        paced = subprocess.Popen(
            [*ML, "launch", "paced.yaml", "launcher.name=mp", "launcher.nproc_per_node=2"],
            env={**_env(folder / "mp"), "PYTHONPATH": str(folder), "PACED_STEP_SLEEP_S": "0.15"},
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=paced_err,
            text=True,
        )
        failing = pool.submit(
            _timed_ml,
            "launch",
            "paced.yaml",
            "launcher.name=mp",
            "task.fail_on_rank=1",
            "task.max_steps=100000",
            "launcher.kill_after_s=60",
            run_dir=folder / "failing",
            cwd=folder,
        )
        try:
            yield Started(torchrun, paced, folder / "paced.stderr", failing)
        finally:
            if paced.poll() is None:  # its test did not run: stopped as the test would
                paced.send_signal(signal.SIGTERM)
                paced.wait(timeout=TIMEOUT_S)


def _torchrun_losses(folder: Path, started: Started) -> dict[int, float]:
    """The curve of the job run by torchrun, uninterrupted."""
    run_dir = folder / "torchrun"
    result = started.torchrun.result()
    assert result.returncode == 0, result.stderr[-3000:]
    losses = _train_losses(_only_run(run_dir))
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _wait_for_step(exp_dir: Path, step: int, proc: subprocess.Popen[str], err: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, err.read_text()[-3000:]
        metrics = exp_dir / "logs" / "metrics.jsonl"
        if metrics.exists() and any(r["step"] >= step for r in _records(exp_dir) if r["phase"] == "train"):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} never came")


def test_mp_stopped_by_sigterm_and_resumed_follows_torchrun(folder: Path, started: Started) -> None:
    # The paced job (0.15 s a step) in 2 processes by mp, started with the module.
    run_dir, proc = folder / "mp", started.paced
    _wait_for_step(run_dir / "dist" / "run_0", 4, proc, started.paced_err)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which passes it on to both processes
    proc.wait(timeout=TIMEOUT_S)
    err = started.paced_err.read_text()
    assert proc.returncode == 0, err[-3000:]  # both checkpointed and ended cleanly
    assert "Joined the gloo process group as rank 0 of 2" in err
    assert "Stopping on SIGTERM at step" in err
    exp_dir = _only_run(run_dir)
    stopped_at = _state(exp_dir / "checkpoints" / "ckpt.pt")["num_steps"]
    assert 4 <= stopped_at < STEPS
    assert max(_train_losses(exp_dir)) == stopped_at  # the ranks stopped together, at the saved step
    assert '"state": "interrupted"' in (exp_dir / "status.json").read_text()
    assert not (exp_dir / ".lock_running").exists()

    # The run continues in 2 processes from its checkpoint, to the curve torchrun drew in one go.
    result = _ml("launch", str(exp_dir / "config.yaml"), run_dir=run_dir, cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {stopped_at}" in result.stderr
    torchrun_losses = _torchrun_losses(folder, started)
    losses = _train_losses(exp_dir)
    assert sorted(losses) == sorted(torchrun_losses)
    for step, loss in torchrun_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), f"step {step}"
    state = _state(exp_dir / "checkpoints" / "ckpt.pt")
    assert (state["num_steps"], state["num_samples"]) == (STEPS, STEPS * 2 * 32)


def test_a_failing_process_ends_the_others(folder: Path, started: Started) -> None:
    # The job in 2 processes by mp, rank 1 failing at step 3, started with the module.
    run_dir = folder / "failing"
    result, took = started.failing.result()
    assert result.returncode == 1, result.stderr[-3000:]
    assert "planned failure on rank 1" in result.stderr
    # Rank 0 may fail too (its peer is gone) before the launcher looks: both are then named.
    assert "rank 1 exited with code 1" in result.stderr and "; ending the other ranks" in result.stderr
    assert took < 50  # rank 0 ended then, not after kill_after_s or a gloo timeout
    exp_dir = _only_run(run_dir)
    status = json.loads((exp_dir / "status.json").read_text())
    assert (status["state"], status["step"]) == ("failed", 3)
