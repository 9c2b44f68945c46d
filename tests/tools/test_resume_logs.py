"""Tests that a run's logs agree with its checkpoint after a ``kill -9`` and a resume.

One real run in two processes. The first trains with a checkpoint every 50 steps and every step
logged (to ``metrics.jsonl`` and TensorBoard). Once ``metrics.jsonl`` shows a validation after its
newest checkpoint S, it is paused (SIGSTOP), and SIGKILLed if its event files on disk are past S
too (else it goes on and is paused again later): the kill leaves exactly what was checked. The second
continues from ``ckpt.S.pt`` to step S + 10, so steps S + 1 onwards were logged twice, by each
process. ``metrics.jsonl`` and TensorBoard must each show one value per phase and step, the second
process's after S, and keep the lines up to S as they were.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ml.core.state import State
from ml.loggers.base import LogBatch
from ml.loggers.jsonl import JsonlLogger, JsonlLoggerConfig

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 180
CKPT_EVERY, VALID_EVERY, MORE_STEPS = 50, 5, 10  # a wide window (steps S+5..S+49) to pause in

# A tiny model and no limit in reach: the first process runs until it is killed. The event files are
# flushed after every event, so what the process wrote is on disk when it is paused.
CONFIG = f"""\
model: {{name: digits_mlp, hidden: 32, dropout: 0.0}}
task: {{name: digits, seed: 3, max_steps: 100000, train_dl: {{batch_size: 32}}}}
optimizer: {{name: adam, lr: 1e-2}}
lr_scheduler: {{name: constant}}
trainer:
  name: sl
  exp_name: resume_logs
  valid_every_n_steps: {VALID_EVERY}
  checkpoint: {{save_every_n_steps: {CKPT_EVERY}}}
logger:
  - {{name: jsonl, write_every_n_steps: 1}}
  - {{name: tensorboard, write_every_n_steps: 1, flush_every_n_seconds: 0}}
"""


def _env(run_dir: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ML_EXP_NAME")
    }
    env.update(RUN_DIR=str(run_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _records(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a metrics file (a line still being written is left out)."""
    lines = path.read_bytes().split(b"\n")[:-1]
    return [json.loads(line) for line in lines]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows of a phase folder: each scalar tag's (step, value) points."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def _last_step(points: list[tuple[int, float]]) -> int:
    return max((step for step, _ in points), default=0)


@dataclass
class Resumed:
    exp_dir: Path
    ckpt_step: int  # S: the newest checkpoint when the first process was killed
    killed_metrics: bytes  # metrics.jsonl as the killed process left it
    killed_scalars: dict[str, list[tuple[int, float]]]  # the train folder's scalars then
    stderr: str  # of the process that resumed

    @property
    def final_step(self) -> int:
        return self.ckpt_step + MORE_STEPS


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "Tt"
    except OSError:  # no /proc: give the signal a moment instead
        time.sleep(0.05)
        return True


def _checkpoint_step(exp_dir: Path) -> int | None:
    try:
        return int(os.readlink(exp_dir / "checkpoints" / "ckpt.pt").split(".")[1])
    except OSError:
        return None  # no checkpoint yet


def _validated_past_checkpoint(exp_dir: Path) -> int | None:
    """The newest checkpoint's step once metrics.jsonl holds a validation after it (5 more steps)."""
    ckpt_step = _checkpoint_step(exp_dir)
    if ckpt_step is None:
        return None
    records = _records(exp_dir / "logs" / "metrics.jsonl")
    return ckpt_step if any(r["phase"] == "valid" and r["step"] > ckpt_step for r in records) else None


