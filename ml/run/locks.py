"""Defines a run's lock files: who holds them, how they are taken, and when one is stale.

A lock file (``.lock_running``, ``.lock_scheduled``, ``.lock_ckpt``) is a few ``key: value`` lines:
the owner's ``pid``, ``host`` and ``time``. It is written whole or not at all: the text goes to a
temporary file, is fsynced, and is then linked into place (an exclusive create: of two processes
racing for one lock exactly one wins), so a full disk cannot leave an empty lock behind.
"""

import datetime
import fcntl
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ml.errors import RunLockedError
from ml.run.layout import LockType, RunDir
from ml.utils.atomic import fsync_dir, open_append, read_regular

logger = logging.getLogger(__name__)

PID_MAX = 2**22  # Linux's PID_MAX_LIMIT: no process has a larger pid (nor one of os.kill's overflow)


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says about its owner."""

    pid: int | None
    host: str | None
    time: str | None

    @property
    def on_this_host(self) -> bool:
        return self.pid is not None and self.host == socket.gethostname()

    def is_stale(self) -> bool:
        """True when the owner ran on this host and its process no longer exists.

        A pid no process can have (past the kernel's limit) is of no live process either.
        """
        if self.pid is None or not self.on_this_host:
            return False
        if self.pid > PID_MAX:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    @property
    def owner(self) -> str:
        """``pid@host`` (``?`` for what the file does not say)."""
        return f"{self.pid if self.pid is not None else '?'}@{self.host or '?'}"


def parse_lock(text: str) -> LockInfo:
    """The owner a lock file's text names (fields it lacks are None)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    pid = fields.get("pid")
    return LockInfo(int(pid) if pid and pid.isdigit() else None, fields.get("host"), fields.get("time"))


def lock_text() -> str:
    """This process's lock: its pid, host and the time."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return f"pid: {os.getpid()}\nhost: {socket.gethostname()}\ntime: {now}\n"


def write_lock(run: RunDir, lock_type: LockType, *, exists_ok: bool = False) -> None:
    """Creates the lock, holding this process's pid, host and the time, whole or not at all.

    Raises:
        FileExistsError: The lock exists and ``exists_ok`` is false.
    """
    path = run.lock(lock_type)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # .lock_<type>.<random>.tmp: a temporary file take_running_lock's clean-up knows
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(lock_text())
            f.flush()
            os.fsync(f.fileno())
        if exists_ok:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the lock exists: an exclusive create of a whole file
    except FileExistsError:
        raise
    except OSError as e:  # the disk refused (full, read-only): say which file, leave none behind
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def remove_lock(run: RunDir, lock_type: LockType, *, missing_ok: bool = False) -> None:
    """Removes the lock.

    Raises:
        FileNotFoundError: It does not exist and ``missing_ok`` is false.
    """
    run.lock(lock_type).unlink(missing_ok=missing_ok)


def read_lock(run: RunDir, lock_type: LockType) -> LockInfo | None:
    """Parses the lock; None when there is none. One that cannot be read is a lock of unknown owner."""
    try:
        text = read_regular(run.lock(lock_type)).decode(errors="replace")
    except FileNotFoundError:
        return None
    except OSError:
        return LockInfo(None, None, None)
    return parse_lock(text)


def take_running_lock(run: RunDir) -> None:
    """Takes ``.lock_running`` for this process, so one run is never trained twice at once.

    A lock left by a process that died on this host is taken over; one held by a live process (or
    by a process on another host) raises :class:`RunLockedError`. Deciding and writing happen under
    an exclusive ``flock`` on ``.lock_guard``, so of several processes racing for the same run
    exactly one wins, stale lock or not. Taking a lock this process holds is a no-op.

    Then the temporary files of atomic writes (checkpoints, the link, config.yaml) that a process
    killed mid-write left are removed: only the lock holder writes here, so none of them is in use.
    """
    run.path.mkdir(parents=True, exist_ok=True)
    with open_append(run.lock_guard) as guard:
        fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
        holder = read_lock(run, "running")
        if holder is not None and (holder.pid, holder.host) == (os.getpid(), socket.gethostname()):
            return
        if holder is not None:
            if holder.pid is None:  # not written by ml (which writes locks whole): proof of nothing
                raise RunLockedError(
                    f"{run.lock('running')} names no owner (it is empty or not a lock ml wrote); "
                    "remove it if no process is training this run"
                )
            if not holder.is_stale():
                raise RunLockedError(
                    f"{run.path} is already being trained (pid {holder.pid} on {holder.host}); "
                    f"remove {run.lock('running')} if that process is gone"
                )
            logger.warning("Taking over the running lock of dead process %s", holder.pid)
        write_lock(run, "running", exists_ok=True)
    for folder in (run.path, run.checkpoints):
        for partial in folder.glob(".*.tmp"):
            partial.unlink(missing_ok=True)
