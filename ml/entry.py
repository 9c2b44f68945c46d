"""The ``ml`` console command's first code: it listens for stop signals before importing the rest.

A SIGTERM or SIGUSR1 that arrives while ``ml`` is starting is kept for the trainer (see
:mod:`ml.utils.signals`). Listening here, before :mod:`ml.cli` and its imports load, leaves only the
interpreter's own start-up outside. The recorder stays until the command's work is done; then stop
signals are ignored until the process exits, so a signal that lands during the interpreter's
shutdown (which would otherwise restore the default handlers: death by the signal) cannot change
the exit code, which is the run's.

While the command imports torch, Python's garbage collector runs less often (:mod:`ml.utils.startup_gc`).

It also puts the current directory first on ``sys.path``, as ``python -m`` does, so that ``ml train``
finds a config's ``mypkg.models:MyModel`` in the folder it runs in. The processes of a launched
job find it too: torchrun and Slurm start each one as ``python -m ml.entry`` in that folder, and the
``mp`` launcher's spawned processes (given their parent's ``sys.path``) run :func:`main` there.
"""

import os
import signal
import sys

from ml.utils.signals import enable_startup_watchdog, listen_early
from ml.utils.startup_gc import collect_less_while_importing

listen_early()
collect_less_while_importing()  # until components are built: a fifth of torch's import was collecting


def import_from_current_directory() -> None:
    """The current directory first on ``sys.path``, as ``python -m`` has it (the console script has
    its own folder there instead); not under ``python -P`` / ``PYTHONSAFEPATH``, which ask for neither."""
    if sys.flags.safe_path:
        return
    try:
        cwd = os.getcwd()
    except OSError:  # the folder was deleted under us: nothing to import from
        return
    if sys.path[:1] not in ([cwd], [""]):
        sys.path.insert(0, cwd)


def main() -> int:
    """Runs :func:`ml.cli.main`; returns its exit code."""
    import_from_current_directory()
    from ml.cli import main as cli_main

    enable_startup_watchdog()  # this process is the ml command's: a stuck start-up must end on a signal
    code = cli_main()
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # nothing is left to stop
        signal.signal(sig, signal.SIG_IGN)
    return code


if __name__ == "__main__":  # python -m ml.entry (torchrun and srun start each worker so)
    sys.exit(main())