def _past_checkpoint(exp_dir: Path) -> tuple[int, dict[str, list[tuple[int, float]]]] | None:
    """The newest checkpoint's step and the train scalars, once all the logs on disk are past it."""
    ckpt_step = _validated_past_checkpoint(exp_dir)
    if ckpt_step is None:
        return None
    train = _scalars(exp_dir / "logs" / "tensorboard" / "train")
    valid = _scalars(exp_dir / "logs" / "tensorboard" / "valid")
    if min(_last_step(train["train/loss"]), _last_step(valid.get("valid/loss", []))) <= ckpt_step:
        return None
    return ckpt_step, train


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Resumed:
    tmp = tmp_path_factory.mktemp("resume_logs")
    (tmp / "config.yaml").write_text(CONFIG)
    run_dir = tmp / "runs"
    exp_dir = run_dir / "resume_logs" / "run_0"
    metrics = exp_dir / "logs" / "metrics.jsonl"

    with (tmp / "killed.err").open("w") as err:
        proc = subprocess.Popen(
            [*ML, "train", str(tmp / "config.yaml")], env=_env(run_dir), stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            deadline = time.monotonic() + TIMEOUT_S
            pauses = 0
            while True:
                assert proc.poll() is None, (tmp / "killed.err").read_text()[-3000:]
                assert time.monotonic() < deadline, "the run's logs never got past its checkpoint"
                time.sleep(0.05)
                if _validated_past_checkpoint(exp_dir) is None:
                    continue
                proc.send_signal(signal.SIGSTOP)  # what is on disk now is what a kill leaves
                pauses += 1
                while not _stopped(proc.pid):
                    time.sleep(0.005)
                found = _past_checkpoint(exp_dir)
                if found is not None:
                    break
                proc.send_signal(signal.SIGCONT)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    ckpt_step, killed_scalars = found
    print(f"killed at checkpoint {ckpt_step} after {pauses} pause(s)")
    # What a kill during a line, and one during an earlier trimming of the file, leave behind.
    with metrics.open("ab") as f:
        if metrics.read_bytes().endswith(b"\n"):
            f.write(b'{"step": 9, "phase": "tra')
    (metrics.parent / ".metrics.jsonl.abc123.tmp").write_bytes(b'{"step": 1')
    killed_metrics = metrics.read_bytes()

    last = subprocess.run(
        [*ML, "train", str(exp_dir / "config.yaml"), f"task.max_steps={ckpt_step + MORE_STEPS}"],
        env=_env(run_dir),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert last.returncode == 0, last.stderr[-3000:]
    return Resumed(exp_dir, ckpt_step, killed_metrics, killed_scalars, last.stderr)


def test_the_killed_run_had_logged_past_its_checkpoint(resumed: Resumed) -> None:
    killed = [json.loads(line) for line in resumed.killed_metrics.split(b"\n")[:-1]]
    assert resumed.ckpt_step >= CKPT_EVERY
    assert max(r["step"] for r in killed if r["phase"] == "train") >= resumed.ckpt_step + VALID_EVERY
    assert _last_step(resumed.killed_scalars["train/loss"]) > resumed.ckpt_step
    assert f"at step {resumed.ckpt_step}" in resumed.stderr  # the second process resumed from ckpt.S.pt
    assert f"past the checkpoint at step {resumed.ckpt_step}" in resumed.stderr  # and said what it dropped


def test_metrics_jsonl_has_each_phase_and_step_once(resumed: Resumed) -> None:
    metrics = resumed.exp_dir / "logs" / "metrics.jsonl"
    text = metrics.read_bytes()
    assert text.endswith(b"\n")
    records = _records(metrics)  # every line parses: the cut line is gone
    counts = Counter((r["phase"], r["step"]) for r in records)
    assert [key for key, n in counts.items() if n > 1] == []
    final = resumed.final_step
    assert [r["step"] for r in records if r["phase"] == "train"] == list(range(1, final + 1))
    assert [r["step"] for r in records if r["phase"] == "valid"] == list(range(5, final + 1, VALID_EVERY))
    assert [r["step"] for r in records if r["phase"] == "test"] == [final]
    # The lines up to the checkpoint are kept byte for byte, and come first.
    kept = [
        line + b"\n"
        for line in resumed.killed_metrics.split(b"\n")[:-1]
        if json.loads(line)["step"] <= resumed.ckpt_step
    ]
    assert text.startswith(b"".join(kept))
    assert all(r["step"] > resumed.ckpt_step for r in records[len(kept) :])
    assert [p.name for p in metrics.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_tensorboard_shows_one_value_per_step(resumed: Resumed) -> None:
    records = _records(resumed.exp_dir / "logs" / "metrics.jsonl")
    for phase in ("train", "valid"):
        scalars = _scalars(resumed.exp_dir / "logs" / "tensorboard" / phase)
        jsonl = {r["step"]: r["metrics"] for r in records if r["phase"] == phase}
        assert [step for step, _ in scalars[f"{phase}/loss"]] == sorted(jsonl)
        for tag, points in scalars.items():
            steps = [step for step, _ in points]
            assert steps == sorted(set(steps)), f"{phase}: {tag} has a step twice"
            # The values shown are those metrics.jsonl kept: the second process's after S.
            for step, value in points:
                assert value == pytest.approx(jsonl[step][tag], rel=1e-6, abs=1e-7), (tag, step)
        if phase == "train":
            assert sorted(jsonl) == list(range(1, resumed.final_step + 1))


def test_the_resumed_event_files_start_with_a_purge_at_the_next_step(resumed: Resumed) -> None:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    for phase in ("train", "valid"):
        files = sorted((resumed.exp_dir / "logs" / "tensorboard" / phase).glob("events.out.tfevents.*"))
        starts = [
            [e.step for e in EventFileLoader(str(path)).Load() if e.session_log.status == SessionLog.START]
            for path in files
        ]
        # One file per process: the first started a new run (nothing to purge), the second at S.
        assert starts == [[], [resumed.ckpt_step + 1]]


def test_on_resume_keeps_a_whole_last_record_and_rewrites_only_when_needed(
    resumed: Resumed, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    shutil.copytree(resumed.exp_dir / "logs", logs, ignore=shutil.ignore_patterns("tensorboard"))
    path = logs / "metrics.jsonl"
    original = path.read_bytes()
    path.write_bytes(original[:-1])  # the last record whole, but for its newline
    logger = JsonlLogger(JsonlLoggerConfig(name="jsonl"))
    logger.initialize(logs)

    logger.on_resume(State(num_steps=resumed.final_step))
    assert path.read_bytes() == original  # kept, and given its newline back
    inode = path.stat().st_ino
    logger.on_resume(State(num_steps=resumed.final_step))
    assert path.stat().st_ino == inode  # nothing to drop: the file is not rewritten

    step = resumed.ckpt_step // 2
    logger.on_resume(State(num_steps=step))
    lines = original.split(b"\n")[:-1]
    assert path.read_bytes() == b"".join(line + b"\n" for line in lines if json.loads(line)["step"] <= step)
    assert path.stat().st_ino != inode  # replaced, not changed in place
    logger.write(State(num_steps=step + 1), LogBatch(scalars={"train/loss": 1.0}))
    logger.close()
    assert _records(path)[-1]["step"] == step + 1  # and the logger appends to the new file
