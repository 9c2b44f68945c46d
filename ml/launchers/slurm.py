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

Staging (``launcher.stage``, on by default): the run folder also gets a copy of the code in the
submitting directory (``<exp_dir>/code``, :mod:`ml.launchers.stage`); ``ml train <exp_dir>/config.yaml``
in the job imports the user's modules from it, so the job trains what was submitted, whatever the
working tree holds when it starts.

A sweep (``ml launch CONFIG -m key=a,b launcher.name=slurm``) is one job array: every point gets
its own run folder, ``config.yaml``, code and ``sbatch.sh`` (which submits that point again, alone);
the array's script picks the point's folder by ``$SLURM_ARRAY_TASK_ID``, sends the task's output to
that folder's ``logs/slurm_<jobid>.out`` and runs the point's own script. Each task is a job of
its own to Slurm (its own id): preempted, it requeues itself alone. ``launcher.max_parallel`` caps
how many points run at once.

Every value that reaches the script is validated (no newlines) and shell-quoted.
"""

import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from signal import Signals
from typing import Any

from omegaconf import DictConfig

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
    stage: bool = conf_field(
        True, help="Copy the code of the current directory into the run folder; the job trains with it"
    )
    max_parallel: int | None = conf_field(None, help="A sweep's job array: at most this many points at once")


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


def array_script(config: SlurmLauncherConfig, runs: list[RunDir]) -> str:
    """The batch script of a sweep's job array: task i runs the ``sbatch.sh`` of ``runs[i]``.

    Its options are the points' (they share the launcher section), but for the output, which each
    task sends to its own run folder's ``logs/slurm_<jobid>.out``, as a job of one run does.
    """
    if config.max_parallel is not None and config.max_parallel < 1:
        raise ConfigError(f"launcher.max_parallel must be positive, got {config.max_parallel}")
    limit = f"%{config.max_parallel}" if config.max_parallel else ""
    options = [o for o in sbatch_options(config, runs[0]) if not o.startswith("--output=")]
    options += ["--output=/dev/null", f"--array=0-{len(runs) - 1}{limit}"]
    directives = "\n".join(f"#SBATCH {shlex.quote(option)}" for option in options)
    scripts = " ".join(shlex.quote(str(run.sbatch_script)) for run in runs)
    outputs = " ".join(shlex.quote(str(run.logs)) for run in runs)
    return f"""#!/bin/bash
# Written by `ml launch`: a sweep of {len(runs)} runs, one array task each
{directives}

scripts=({scripts})
outputs=({outputs})
exec >>"${{outputs[$SLURM_ARRAY_TASK_ID]}}/slurm_$SLURM_JOB_ID.out" 2>&1 || exit 1
# The point's own script (bash reads its #SBATCH lines as comments). This process stays the batch
# shell, so the USR1 Slurm sends before the end reaches that script's trap.
exec bash "${{scripts[$SLURM_ARRAY_TASK_ID]}}"
"""


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
        del args
        return self._submit([config])

    def launch_sweep(self, points: Any, configs: list[DictConfig], flags: list[str]) -> int:
        """A sweep is one job array, a run folder per point (see the module docstring)."""
        del points, flags
        return self._submit(configs)

    def _submit(self, configs: list[DictConfig]) -> int:
        from ml.launchers.stage import prepare_run
        from ml.run.locks import write_lock

        if self.config.submit and shutil.which("sbatch") is None:
            raise ConfigError(
                "sbatch not found: run `ml launch` where Slurm is installed, or set launcher.submit=false"
            )
        sbatch_options(self.config, RunDir(Path.cwd()))  # validated before anything is written
        runs: list[RunDir] = []
        releases: list[Callable[[], None]] = []
        try:
            for config in configs:
                run, release = prepare_run(config, stage=self.config.stage)
                runs.append(run)
                releases.append(release)
                atomic_write_text(run.sbatch_script, sbatch_script(self.config, run, Path.cwd()))
                run.sbatch_script.chmod(0o755)
            array = array_script(self.config, runs) if len(runs) > 1 else None
        except BaseException:
            for release in releases:
                release()
            raise
        if not self.config.submit:
            for run in runs:
                script = shlex.quote(str(run.sbatch_script))
                print(f"ml: wrote {script}; submit it with: sbatch {script}", file=sys.stderr)
            return 0
        for run in runs:
            write_lock(run, "scheduled")
        if array is None:
            command, stdin = ["sbatch", "--parsable", str(runs[0].sbatch_script)], None
        else:
            command, stdin = ["sbatch", "--parsable"], array  # the array's script is read from stdin
        result = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            for release in releases:
                release()
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise ConfigError(f"sbatch refused the job: {detail[0] if detail else result.returncode}")
        job_id = result.stdout.strip().split(";")[0]
        if array is None:
            print(f"ml: submitted Slurm job {job_id}", file=sys.stderr)
            print(f"ml: run directory   {runs[0].path}", file=sys.stderr)
            print(f"ml: job output      {runs[0].logs / f'slurm_{job_id}.out'}", file=sys.stderr)
        else:
            print(f"ml: submitted Slurm job array {job_id} of {len(runs)} runs:", file=sys.stderr)
            for i, run in enumerate(runs):
                print(f"ml:   {job_id}_{i}  {run.path}", file=sys.stderr)
        print(job_id)
        return 0
