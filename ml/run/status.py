"""Defines ``status.json``: how a run's last training session ended, for ``ml runs``.

Once a session's teardown is done (end hooks, lock removed, loggers closed), rank 0 atomically
writes::

    {"state": "finished", "step": 1500, "signal": null, "error": null, "reason": null, "elapsed_s": 61.2,
     "time": "2026-11-28T21:40:00+00:00", "pid": 4242, "host": "node7"}

``state`` is ``finished`` (the run completed: every step done, or early stopping ended it -
``reason`` says why - then final checkpoint, validation and test), ``interrupted`` (a stop
signal - ``signal`` names it - ended the run with its checkpoint;
also a second Ctrl-C, then ``error`` is ``"KeyboardInterrupt"`` and the checkpoint may be older than
``step``), or ``failed`` (any other exception; ``error`` is ``"<type>: <first line>"``).

While a session runs, the marker is provisional (``"state": "running"``, padded to keep room for
the final one: :func:`reserve_status`). Refused input (a :class:`ml.errors.UserError`) puts back
the marker of the previous session. A process killed with SIGKILL writes nothing more: the
provisional marker stays beside a stale ``.lock_running``, which readers give precedence.
"""

import datetime
import errno
import json
import os
import socket
from typing import Any

from ml.run.layout import RunDir
from ml.utils.atomic import atomic_write_text, read_regular

STATES = ("finished", "interrupted", "failed")
RUNNING = "running"  # the provisional marker of a session under way (see reserve_status)
RESERVED_BYTES = 1024  # room kept for the final marker, however full the disk gets meanwhile


def status_record(
    *,
    step: int,
    elapsed_s: float,
    signal: str | None,
    error: BaseException | None,
    finished: bool,
    reason: str | None = None,
) -> dict[str, Any]:
    """What ``status.json`` says of a session.

    Args:
        step: The step count at the end.
        elapsed_s: The run's training time.
        signal: The stop signal that arrived (its name), if any.
        error: The exception the session ended with, if any.
        finished: Whether the run completed (all its steps and its finish) before any signal.
        reason: Why a finished run ended before its limits (early stopping), if it did.
    """
    message = None
    if error is None:
        outcome = "finished" if finished or signal is None else "interrupted"
    elif isinstance(error, KeyboardInterrupt):  # a second Ctrl-C: stopped at once
        outcome, signal, message = "interrupted", "SIGINT", "KeyboardInterrupt"
    else:
        text = str(error).strip()
        first = text.splitlines()[0] if text else ""
        outcome, message = "failed", (f"{type(error).__name__}: {first}" if first else type(error).__name__)
    return {
        "state": outcome,
        "step": step,
        "signal": signal,
        "error": message,
        "reason": reason,
        "elapsed_s": round(float(elapsed_s), 3),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def reserve_status(run: RunDir, record: dict[str, Any]) -> bytes | None:
    """Writes a provisional marker (``state`` ``running``) padded to :data:`RESERVED_BYTES`.

    A disk that fills up during the session (the very failure worth recording) could refuse the
    final marker's new file; the final marker then overwrites this one in place, in the room it
    holds, so that ``ml runs`` still learns the run failed.

    Returns:
        The marker it replaced (None: there was none), for :func:`restore_status`.
    """
    try:
        previous: bytes | None = read_regular(run.status)
    except OSError:
        previous = None
    atomic_write_text(run.status, _text({**record, "state": RUNNING}).ljust(RESERVED_BYTES))
    return previous


def restore_status(run: RunDir, previous: bytes | None) -> None:
    """Puts back the marker :func:`reserve_status` replaced (a session that refused its input
    leaves the run as it was)."""
    if previous is None:
        run.status.unlink(missing_ok=True)
    else:
        atomic_write_text(run.status, previous.decode(errors="replace"))


def write_status(run: RunDir, record: dict[str, Any]) -> None:
    """Writes ``status.json`` atomically; on a full disk, in place over the reserved marker."""
    text = _text(record)
    try:
        atomic_write_text(run.status, text)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not _overwrite_in_place(run, text):
            raise


def _text(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2) + "\n"


def _overwrite_in_place(run: RunDir, text: str) -> bool:
    """Writes ``text`` over the existing marker's bytes (no new blocks needed); whether it fit."""
    data = text.encode()
    try:
        fd = os.open(run.status, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        if len(data) > size:
            return False
        os.write(fd, data.ljust(size))  # JSON readers ignore the trailing spaces
        os.fsync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def read_status(run: RunDir) -> dict[str, Any] | None:
    """The marker, or None when there is none or it is not a JSON object."""
    try:
        record = json.loads(read_regular(run.status))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
