"""What a run's lock file (``.lock_running``, ``.lock_scheduled``, ``.lock_ckpt``) says about its owner.

A lock file is a few ``key: value`` lines: the owner's ``pid``, ``host`` and ``time``. Kept apart from
:mod:`ml.trainers.base` (which takes and releases locks) so that ``ml runs`` can read them without
importing torch.
"""

import os
import socket
from dataclasses import dataclass


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
        """True when the owner ran on this host and its process no longer exists."""
        if self.pid is None or not self.on_this_host:
            return False
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
