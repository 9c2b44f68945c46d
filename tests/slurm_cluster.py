"""A real one-node Slurm cluster on this machine, for tests that submit real jobs.

``ensure_slurm_installed()`` installs Debian's ``slurm-wlm`` when the daemons are missing, and
``SlurmCluster`` writes a private ``slurm.conf`` into a fresh temporary folder and runs ``slurmctld`` and
``slurmd`` from it (``auth/none`` + ``cred/none``, so no munge; no cgroups; free ports on 127.0.0.1), so
tests never touch a system-wide Slurm configuration. Pass ``cluster.env`` (or ``env=`` built from it) to
every Slurm client command (``sbatch``, ``squeue``, ``scontrol``, ``scancel``); the helpers on the
cluster do that for you.

Typical use::

    with SlurmCluster() as cluster:
        job_id = cluster.submit(script)
        cluster.wait_for_state(job_id, "COMPLETED", timeout=30)
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = [
    "TERMINAL_STATES",
    "SlurmCluster",
    "SlurmError",
    "ensure_slurm_installed",
    "parse_scontrol_record",
    "reap_orphaned_clusters",
]

_DAEMONS = ("slurmctld", "slurmd", "slurmstepd")
_CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
_SLURM_BINARIES = _DAEMONS + _CLIENTS
_INSTALL_LOCK = "/tmp/ml-tests-slurm-install.lock"
_INSTALL_TIMEOUT_S = 900.0
_install_result: tuple[str | None] | None = None  # (reason,) once computed in this process

# Job states after which a job never runs again by itself. A requeued job goes RUNNING -> COMPLETING
# (until its processes are gone) -> PENDING, never through these.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
# Each cluster lives in a temporary folder named so, which holds a lock file its owner keeps flocked.
_ROOT_PREFIX = "ml-slurm-"
_OWNER_LOCK = "owner.lock"
# Client environment variables that would leak an outer Slurm job into the test cluster's commands.
_LEAKY_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCANCEL_")


class SlurmError(RuntimeError):
    """A Slurm command or daemon did not do what a test needed."""


# ---------------------------------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------------------------------


def _search_path() -> str:
    """PATH plus the sbin folders, where Debian puts the daemons."""
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def _which(name: str) -> str | None:
    """Absolute path of a Slurm program, looking in the sbin folders too."""
    return shutil.which(name, path=_search_path())


def _missing_binaries() -> list[str]:
    """Names of the Slurm programs that cannot be found."""
    return [name for name in _SLURM_BINARIES if _which(name) is None]


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``apt-get`` non-interactively and capture its output."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(
        ["apt-get", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=_INSTALL_TIMEOUT_S,
        check=False,
    )


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    """The last non-empty line a command printed, for one-line error messages."""
    lines = [line for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {result.returncode}"


def _lists_missing(result: subprocess.CompletedProcess[str]) -> bool:
    """Whether an ``apt-get install`` failed because the package lists are missing or stale."""
    text = result.stderr + result.stdout
    return any(
        marker in text
        for marker in ("Unable to locate package", "has no installation candidate", "404", "Failed to fetch")
    )


def _install_slurm() -> str | None:
    """Install ``slurm-wlm`` with apt-get when needed; None on success, else why it could not."""
    missing = _missing_binaries()
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(missing)} missing) and installing it needs root"
    if shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get"
    install = ("install", "-y", "--no-install-recommends", "slurm-wlm")
    try:
        result = _apt_get(*install)
        if result.returncode != 0 and _lists_missing(result):
            update = _apt_get("update")
            if update.returncode != 0:
                return f"apt-get update failed: {_last_line(update)}"
            result = _apt_get(*install)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get install slurm-wlm failed: {exc}"
    if result.returncode != 0:
        return f"apt-get install slurm-wlm failed: {_last_line(result)}"
    missing = _missing_binaries()
    if missing:
        return f"slurm-wlm was installed but {', '.join(missing)} is still missing"
    return None


def ensure_slurm_installed() -> str | None:
    """Make sure the Slurm daemons and client tools exist, installing ``slurm-wlm`` if needed.

    Returns None when Slurm is usable, else a one-line reason to ``pytest.skip`` with. The answer is
    cached for the process; concurrent callers in other processes are serialised with an flock on a file
    in /tmp, so two pytest runs never run apt-get at the same time.
    """
    global _install_result
    if _install_result is None and not _missing_binaries():
        _install_result = (None,)  # nothing to install: no lock needed (nor write access to it)
    if _install_result is None:
        try:
            with open(_INSTALL_LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    _install_result = (_install_slurm(),)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except OSError as exc:
            _install_result = (f"cannot lock {_INSTALL_LOCK} to install Slurm: {exc}",)
    return _install_result[0]


# ---------------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _total_memory_mb() -> int:
    """Physical memory in MiB as /proc/meminfo reports it (what slurmd will detect)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def _die_with_parent() -> None:
    """In a child before exec: get SIGKILL when the parent dies (Linux ``PR_SET_PDEATHSIG``).

    So a hard-killed pytest (SIGKILL, or SIGTERM without atexit) does not leave daemons behind.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 == PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path.name} missing)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path.name} empty)"


def parse_scontrol_record(line: str) -> dict[str, str]:
    """Parse one ``scontrol show ... -o`` line (``Key=value Key2=value two ...``) into a dict.

    Values may contain spaces (``JobName=a b``): a value runs until the next `` Key=``.
    """
    keys = list(re.finditer(r"(?:^|\s)([A-Za-z][\w:/]*)=", line))
    record: dict[str, str] = {}
    for index, match in enumerate(keys):
        end = keys[index + 1].start() if index + 1 < len(keys) else len(line)
        record[match.group(1)] = line[match.end() : end].strip()
    return record


class SlurmCluster:
    """A private one-node Slurm cluster (``slurmctld`` + ``slurmd``) in a fresh temporary folder.

    Use it as a context manager, or call ``start()`` and ``stop()``. ``stop()`` kills every job process
    (slurmstepd and tasks, which outlive slurmd, found by this cluster's ``SLURM_CONF``), ends both
    daemons (SIGTERM, then SIGKILL) and removes the folder; it also runs at interpreter exit.

    ``cpus`` defaults to ``os.cpu_count()``; a larger value declares more CPUs than the machine has
    (``SlurmdParameters=config_overrides``) so that wide jobs fit. ``oversubscribe`` lets that many jobs
    share each CPU (``OverSubscribe=FORCE:n``), so a test's job is not held behind another's. ``kill_wait``
    is ``KillWait``: seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or times out
    (while a job is COMPLETING, this one node takes no new job). ``cred_expire`` (Slurm's default 120,
    minimum 5) is how long a requeued job waits before it is eligible again; ``release()`` skips that
    wait. Extra ``slurm.conf`` lines go in ``extra_conf``.
    """

    def __init__(
        self,
        *,
        cluster_name: str = "mltest",
        partition: str = "debug",
        cpus: int | None = None,
        oversubscribe: int = 4,
        real_memory_mb: int | None = None,
        kill_wait: int = 30,
        cred_expire: int | None = None,
        start_timeout: float = 60.0,
        extra_conf: Sequence[str] = (),
    ) -> None:
        self.cluster_name = cluster_name
        self.partition = partition
        self.node_name = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.oversubscribe = oversubscribe
        self.real_memory_mb = real_memory_mb or max(1, _total_memory_mb() // 2)  # below what slurmd finds
        self.kill_wait = kill_wait
        self.cred_expire = cred_expire
        self.start_timeout = start_timeout
        self.extra_conf = list(extra_conf)
        self.root: Path | None = None
        self.start_seconds: float | None = None  # how long start() took
        self._daemons: dict[str, subprocess.Popen[bytes]] = {}
        self._env: dict[str, str] | None = None
        self._owner_lock: IO[str] | None = None  # flocked while this process owns the cluster

    # -- lifecycle -----------------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def conf_path(self) -> Path:
        """The cluster's slurm.conf."""
        return self._require_root() / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm client commands: this process's, minus outer ``SLURM_*`` variables,
        plus ``SLURM_CONF`` pointing at this cluster. Jobs inherit it (``sbatch --export=ALL``)."""
        if self._env is None:
            raise SlurmError("the Slurm cluster is not started")
        return dict(self._env)

    def _require_root(self) -> Path:
        if self.root is None:
            raise SlurmError("the Slurm cluster is not started")
        return self.root

    def start(self) -> SlurmCluster:
        """Write the configuration, start both daemons and wait until the node is idle."""
        if self.root is not None:
            raise SlurmError("the Slurm cluster is already started")
        reason = ensure_slurm_installed()
        if reason is not None:
            raise SlurmError(reason)
        began = time.monotonic()
        reap_orphaned_clusters()
        self.root = Path(tempfile.mkdtemp(prefix=_ROOT_PREFIX))
        atexit.register(self.stop)
        try:
            # Lock first, then give the file its name: a reaper never sees it unlocked while we live.
            self._owner_lock = open(self.root / f"{_OWNER_LOCK}.new", "w")  # noqa: SIM115 (held until stop)
            fcntl.flock(self._owner_lock, fcntl.LOCK_EX)
            os.rename(self.root / f"{_OWNER_LOCK}.new", self.root / _OWNER_LOCK)
            self._write_conf()
            env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_ENV_PREFIXES)}
            env["SLURM_CONF"] = str(self.conf_path)
            self._env = env
            self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf_path))
            self._wait(self._controller_up, "slurmctld to answer")
            self._spawn("slurmd", "-D", "-f", str(self.conf_path), "-N", self.node_name)
            self._wait(self._node_idle, f"node {self.node_name} to be idle")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def _write_conf(self) -> None:
        root = self._require_root()
        for sub in ("state", "spool"):
            (root / sub).mkdir()
        ctld_port, slurmd_port = _free_ports(2)
        overrides = ""
        if self.cpus > (os.cpu_count() or 1):
            overrides = "SlurmdParameters=config_overrides"
        oversubscribe = f"FORCE:{self.oversubscribe}" if self.oversubscribe > 1 else "NO"
        lines = [
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={self.node_name}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/none",
            "CredType=cred/none",  # cred/munge (the default) needs munged even with auth/none
            *([f"AuthInfo=cred_expire={self.cred_expire}"] if self.cred_expire is not None else []),
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"PlugStackConfig={root / 'plugstack.conf'}",  # not /etc/slurm's
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # Defaults are 3 s and 60 s: a job queued behind another would start ~3 s late, and one whose
            # BeginTime passed (a requeued job) would wait up to a minute for the next full scheduling pass.
            "SchedulerParameters=batch_sched_delay=0,sched_interval=2",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "JobRequeue=1",
            f"KillWait={self.kill_wait}",
            "SlurmctldTimeout=10",
            "SlurmdTimeout=20",
            "InactiveLimit=0",
            "MinJobAge=60",
            "Waittime=0",
            overrides,
            f"NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={self.real_memory_mb} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP "
            f"OverSubscribe={oversubscribe}",
            *self.extra_conf,
        ]
        (root / "slurm.conf").write_text("\n".join(line for line in lines if line) + "\n")
        (root / "plugstack.conf").write_text("")

    def _spawn(self, daemon: str, *args: str) -> None:
        root = self._require_root()
        program = _which(daemon)
        if program is None:
            raise SlurmError(f"{daemon} not found")
        with open(root / f"{daemon}.out", "wb") as out:
            self._daemons[daemon] = subprocess.Popen(
                [program, *args],
                env=self._env,
                cwd=root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        """Poll ``ready()`` until true, failing early when a daemon dies and late with the logs."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            for name, proc in self._daemons.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with status {proc.returncode}\n{self.logs()}")
            if ready():
                return
            if time.monotonic() > deadline:
                timeout = f"{self.start_timeout:.0f} s"
                raise SlurmError(f"timed out after {timeout} waiting for {what}\n{self.logs()}")
            time.sleep(0.2)

    def _controller_up(self) -> bool:
        result = self.run("scontrol", "ping", check=False, timeout=10)
        return result.returncode == 0 and "UP" in result.stdout

    def _node_idle(self) -> bool:
        result = self.run("sinfo", "-h", "-N", "-n", self.node_name, "-o", "%T", check=False, timeout=10)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def logs(self, lines: int = 25) -> str:
        """The tails of the daemons' log files, for error messages."""
        if self.root is None:
            return "(no logs: the cluster is not started)"
        parts = []
        for name in ("slurmctld.log", "slurmctld.out", "slurmd.log", "slurmd.out"):
            parts.append(f"--- {name} ---\n{_tail(self.root / name, lines)}")
        return "\n".join(parts)

    def stop(self, timeout: float = 10.0) -> None:
        """Kill all job processes, end both daemons (SIGTERM, SIGKILL after ``timeout``), remove the folder.

        Job processes are found by this cluster's ``SLURM_CONF`` in their environment (and as their
        descendants). Safe to call twice and after a failed start.
        """
        if self.root is None:
            return
        root = self.root
        conf = str(root / "slurm.conf")
        try:
            # Jobs first: slurmd is slow to exit while it still has steps, and the steps outlive it anyway.
            daemons = [proc.pid for proc in self._daemons.values() if proc.poll() is None]
            _kill_processes_with_env("SLURM_CONF", conf, spare=daemons)
            for name in ("slurmd", "slurmctld"):
                proc = self._daemons.get(name)
                if proc is not None:
                    _terminate(proc, timeout)
            _kill_processes_with_env("SLURM_CONF", conf)
        finally:
            self._daemons.clear()
            self._env = None
            self.root = None
            atexit.unregister(self.stop)
            shutil.rmtree(root, ignore_errors=True)
            if self._owner_lock is not None:
                self._owner_lock.close()
                self._owner_lock = None

    # -- client commands -----------------------------------------------------------------------------

    def run(
        self,
        *cmd: str,
        check: bool = True,
        timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster and capture its output.

        ``env`` adds variables on top of ``self.env``; ``cwd`` is where it runs (sbatch makes it the job's
        working directory). With ``check`` a non-zero exit raises SlurmError.
        """
        full_env = self.env
        if env:
            full_env.update(env)
        result = subprocess.run(
            list(cmd),
            env=full_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed: {_last_line(result)}")
        return result

    def submit(
        self,
        script_path: str | os.PathLike[str],
        *args: str,
        options: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> int:
        """Submit a batch script (``sbatch --parsable [options] script [args]``) and return its job id.

        ``args`` are the script's arguments, ``options`` extra sbatch options, ``env`` extra environment
        variables (the job inherits the whole environment), ``cwd`` the job's working directory (default:
        this process's).
        """
        result = self.run("sbatch", "--parsable", *options, str(script_path), *args, env=env, cwd=cwd)
        first = result.stdout.strip().split(";")[0]
        if not first.isdigit():
            raise SlurmError(f"sbatch printed no job id: {result.stdout.strip()!r} {result.stderr.strip()!r}")
        return int(first)

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o <id>`` as a dict (for a requeued job: the current run)."""
        line = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout.strip().splitlines()
        if not line:
            raise SlurmError(f"scontrol show job {job_id} printed nothing")
        return parse_scontrol_record(line[0])

    def job_state(self, job_id: int) -> str:
        """The job's state, e.g. ``PENDING``, ``RUNNING``, ``COMPLETED`` (flags like ``+`` dropped)."""
        return self.job_info(job_id).get("JobState", "UNKNOWN").rstrip("+")

    def wait_for_state(self, job_id: int, states: str | Iterable[str], timeout: float = 60.0) -> str:
        """Poll until the job is in one of ``states``; return that state.

        Fails at once when the job reaches a terminal state that was not asked for, and at the deadline
        with the job's state and reason.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState", "UNKNOWN").rstrip("+")
            if state in wanted:
                return state
            if state in TERMINAL_STATES:
                raise SlurmError(
                    f"job {job_id} ended {state} (reason {info.get('Reason')}, exit {info.get('ExitCode')}) "
                    f"while waiting for {'/'.join(sorted(wanted))}"
                )
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"job {job_id} still {state} (reason {info.get('Reason')}) after {timeout:.0f} s "
                    f"waiting for {'/'.join(sorted(wanted))}"
                )
            time.sleep(0.1)

    def release(self, job_id: int) -> None:
        """Let a pending job start in a second (a requeued job otherwise waits ~2 min for its BeginTime).

        Not ``starttime=now``: slurmd refuses a job's launch credential issued in the same second as the
        requeue revoked the previous one (``ctime <= revoked``), and the job then FAILS with "Job credential
        revoked"; one second later is always safe.
        """
        self.run("scontrol", "update", f"jobid={job_id}", "starttime=now+1")

    def requeue(self, job_id: int) -> None:
        """``scontrol requeue <id>``."""
        self.run("scontrol", "requeue", str(job_id))

    def signal_batch(self, job_id: int, sig: str = "USR1") -> None:
        """Send a signal to the job's batch shell only (``scancel --signal=<sig> --batch <id>``)."""
        self.run("scancel", f"--signal={sig}", "--batch", str(job_id))

    def signal(self, job_id: int, sig: str = "USR1") -> None:
        """Send a signal to the job's steps (``scancel --signal=<sig> <id>``): srun tasks, not the shell."""
        self.run("scancel", f"--signal={sig}", str(job_id))

    def cancel(self, job_id: int) -> None:
        """``scancel <id>``."""
        self.run("scancel", str(job_id))

    def cancel_all(self) -> None:
        """``scancel`` every job still queued, running or completing (does not wait for them to end)."""
        ids = self.run("squeue", "-h", "-o", "%i").stdout.split()
        if ids:
            self.run("scancel", *ids, check=False)

    def restart_count(self, job_id: int) -> int:
        """How many times the job has been requeued (``Restarts=`` in scontrol)."""
        return int(self.job_info(job_id).get("Restarts", "0"))


def reap_orphaned_clusters() -> list[Path]:
    """Kill what is left of clusters whose owning process died without ``stop()`` (SIGKILL, os._exit).

    A cluster's folder holds a lock file that its owner keeps flocked; if the lock can be taken, the owner
    is gone, so every process with that folder's ``SLURM_CONF`` is killed and the folder removed. The
    daemons die with their owner already (``PR_SET_PDEATHSIG``); job steps and tasks do not. Returns the
    folders reaped.
    """
    reaped = []
    for root in Path(tempfile.gettempdir()).glob(f"{_ROOT_PREFIX}*"):
        try:
            lock = open(root / _OWNER_LOCK)  # noqa: SIM115
        except OSError:
            continue  # being created right now (or not ours)
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            _kill_processes_with_env("SLURM_CONF", str(root / "slurm.conf"))
            shutil.rmtree(root, ignore_errors=True)
            reaped.append(root)
    return reaped


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a daemon's process group, then SIGKILL it if it has not exited within ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


def _process_table() -> dict[int, tuple[int, str]]:
    """``pid -> (parent pid, state letter)`` for every process we can see."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces and parens
        table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def _descendants(table: dict[int, tuple[int, str]], roots: set[int]) -> set[int]:
    """``roots`` and every process below them."""
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def _pids_with_env(name: str, value: str, spare: Iterable[int] = ()) -> set[int]:
    """Live processes started with ``name=value`` in their environment, plus all their descendants.

    Never this process or its ancestors, nor the ``spare`` processes and their descendants.
    """
    needle = f"{name}={value}".encode()
    table = _process_table()
    protected = _descendants(table, set(spare))
    pid = os.getpid()
    while pid > 1 and pid not in protected:
        protected.add(pid)
        pid = table.get(pid, (0, ""))[0]
    found: set[int] = set()
    for pid, (_, state) in table.items():
        if pid in protected or state in "ZX":
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.add(pid)
    # Descendants too, e.g. the tasks of a job submitted with --export=NONE.
    return {pid for pid in _descendants(table, found) if pid not in protected and table[pid][1] not in "ZX"}


def _kill_processes_with_env(name: str, value: str, spare: Iterable[int] = (), timeout: float = 5.0) -> None:
    """SIGKILL every process started with ``name=value`` in its environment and wait for them to go.

    Job steps (slurmstepd) and job tasks are daemonised away from slurmd, so killing the daemons does not
    end them; each carries the cluster's unique ``SLURM_CONF``.
    """
    deadline = time.monotonic() + timeout
    while True:
        pids = _pids_with_env(name, value, spare)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
