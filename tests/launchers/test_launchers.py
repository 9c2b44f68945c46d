"""Tests of the launchers' command lines and batch scripts (the e2e tests run them for real)."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ml.core.compose import ConfigError
from ml.launchers.slurm import SlurmLauncherConfig, sbatch_options, sbatch_script
from ml.launchers.torchrun import TorchrunLauncherConfig, torchrun_command
from ml.run.layout import RunDir


def test_torchrun_on_one_node_is_standalone() -> None:
    cmd = torchrun_command(TorchrunLauncherConfig(nproc_per_node=4), ["digits", "optimizer.lr=1e-3"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:] == [
        "--nproc-per-node", "4", "--standalone", "--max-restarts", "0",
        "-m", "ml.entry", "train", "digits", "optimizer.lr=1e-3",
    ]  # fmt: skip


def test_torchrun_on_many_nodes_uses_a_c10d_rendezvous() -> None:
    config = TorchrunLauncherConfig(nproc_per_node=2, nnodes=3, rdzv_endpoint="head:29400", rdzv_id="exp")
    cmd = torchrun_command(config, ["digits"])
    i = cmd.index("--nnodes")
    assert cmd[i : i + 8] == [
        "--nnodes", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", "head:29400", "--rdzv-id", "exp",
    ]  # fmt: skip
    assert "--standalone" not in cmd


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("nproc_per_node", 0, "must be positive"),
        ("nnodes", -1, "must be positive"),
        ("max_restarts", -1, "must not be negative"),
    ],
)
def test_torchrun_bad_settings(field: str, value: int, message: str) -> None:
    config = TorchrunLauncherConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        torchrun_command(config, [])


def test_torchrun_endpoint_must_be_host_and_port() -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        torchrun_command(TorchrunLauncherConfig(nnodes=2, rdzv_endpoint="head"), [])


HOSTILE = 'it\'s $(touch pwned) `x` "y"'


def _config(**kwargs: object) -> SlurmLauncherConfig:
    return SlurmLauncherConfig(name="slurm", **kwargs)  # type: ignore[arg-type]


def test_sbatch_options() -> None:
    config = _config(
        job_name="exp", partition="gpu", nodes=2, tasks_per_node=4, gpus_per_node=4, time="1:00:00"
    )
    options = sbatch_options(config, RunDir(Path("/runs/exp/run_0")))
    for option in [
        "--job-name=exp",
        "--partition=gpu",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=1",
        "--time=1:00:00",
        "--requeue",
        "--signal=B:USR1@90",
        "--open-mode=append",
        "--output=/runs/exp/run_0/logs/slurm_%j.out",
    ]:
        assert option in options
    # The job's output goes to the run's own log folder (trainer.log_dir_name), like its other logs.
    options = sbatch_options(config, RunDir(Path("/runs/exp/run_0"), "journal"))
    assert "--output=/runs/exp/run_0/journal/slurm_%j.out" in options


def test_sbatch_script_quotes_every_value(tmp_path: Path) -> None:
    exp_dir = tmp_path / "it's a run" / "run_0"
    config = _config(job_name=HOSTILE, extra_args=["--comment=" + HOSTILE])
    script = sbatch_script(config, RunDir(exp_dir), tmp_path)
    directives = [shlex.split(line)[1] for line in script.splitlines() if line.startswith("#SBATCH")]
    assert f"--job-name={HOSTILE}" in directives and f"--comment={HOSTILE}" in directives
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert shlex.split(srun)[-2:] == [str(exp_dir / "config.yaml"), "&"]  # one argument, quotes kept
    assert HOSTILE not in "\n".join(line for line in script.splitlines() if not line.startswith("#"))
    path = tmp_path / "sbatch.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"job_name": "a\nb"}, "single line"),
        ({"extra_args": ["mem=1G"]}, "must be an sbatch option"),
        ({"tasks_per_node": 0}, "must be positive"),
        ({"signal_grace_s": 0}, "signal_grace_s must be positive"),
    ],
)
def test_sbatch_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sbatch_options(_config(**kwargs), RunDir(Path("/runs/x")))


def test_the_points_of_a_sweep_may_each_name_their_own_run_folder(tmp_path: Path) -> None:
    from ml.launchers.sweep import check_points, expand

    args = ["digits", "optimizer.lr=1e-3,2e-3", f"trainer.exp_dir={tmp_path}/lr_${{optimizer.lr}}"]
    configs = check_points(expand(args, multirun=True), here=True)
    assert [str(c.trainer.exp_dir) for c in configs] == [f"{tmp_path}/lr_0.001", f"{tmp_path}/lr_0.002"]
    assert list(tmp_path.iterdir()) == []  # checked, nothing made


def test_staging_leaves_the_device_to_the_machine_that_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ml stage`` and the Slurm launcher run where the job's GPU may not be (a login node)."""
    import torch

    from ml.core.compose import compose_args
    from ml.launchers.checks import check_before_claim

    config = compose_args(["digits", "trainer.device=cuda"])
    check_before_claim(config, device=False)
    if not torch.cuda.is_available():  # where it trains here, the device is checked
        with pytest.raises(ConfigError, match=r"trainer\.device=cuda"):
            check_before_claim(config, device=True)
    monkeypatch.setenv("ML_DEVICE", "cuda")
    check_before_claim(compose_args(["digits"]), device=False)
    assert os.environ["ML_DEVICE"] == "cuda"  # as it was
