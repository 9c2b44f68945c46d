"""The ``ml`` console command's first code: it listens for stop signals before importing the rest.

A SIGTERM or SIGUSR1 that arrives while ``ml`` is starting is kept for the trainer (see
:mod:`ml.utils.signals`). Listening here, before :mod:`ml.cli` and its imports load, leaves only the
interpreter's own start-up outside.
"""

from ml.utils.signals import listen_early, restore

_EARLY = listen_early()


def main() -> int:
    """Runs :func:`ml.cli.main`, then puts back the handlers the process started with."""
    try:
        from ml.cli import main as cli_main

        return cli_main()
    finally:
        restore(_EARLY)


if __name__ == "__main__":  # python -m ml.entry (torchrun starts each worker so)
    import sys

    sys.exit(main())
