"""Defines the ``slurm`` launcher: submit the run as a batch job that survives preemption.

``ml launch CONFIG launcher.name=slurm launcher.tasks_per_node=2 ...`` claims the run folder on the
submitting machine, writes the resolved ``config.yaml`` and ``sbatch.sh`` into it, submits the
script with ``sbatch`` and marks the run ``scheduled`` (``.lock_scheduled``). In the job, ``srun``
starts one ``ml train <exp_dir>/config.yaml`` per task; each reads its rank from Slurm's variables.

Preemption and time limits: the script asks Slurm for SIGUSR1 ``signal_grace_s`` seconds before
the end (``--signal=B:USR1@s``), delivered to the batch shell, which passes it on to the tasks. The
ranks agree to stop at the next step boundary, rank 0 writes a checkpoint, and, once training has
shut down cleanly, calls ``scontrol requeue $SLURM_JOB_ID`` (the job was submitted ``--requeue``).
The requeued job runs the same script: it continues from the checkpoint in the same folder.

Every value that reaches the script is validated (no newlines) and shell-quoted.
"""

import logging
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from signal import Signals
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ml.core.compose import ConfigError
from ml.core.config import conf_field
from ml.core.registry import register_launcher
from ml.launchers.base import BaseLauncher, BaseLauncherConfig
from ml.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

REQUEUE_ENV = "ML_SLURM_REQUEUE"
SCRIPT_NAME = "sbatch.sh"


@dataclass
class SlurmLauncherConfig(BaseLauncherConfig):
    job_name: str = conf_field("${trainer.exp_name}", help="Slurm job name")
    partition: str | None = conf_field(None, help="Partition (default: the cluster's default)")
    account: str | None = conf_field(None, help="Account to charge")
    qos: str | None = conf_field(None, help="Quality of service")
    nodes: int = conf_field(1, help="Nodes")
    tasks_per_node: int = conf_field(1, help="Training processes per node (one per GPU)")
    gpus_per_node: int = conf_field(0, help="GPUs per node (0: none requested)")
    cpus_per_task: int = conf_field(1, help="CPUs per training process (data loading workers included)")
    time: str | None = conf_field(None, help="Time limit, e.g. 1-00:00:00 (default: the partition's)")
    signal_grace_s: int = conf_field(90, help="Seconds before the end at which to checkpoint and requeue")
    requeue: bool = conf_field(True, help="Requeue the job when it is signalled (preemption, time limit)")
    extra_args: list[str] = conf_field([], help="More sbatch options, e.g. ['--mem=32G']")
    submit: bool = conf_field(True, help="Submit the script (false: only write it)")


def _check_value(name: str, value: Any) -> str:
    text = str(value)
    if any(c in text for c in "\n\r\0"):
        raise ConfigError(f"launcher.{name} must be a single line, got {text!r}")
    return text


def sbatch_options(config: SlurmLauncherConfig, exp_dir: Path) -> list[str]:
    """The ``--key=value`` options of the job (each one argument, unquoted)."""
    if config.nodes < 1 or config.tasks_per_node < 1 or config.cpus_per_task < 1 or config.gpus_per_node < 0:
        raise ConfigError(
            "launcher.nodes, tasks_per_node and cpus_per_task must be positive, gpus_per_node >= 0"
        )
    if config.signal_grace_s < 1:
        raise ConfigError(f"launcher.signal_grace_s must be positive, got {config.signal_grace_s}")
    options = [
        f"--job-name={_check_value('job_name', config.job_name)}",
        f"--nodes={config.nodes}",
        f"--ntasks-per-node={config.tasks_per_node}",
        f"--cpus-per-task={config.cpus_per_task}",
        f"--output={exp_dir / 'logs' / 'slurm_%j.out'}",
        "--open-mode=append",
        f"--signal=B:USR1@{config.signal_grace_s}",
    ]
    for name in ("partition", "account", "qos", "time"):
        value = getattr(config, name)
        if value is not None:
            options.append(f"--{name}={_check_value(name, value)}")
    if config.gpus_per_node:
        options.append(f"--gpus-per-node={config.gpus_per_node}")
    if config.requeue:
        options.append("--requeue")
    for i, extra in enumerate(config.extra_args):
        text = _check_value(f"extra_args[{i}]", extra)
        if not text.startswith("-"):
            raise ConfigError(f"launcher.extra_args[{i}] must be an sbatch option (--name=...), got {text!r}")
        options.append(text)
    return options


