"""Defines how stop signals that arrive before training listens are kept, not lost.

``ml`` spends a second or more starting (imports, config, data) before the trainer installs its
handlers. :func:`listen_early` records a SIGTERM or SIGUSR1 received in that time instead of letting
it kill the process; the trainer then takes it with :func:`take_early_signal` and stops at once,
with a checkpoint, like for a signal received during training. After training, the recorder is in
place again, so a late signal cannot cut the last writes short either.
"""

import signal
from signal import Signals
from typing import Any

EARLY_SIGNALS = (Signals.SIGTERM, Signals.SIGUSR1)
_received: Signals | None = None


def _record(signum: int, frame: Any) -> None:
    del frame
    global _received
    if _received is None:
        _received = Signals(signum)


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
