"""The ``ml`` console command's first code: it listens for stop signals before importing the rest.

A SIGTERM or SIGUSR1 that arrives while ``ml`` is starting is kept for the trainer (see
:mod:`ml.utils.signals`). Listening here, before :mod:`ml.cli` and its imports load, leaves only the
interpreter's own start-up outside. The recorder stays until the command's work is done; then stop
signals are ignored until the process exits, so a signal that lands during the interpreter's
shutdown (which would otherwise restore the default handlers: death by the signal) cannot change
the exit code, which is the run's.
"""

import signal

from ml.utils.signals import enable_startup_watchdog, listen_early

listen_early()


def main() -> int:
    """Runs :func:`ml.cli.main`; returns its exit code."""
    from ml.cli import main as cli_main

    enable_startup_watchdog()  # this process is the ml command's: a stuck start-up must end on a signal
    code = cli_main()
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # nothing is left to stop
        signal.signal(sig, signal.SIG_IGN)
    return code


if __name__ == "__main__":  # python -m ml.entry (torchrun and srun start each worker so)
    import sys

    sys.exit(main())
