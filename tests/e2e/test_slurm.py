"""Real jobs on the one-node Slurm test cluster (``tests/slurm_cluster.py``), then ``ml``'s launcher on it.

The first tests pin down the Slurm behaviour the ``slurm`` launcher relies on: srun ranks and their
environment, signal delivery to the batch shell and to srun tasks, and requeue keeping the job id
with ``SLURM_RESTART_COUNT`` counting the runs.

The last is the launcher end to end: ``ml launch ... launcher.name=slurm`` submits a 2-task job;
``scancel --signal=USR1 --batch`` in the middle of training makes it checkpoint and requeue itself;
released, the requeued job continues from the checkpoint in the same run folder: counters go on, no
step is trained twice.

Every test that uses the cluster is in this one module, so that under pytest-xdist (``--dist
loadfile``) one worker runs them all and the session starts a single cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.e2e.test_distributed import CONFIG, ML, _env, _only_run, _records, _train_losses
from tests.slurm_cluster import SlurmCluster, parse_scontrol_record

pytestmark = pytest.mark.slurm


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster, with every job a test leaves behind cancelled afterwards."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


def write_script(path: Path, text: str) -> Path:
    """Write an executable batch script."""
    path.write_text(text)
    path.chmod(0o755)
    return path


def wait_for_files(*paths: Path, timeout: float = 30.0) -> None:
    """Poll until all ``paths`` exist."""
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        if time.monotonic() > deadline:
            missing = [str(path) for path in paths if not path.exists()]
            raise AssertionError(f"not written within {timeout:.0f} s: {', '.join(missing)}")
        time.sleep(0.05)


def test_two_task_job_runs_both_ranks(cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "ranks.out"
    script = write_script(
        tmp_path / "ranks.sh",
        f"""#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --time=2
#SBATCH --output={out}
srun bash -c 'echo $SLURM_PROCID'
""",
    )
    job_id = cluster.submit(script, cwd=tmp_path)
    cluster.wait_for_state(job_id, "COMPLETED", timeout=60)
    assert sorted(out.read_text().split()) == ["0", "1"]


def test_usr1_to_batch_shell_requeues_and_the_job_runs_again(cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "requeue.out"
    ready = tmp_path / "ready"
    script = write_script(
        tmp_path / "requeue.sh",
        f"""#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --time=2
#SBATCH --output={out}
echo "job $SLURM_JOB_ID run SLURM_RESTART_COUNT=${{SLURM_RESTART_COUNT:-unset}}"
if [ -n "$SLURM_RESTART_COUNT" ]; then exit 0; fi
trap 'echo requeueing; scontrol requeue $SLURM_JOB_ID; exit 0' USR1
touch {ready}
sleep 120 &
wait $!
""",
    )
    job_id = cluster.submit(script, cwd=tmp_path)
    wait_for_files(ready)
    assert cluster.job_state(job_id) == "RUNNING"

    cluster.signal_batch(job_id, "USR1")
    cluster.wait_for_state(job_id, "PENDING", timeout=30)
    assert cluster.restart_count(job_id) == 1
    assert cluster.job_info(job_id)["Reason"] in {"BeginTime", "None"}  # requeued jobs wait ~2 min

    cluster.release(job_id)
    cluster.wait_for_state(job_id, "COMPLETED", timeout=30)
    lines = out.read_text().splitlines()
    assert f"job {job_id} run SLURM_RESTART_COUNT=unset" in lines
    assert "requeueing" in lines
    assert lines[-1] == f"job {job_id} run SLURM_RESTART_COUNT=1"


TASK = """\
import json, os, signal, sys, time
from pathlib import Path

folder, rank = Path(sys.argv[1]), os.environ["SLURM_PROCID"]
got = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
keys = ["SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NODEID", "SLURM_JOB_NODELIST",
        "SLURM_STEP_ID", "SLURM_RESTART_COUNT"]
record = {key: os.environ.get(key) for key in keys}
record.update(executable=sys.executable, cwd=os.getcwd())
(folder / f"env-{rank}.json").write_text(json.dumps(record))
(folder / f"ready-{rank}").touch()
deadline = time.monotonic() + 30
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
(folder / f"usr1-{rank}").write_text("got" if got else "timeout")
"""


@pytest.mark.parametrize("route", ["batch-shell-forwards-to-srun", "scancel-to-steps"])
def test_usr1_reaches_srun_tasks(cluster: SlurmCluster, tmp_path: Path, route: str) -> None:
    """USR1 reaches every srun task both when the batch shell kills srun with it (srun forwards it) and
    with ``scancel --signal=USR1 <job>`` (no ``--batch``: the steps only, the batch shell never sees it,
    which here would kill it). The tasks run this venv's Python and see their SLURM_* variables."""
    (tmp_path / "task.py").write_text(TASK)
    trap = "trap 'kill -USR1 $srun_pid' USR1" if route == "batch-shell-forwards-to-srun" else ""
    script = write_script(
        tmp_path / "signal.sh",
        f"""#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --time=2
#SBATCH --output={tmp_path / "signal.out"}
{trap}
srun {sys.executable} {tmp_path / "task.py"} {tmp_path} &
srun_pid=$!
while true; do  # a trapped signal interrupts wait; go on waiting until srun has exited
    wait $srun_pid
    rc=$?
    kill -0 $srun_pid 2>/dev/null || exit $rc
done
""",
    )
    job_id = cluster.submit(script, cwd=tmp_path)
    wait_for_files(tmp_path / "ready-0", tmp_path / "ready-1")
    if route == "batch-shell-forwards-to-srun":
        cluster.signal_batch(job_id, "USR1")
    else:
        cluster.signal(job_id, "USR1")
    cluster.wait_for_state(job_id, "COMPLETED", timeout=60)

    for rank in ("0", "1"):
        assert (tmp_path / f"usr1-{rank}").read_text() == "got"
        env = json.loads((tmp_path / f"env-{rank}.json").read_text())
        assert env == {
            "SLURM_PROCID": rank,
            "SLURM_LOCALID": rank,
            "SLURM_NTASKS": "2",
            "SLURM_NODEID": "0",
            "SLURM_JOB_NODELIST": cluster.node_name,
            "SLURM_STEP_ID": "0",
            "SLURM_RESTART_COUNT": None,
            "executable": sys.executable,
            "cwd": str(tmp_path),
        }


