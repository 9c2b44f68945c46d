"""End-to-end test of the ``slurm`` launcher on a real one-node Slurm cluster (see tests/slurm_cluster.py).

``ml launch ... launcher.name=slurm`` submits a 2-task job; ``scancel --signal=USR1 --batch`` in the
middle of training makes it checkpoint and requeue itself; released, the requeued job continues
from the checkpoint in the same run folder: counters go on, no step is trained twice.
"""

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.e2e.test_distributed import CONFIG, ML, _env, _only_run, _records, _train_losses
from tests.slurm_cluster import SlurmCluster

TIMEOUT_S = 180
MAX_STEPS = 1500
JOB_NAME = "dist job 'quoted' $(x)"


def _wait(what: str, ready: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _trained_to(exp_dir: Path, step: int) -> bool:
    metrics = exp_dir / "logs" / "metrics.jsonl"
    return metrics.exists() and any(r["step"] >= step for r in _records(exp_dir) if r["phase"] == "train")


@pytest.mark.slurm
def test_slurm_job_checkpoints_on_usr1_requeues_and_finishes(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    config = tmp_path / "dist.yaml"
    config.write_text(CONFIG)
    run_dir = tmp_path / "runs"
    env = {**_env(run_dir), **slurm_cluster.env}
    result = subprocess.run(
        [
            *ML,
            "launch",
            str(config),
            "launcher.name=slurm",
            "launcher.tasks_per_node=2",
            f"launcher.job_name={JOB_NAME}",
            "launcher.signal_grace_s=30",
            f"task.max_steps={MAX_STEPS}",
            f"trainer.checkpoint.save_every_n_steps={MAX_STEPS}",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    job_id = int(result.stdout.strip().splitlines()[-1])
    exp_dir = _only_run(run_dir)
    assert (exp_dir / "sbatch.sh").is_file() and (exp_dir / "config.yaml").is_file()
    assert slurm_cluster.job_info(job_id)["JobName"] == JOB_NAME  # quoted, not run
    output = exp_dir / "logs" / f"slurm_{job_id}.out"

    try:
        _wait("the job to train", lambda: _trained_to(exp_dir, 20))
        assert not (exp_dir / ".lock_scheduled").exists()  # taken by the running job
        slurm_cluster.signal_batch(job_id, "USR1")
        _wait("the requeue", lambda: slurm_cluster.job_info(job_id).get("Restarts") == "1")
        slurm_cluster.wait_for_state(job_id, "PENDING", timeout=TIMEOUT_S)
        saved = json.loads(torch.load(exp_dir / "checkpoints" / "ckpt.pt", weights_only=True)["state"])
        stopped_at = saved["num_steps"]
        assert 20 <= stopped_at < MAX_STEPS
        assert (exp_dir / ".lock_scheduled").exists()  # waiting for the requeued job
        assert not (exp_dir / ".lock_running").exists()

        slurm_cluster.release(job_id)
        slurm_cluster.wait_for_state(job_id, "COMPLETED", timeout=TIMEOUT_S)
    except BaseException:
        print(output.read_text() if output.exists() else "(no job output)")
        slurm_cluster.cancel(job_id)
        raise

    log = output.read_text()
    assert "ml: USR1: checkpointing" in log
    assert "restart 1" in log
    assert f"Resumed from {exp_dir / 'checkpoints' / 'ckpt.pt'} at step {stopped_at}" in log
    losses = _train_losses(exp_dir)  # each step logged once: none trained twice, none skipped
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    final = json.loads(torch.load(exp_dir / "checkpoints" / "ckpt.pt", weights_only=True)["state"])
    assert final["num_steps"] == MAX_STEPS
    assert final["num_samples"] > saved["num_samples"]
    assert not (exp_dir / ".lock_scheduled").exists() and not (exp_dir / ".lock_running").exists()
