"""The ``ml`` console command's first code: it listens for stop signals before importing the rest.

A SIGTERM or SIGUSR1 that arrives while ``ml`` is starting is kept for the trainer (see
:mod:`ml.utils.signals`). Listening here, before :mod:`ml.cli` and its imports load, leaves only the
interpreter's own start-up outside. The recorder stays until the process exits: a signal that
lands after training (the last writes, the interpreter's shutdown) is kept, not fatal, so the
exit code is the run's.
"""

from ml.utils.signals import listen_early

listen_early()


def main() -> int:
    """Runs :func:`ml.cli.main`."""
    from ml.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":  # python -m ml.entry (torchrun starts each worker so)
    import sys

    sys.exit(main())