def sbatch_script(config: SlurmLauncherConfig, exp_dir: Path, workdir: Path) -> str:
    """The batch script: options, then ``srun`` of ``ml train`` with USR1 passed on to the tasks."""
    options = "\n".join(f"#SBATCH {shlex.quote(option)}" for option in sbatch_options(config, exp_dir))
    python = shlex.quote(sys.executable)
    config_path = shlex.quote(str(exp_dir / "config.yaml"))
    requeue = "1" if config.requeue else "0"
    return f"""#!/bin/bash
# Written by `ml launch` for {shlex.quote(str(exp_dir))}
# Submit again with: sbatch {shlex.quote(str(exp_dir / SCRIPT_NAME))}
{options}

export {REQUEUE_ENV}={requeue}
export PYTHONUNBUFFERED=1
cd {shlex.quote(str(workdir))} || exit 1
echo "ml: job $SLURM_JOB_ID, restart ${{SLURM_RESTART_COUNT:-0}}, on $SLURM_JOB_NODELIST"

# Slurm sends USR1 to this shell (--signal=B:USR1@...) before the end: pass it on to every task.
# The tasks checkpoint at the next step, and rank 0 requeues the job.
forward_usr1() {{ echo "ml: USR1: checkpointing"; kill -USR1 "$srun_pid" 2>/dev/null; }}
trap forward_usr1 USR1

srun --kill-on-bad-exit=1 {python} -m ml.entry train {config_path} &
srun_pid=$!
while :; do
    wait "$srun_pid"
    status=$?
    kill -0 "$srun_pid" 2>/dev/null || break  # wait returned for the trap: srun still runs
done
exit "$status"
"""


def requeue_if_preempted(trainer: Any) -> None:
    """After a run stopped for SIGUSR1 inside a job this launcher submitted: requeue the job.

    Called by rank 0 once training has shut down (checkpoint written, running lock released). The
    run is marked ``scheduled`` again until the requeued job takes it.
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if trainer.stop_signal != Signals.SIGUSR1 or os.environ.get(REQUEUE_ENV) != "1" or not job_id:
        return
    trainer.add_lock_file("scheduled", exists_ok=True)
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        trainer.remove_lock_file("scheduled", missing_ok=True)
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"scontrol requeue {job_id} failed: {detail[0] if detail else result.returncode}")
    logger.info("Requeued Slurm job %s: it continues from %s", job_id, trainer.ckpt_path)


@register_launcher("slurm")
class SlurmLauncher(BaseLauncher[SlurmLauncherConfig]):
    """Writes ``exp_dir/sbatch.sh`` and submits it; the job trains, checkpoints and requeues itself."""

    def launch(self, args: list[str], config: DictConfig) -> int:
        from ml.cli import claim_run_dir
        from ml.core.compose import build_objects
        from ml.trainers.base import add_lock_file, save_config

        if self.config.submit and shutil.which("sbatch") is None:
            raise ConfigError(
                "sbatch not found: run `ml launch` where Slurm is installed, or set launcher.submit=false"
            )
        del args
        build_objects(config)  # bad input stops here, not in the job
        exp_dir, release = claim_run_dir(config)
        try:
            sbatch_options(self.config, exp_dir)  # validated before anything is written
            OmegaConf.resolve(config)
            (exp_dir / "logs").mkdir(parents=True, exist_ok=True)
            save_config(exp_dir / "config.yaml", config)
            script = exp_dir / SCRIPT_NAME
            atomic_write_text(script, sbatch_script(self.config, exp_dir, Path.cwd()))
            script.chmod(0o755)
        except BaseException:
            release()
            raise
        if not self.config.submit:
            print(f"ml: wrote {script}; submit it with: sbatch {shlex.quote(str(script))}", file=sys.stderr)
            return 0
        add_lock_file(exp_dir, "scheduled")
        result = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            release()
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise ConfigError(f"sbatch refused the job: {detail[0] if detail else result.returncode}")
        job_id = result.stdout.strip().split(";")[0]
        print(f"ml: submitted Slurm job {job_id}", file=sys.stderr)
        print(f"ml: run directory   {exp_dir}", file=sys.stderr)
        print(f"ml: job output      {exp_dir / 'logs' / f'slurm_{job_id}.out'}", file=sys.stderr)
        print(job_id)
        return 0