def test_quoted_sbatch_directives_keep_their_spaces(cluster: SlurmCluster, tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "quoted.sh",
        """#!/bin/bash
#SBATCH --job-name='a b'
#SBATCH --comment="x y"
#SBATCH --hold
true
""",
    )
    job_id = cluster.submit(script, cwd=tmp_path)
    info = cluster.job_info(job_id)
    cluster.cancel(job_id)
    assert (info["JobName"], info["Comment"]) == ("a b", "x y")


def test_parse_scontrol_record_keeps_spaces_in_values() -> None:
    record = parse_scontrol_record("JobId=7 JobName=a b UserId=root(0) ReqB:S:C:T=0:0:*:* Comment=x y")
    assert record == {
        "JobId": "7",
        "JobName": "a b",
        "UserId": "root(0)",
        "ReqB:S:C:T": "0:0:*:*",
        "Comment": "x y",
    }


# ---------------------------------------------------------------------------------------------
# The slurm launcher end to end

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


# ---------------------------------------------------------------------------------------------
# A sweep as a job array, each point running the code staged when it was submitted

STAGED_PACKAGE = """\
import sys

from ml.examples.digits import DigitsMLP, DigitsMLPConfig

VERSION = 1
print(f"sweepmod version {VERSION}", file=sys.stderr)


class SweepMLP(DigitsMLP):
    def __init__(self, config: DigitsMLPConfig) -> None:
        super().__init__(config)
"""

SWEEP_CONFIG = """\
model: {name: "sweepmod:SweepMLP", hidden: 16}
task: {name: digits, seed: 3, max_steps: 3, train_dl: {batch_size: 32}}
optimizer: {name: adam, lr: 1e-2}
trainer: {name: sl, exp_name: arr, valid_at_end: false}
logger: [{name: jsonl, write_every_n_steps: 1}]
sweep:
  optimizer.lr: [0.01, 0.02]
"""


def _ended(run: Path) -> bool:
    """Whether the run's status says its session is over (it is provisional, ``running``, before)."""
    try:
        state = json.loads((run / "status.json").read_text())["state"]
    except (OSError, ValueError, KeyError):
        return False
    return state != "running" and not (run / ".lock_running").exists()


@pytest.mark.slurm
def test_a_sweep_is_a_job_array_of_staged_runs(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    (tmp_path / "sweepmod").mkdir()
    (tmp_path / "sweepmod" / "__init__.py").write_text(STAGED_PACKAGE)
    (tmp_path / "sweep.yaml").write_text(SWEEP_CONFIG)
    run_dir = tmp_path / "runs"
    env = {**_env(run_dir), **slurm_cluster.env, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [*ML, "launch", "sweep.yaml", "launcher.name=slurm", "launcher.extra_args=[--hold]"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    job_id = int(result.stdout.strip().splitlines()[-1])
    runs = [run_dir / "arr" / "run_0", run_dir / "arr" / "run_1"]
    assert f"ml: submitted Slurm job array {job_id} of 2 runs:" in result.stderr
    assert all((run / ".lock_scheduled").exists() and (run / "code" / "sweepmod").is_dir() for run in runs)

    # The working tree changes while the array waits; the tasks still run what was submitted.
    (tmp_path / "sweepmod" / "__init__.py").write_text(STAGED_PACKAGE.replace("VERSION = 1", "VERSION = 2"))
    slurm_cluster.run("scontrol", "release", str(job_id))
    try:
        _wait("both points to end", lambda: all(_ended(run) for run in runs))
    except BaseException:
        for run in runs:
            for out in run.glob("logs/slurm_*.out"):
                print(out, out.read_text())
        raise
    lrs = []
    for run in runs:
        (output,) = run.glob("logs/slurm_*.out")  # each task's output in its own run folder
        log = output.read_text()
        assert "sweepmod version 1" in log and "version 2" not in log, log
        assert json.loads((run / "status.json").read_text())["state"] == "finished"
        assert sorted(_train_losses(run)) == [1, 2, 3]
        lrs.append(OmegaConf.load(run / "config.yaml").optimizer.lr)
        assert not (run / ".lock_scheduled").exists()
    assert lrs == [0.01, 0.02]
