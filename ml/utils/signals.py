"""Defines how stop signals that arrive before training are kept, and how they end a stuck start-up.

``ml`` spends a second or more starting (imports, config, data) before the trainer installs its
handlers. :func:`listen_early` records a SIGTERM or SIGUSR1 received in that time instead of letting
it kill the process; the trainer then takes it with :func:`take_early_signal` and stops at once,
with a checkpoint, like for a signal received during training. After training, the recorder is in
place again (until the process exits), so a late signal cannot cut the last writes short either.

A start-up that does not finish - a data set that never loads, a file that never opens - must not
make the ``ml`` process immune to signals, or neither ``timeout`` nor Slurm could end it. So in the
``ml`` command's own process (:func:`enable_startup_watchdog`, called by :mod:`ml.entry`; never in
a program that trains through the Python API, whose process is its own), a stop signal received
before training began (before the trainer has resumed or started its run) arms a watchdog: unless
training begins within :func:`startup_stop_grace_s` seconds (60; the ``ML_STARTUP_STOP_GRACE_S``
environment variable sets another), the process ends with exit code 128 + the signal's number,
saying so. Nothing has been trained by then, so nothing is lost; the run's lock, if already taken,
is left to the next process, which takes over a dead owner's lock.
"""

import os
import signal
import sys
import threading
from signal import Signals
from typing import Any

EARLY_SIGNALS = (Signals.SIGTERM, Signals.SIGUSR1)
STARTUP_STOP_GRACE_ENV = "ML_STARTUP_STOP_GRACE_S"
DEFAULT_STARTUP_STOP_GRACE_S = 60.0
_received: Signals | None = None
_watchdog: threading.Timer | None = None
_watchdog_enabled = False  # only in the ml command's process (ml.entry)
_training = False


def _record(signum: int, frame: Any) -> None:
    del frame
    global _received
    if _received is None:
        _received = Signals(signum)
    arm_watchdog(Signals(signum))


def listen_early() -> dict[Signals, Any]:
    """Records SIGTERM and SIGUSR1 from now on; returns the handlers it replaced (to restore them)."""
    previous: dict[Signals, Any] = {}
    try:
        for sig in EARLY_SIGNALS:
            previous[sig] = signal.signal(sig, _record)
    except ValueError:  # not the main thread
        pass
    return previous


def restore(previous: dict[Signals, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def take_early_signal() -> Signals | None:
    """The first stop signal recorded since :func:`listen_early` (forgotten once taken)."""
    global _received
    sig, _received = _received, None
    return sig


def startup_stop_grace_s() -> float:
    """How long a stop signal waits for training to begin before it ends the process."""
    try:
        return max(0.0, float(os.environ.get(STARTUP_STOP_GRACE_ENV, DEFAULT_STARTUP_STOP_GRACE_S)))
    except ValueError:
        return DEFAULT_STARTUP_STOP_GRACE_S


def enable_startup_watchdog() -> None:
    """Lets a stop signal end this process if start-up never finishes (the ``ml`` command's own)."""
    global _watchdog_enabled
    _watchdog_enabled = True


def arm_watchdog(sig: Signals) -> None:
    """After a stop signal: unless training begins (or has) within the grace, the process ends."""
    global _watchdog
    if not _watchdog_enabled or _training or _watchdog is not None:
        return
    _watchdog = threading.Timer(startup_stop_grace_s(), _end_stuck_startup, args=(sig,))
    _watchdog.daemon = True
    _watchdog.start()


def training_began() -> None:
    """Training has begun: stop signals are the trainer's from now on (the watchdog stands down)."""
    global _training
    _training = True
    stand_down()


def stand_down() -> None:
    """Cancels an armed watchdog (a trainer whose session ended, trained or not, calls it)."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.cancel()
        _watchdog = None


def _end_stuck_startup(sig: Signals) -> None:
    if _training:
        return
    print(
        f"ml: stopped by {sig.name} during start-up, which did not finish within "
        f"{startup_stop_grace_s():g} s (nothing was trained)",
        file=sys.stderr,
        flush=True,
    )
    os._exit(128 + int(sig))


def isolate_from_stop_signals(worker_id: int) -> None:
    """A data-loader worker's start (``worker_init_fn``): stop signals are the main process's.

    A signal sent to a whole process group (torchrun's to its ranks, ``timeout``'s, a terminal's
    Ctrl-C) reached the workers too; torch's SIGTERM handler in a worker ends it unless the main
    process sent it, and the main process then failed with "DataLoader worker ... is killed by
    signal" instead of stopping at the step with a checkpoint. So the worker leaves the main
    process's group, and ignores SIGINT and SIGUSR1 sent to it alone. SIGTERM keeps torch's
    handler: the main process ends its workers with it (and a worker whose main process died
    ends on its own: torch watches the parent).
    """
    del worker_id
    os.setpgid(0, 0)
    for sig in (Signals.SIGINT, Signals.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
