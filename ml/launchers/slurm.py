"""Defines the ``slurm`` launcher: submit the run as a batch job that survives preemption.

``ml launch CONFIG launcher.name=slurm launcher.tasks_per_node=2 ...`` claims the run folder on the
submitting machine, writes the resolved ``config.yaml`` and ``sbatch.sh`` into it, submits the
script with ``sbatch`` and marks the run ``scheduled`` (``.lock_scheduled``). In the job, ``srun``
starts one ``ml train <exp_dir>/config.yaml`` per task; each reads its rank from Slurm's variables.

Preemption and time limits: the script asks Slurm for SIGUSR1 ``signal_grace_s`` seconds before
the end (``--signal=B:USR1@s``), delivered to the batch shell, which passes it on to the tasks. The
ranks agree to stop at the next step boundary and rank 0 writes a checkpoint; once it is durable, the
trainer's SIGUSR1 handler (registered by :func:`requeue_on_preemption` through the spec's
``add_signal_handler``) marks the run ``scheduled`` and calls ``scontrol requeue $SLURM_JOB_ID``
(the job was submitted ``--requeue``). Slurm starts the requeued job only once every process of
this one has ended; it runs the same script and continues from the checkpoint in the same folder.

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

from ml.core.config import conf_field
from ml.core.registry import register_launcher
from ml.errors import ConfigError
from ml.launchers.base import BaseLauncher, BaseLauncherConfig
from ml.run.layout import RunDir
from ml.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

REQUEUE_ENV = "ML_SLURM_REQUEUE"


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


def sbatch_options(config: SlurmLauncherConfig, run: RunDir) -> list[str]:
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
        f"--output={run.logs / 'slurm_%j.out'}",
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


def sbatch_script(config: SlurmLauncherConfig, run: RunDir, workdir: Path) -> str:
    """The batch script: options, then ``srun`` of ``ml train`` with USR1 passed on to the tasks."""
    options = "\n".join(f"#SBATCH {shlex.quote(option)}" for option in sbatch_options(config, run))
    python = shlex.quote(sys.executable)
    config_path = shlex.quote(str(run.config))
    requeue = "1" if config.requeue else "0"
    return f"""#!/bin/bash
# Written by `ml launch` for {shlex.quote(str(run.path))}
# Submit again with: sbatch {shlex.quote(str(run.sbatch_script))}
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


def requeue_on_preemption(trainer: Any) -> None:
    """In a job this launcher submitted with ``requeue``: requeue the job when SIGUSR1 stops training.

    Registers the requeue as the trainer's SIGUSR1 handler, on rank 0 alone; the trainer runs it
    once the checkpoint for the signal is durable. The run is marked ``scheduled`` until the
    requeued job takes it.
    """
    from ml.utils.ranks import dist_env

    job_id = os.environ.get("SLURM_JOB_ID")
    if os.environ.get(REQUEUE_ENV) != "1" or not job_id or dist_env().rank != 0:
        return

    def requeue() -> None:
        trainer.add_lock_file("scheduled", exists_ok=True)
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            trainer.remove_lock_file("scheduled", missing_ok=True)
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise RuntimeError(
                f"scontrol requeue {job_id} failed: {detail[0] if detail else result.returncode}"
            )
        logger.info("Requeued Slurm job %s: it continues from %s", job_id, trainer.ckpt_path)

    trainer.add_signal_handler(Signals.SIGUSR1, requeue)


@register_launcher("slurm")
class SlurmLauncher(BaseLauncher[SlurmLauncherConfig]):
    """Writes ``exp_dir/sbatch.sh`` and submits it; the job trains, checkpoints and requeues itself."""

    def launch(self, args: list[str], config: DictConfig) -> int:
        from ml.core.compose import build_objects, config_to_save
        from ml.run.claim import check_folder_name, claim_run_dir
        from ml.run.locks import write_lock
        from ml.trainers.base import save_config

        if self.config.submit and shutil.which("sbatch") is None:
            raise ConfigError(
                "sbatch not found: run `ml launch` where Slurm is installed, or set launcher.submit=false"
            )
        del args
        build_objects(config)  # bad input stops here, not in the job
        exp_dir, release = claim_run_dir(config.trainer)
        try:
            run = RunDir(exp_dir, check_folder_name(config.trainer.log_dir_name, "trainer.log_dir_name"))
            sbatch_options(self.config, run)  # validated before anything is written
            saved = config_to_save(config)
            OmegaConf.resolve(config)
            run.logs.mkdir(parents=True, exist_ok=True)
            save_config(run.config, saved, resolve=False)
            script = run.sbatch_script
            atomic_write_text(script, sbatch_script(self.config, run, Path.cwd()))
            script.chmod(0o755)
        except BaseException:
            release()
            raise
        if not self.config.submit:
            print(f"ml: wrote {script}; submit it with: sbatch {shlex.quote(str(script))}", file=sys.stderr)
            return 0
        write_lock(run, "scheduled")
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
        print(f"ml: job output      {run.logs / f'slurm_{job_id}.out'}", file=sys.stderr)
        print(job_id)
        return 0
