"""Defines ``status.json``: how a run's last training session ended, for ``ml runs``.

Once a session's teardown is done (end hooks, lock removed, loggers closed), rank 0 atomically
writes::

    {"state": "finished", "step": 1500, "signal": null, "error": null, "elapsed_s": 61.2,
     "time": "2026-11-28T21:40:00+00:00", "pid": 4242, "host": "node7"}

``state`` is ``finished`` (the run completed: every step done, final checkpoint, validation and
test), ``interrupted`` (a stop signal - ``signal`` names it - ended the run with its checkpoint;
also a second Ctrl-C, then ``error`` is ``"KeyboardInterrupt"`` and the checkpoint may be older than
``step``), or ``failed`` (any other exception; ``error`` is ``"<type>: <first line>"``).

Refused input (a :class:`ml.errors.UserError`) leaves the marker of the previous session as it was.
A process killed with SIGKILL writes nothing: the old marker stays beside a stale ``.lock_running``,
which readers give precedence.
"""

import datetime
import json
import os
import socket
from typing import Any

from ml.run.layout import RunDir
from ml.utils.atomic import atomic_write_text

STATES = ("finished", "interrupted", "failed")


def status_record(
    *, step: int, elapsed_s: float, signal: str | None, error: BaseException | None, finished: bool
) -> dict[str, Any]:
    """What ``status.json`` says of a session.

    Args:
        step: The step count at the end.
        elapsed_s: The run's training time.
        signal: The stop signal that arrived (its name), if any.
        error: The exception the session ended with, if any.
        finished: Whether the run completed (all its steps and its finish) before any signal.
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
        "elapsed_s": round(float(elapsed_s), 3),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def write_status(run: RunDir, record: dict[str, Any]) -> None:
    """Writes ``status.json`` atomically."""
    atomic_write_text(run.status, json.dumps(record, indent=2) + "\n")


def read_status(run: RunDir) -> dict[str, Any] | None:
    """The marker, or None when there is none or it is not a JSON object."""
    try:
        record = json.loads(run.status.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
