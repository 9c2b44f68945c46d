"""End-to-end test of the ``gan`` trainer: ``ml train digits_gan`` (small) in real subprocesses.

A run stopped by SIGTERM in the middle of an epoch and continued with ``ml train <run>/config.yaml``
ends with exactly the tensors of a run that never stopped: both parts' weights, both optimizers,
both schedules, every generator, the data order, and the same logged metrics (validation, whose
judge and samples come from their own seeds, included).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ml.loggers.jsonl import read_metrics
from tests.same import assert_same

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 120
MAX_STEPS = 400
STOP_AFTER = 45  # SIGTERM once the logs reach this step: in the second epoch, far from its end
# 1,257 real digits in batches of 17 (the last dropped): 73 batches, 2 per step: 37 steps an epoch,
# the last of one batch only.
STEPS_PER_EPOCH = 37
ARGS = [
    "digits_gan",
    f"task.max_steps={MAX_STEPS}",
    "model.hidden=64",
    "task.num_eval_samples=20",
    "task.train_dl.batch_size=17",
    "trainer.discriminator_steps=2",
    "trainer.valid_every_n_steps=50",
    "trainer.checkpoint.save_every_n_steps=1000",
    "trainer.progress_bar=false",
    "logger=[{name: jsonl, write_every_n_steps: 1}]",
]


def _start(run_dir: Path, args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "ML_EXP_NAME"}
    env.update(RUN_DIR=str(run_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "stderr.txt").open("a") as err:
        return subprocess.Popen([*ML, "train", *args], env=env, stdout=subprocess.DEVNULL, stderr=err)


def _finish(proc: subprocess.Popen, run_dir: Path) -> str:
    try:
        code = proc.wait(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    stderr = (run_dir / "stderr.txt").read_text()
    assert code == 0, f"exit {code}\n{stderr}"
    assert "Traceback" not in stderr
    return stderr


def _records(exp_dir: Path) -> list[dict[str, Any]]:
    """The records so far (read while the run writes: a line still being written is skipped)."""
    path = exp_dir / "logs" / "metrics.jsonl"
    return list(read_metrics(path)) if path.exists() else []


def _comparable(records: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, float]]:
    return {(r["step"], r["phase"]): r["metrics"] for r in records}


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_sigterm_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "stopped"
    reference = _start(reference_dir, ARGS)  # alongside: the machine has two cores
    exp_dir = run_dir / "digits_gan" / "run_0"
    proc = _start(run_dir, ARGS)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not any(r["step"] >= STOP_AFTER for r in _records(exp_dir)):
            assert proc.poll() is None, (run_dir / "stderr.txt").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        assert "Stopping on SIGTERM" in _finish(proc, run_dir)
    finally:
        proc.kill()
    stop = json.loads(_load(exp_dir / "checkpoints" / "ckpt.pt")["state"])["num_steps"]
    assert STOP_AFTER <= stop < MAX_STEPS and stop % STEPS_PER_EPOCH != 0, stop  # mid-epoch

    assert f"at step {stop}" in _finish(_start(run_dir, [str(exp_dir / "config.yaml")]), run_dir)
    _finish(reference, reference_dir)

    final = _load(exp_dir / "checkpoints" / "ckpt.pt")
    expected = _load(reference_dir / "digits_gan" / "run_0" / "checkpoints" / "ckpt.pt")
    assert set(final["optim"]) == set(final["lr"]) == {"generator", "discriminator"}
    for part in ("model", "optim", "lr", "task", "rng", "sampler", "last_valid_step", "skipped_steps"):
        assert_same(final[part], expected[part], part)
    assert final["state"] == expected["state"] or (
        {k: v for k, v in json.loads(final["state"]).items() if "time" not in k}
        == {k: v for k, v in json.loads(expected["state"]).items() if "time" not in k}
    )
    records = _records(exp_dir)
    assert [r["step"] for r in records if r["phase"] == "train"] == list(range(1, MAX_STEPS + 1))
    assert _comparable(records) == _comparable(_records(reference_dir / "digits_gan" / "run_0"))
    assert [r["step"] for r in records if r["phase"] == "valid"] == list(range(50, MAX_STEPS + 1, 50))
