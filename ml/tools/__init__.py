"""Commands for living with runs: ``ml runs``, ``ml plot``, ``ml diff``, ``ml export``, ``ml tensorboard``.

Each module has ``main(argv: list[str]) -> int`` (the exit code), called by :mod:`ml.cli` with the
arguments after the command's name. Input the user can fix raises :class:`ml.errors.BadInput` (a
:class:`ml.errors.UserError`), which the command line reports as one ``ml: error: ...`` line with
exit code 2 (``--debug`` shows the traceback). What they know of a run folder comes from
:mod:`ml.run`. Heavy libraries (torch, matplotlib, tensorboard) are imported inside the command that
needs them, so ``ml runs`` and ``ml diff`` answer without importing torch.
"""

import argparse
from typing import NoReturn

from ml.errors import BadInput

# ``ml <name>`` runs ``ml.tools.<name>.main``.
TOOLS: tuple[str, ...] = ("runs", "plot", "diff", "export", "tensorboard")


class ArgumentParser(argparse.ArgumentParser):
    """Reports a bad command line as one ``ml: error:`` line (argparse would print the usage too)."""

    def error(self, message: str) -> NoReturn:
        raise BadInput(message)


def tool_parser(command: str, description: str) -> argparse.ArgumentParser:
    """An argument parser for ``ml <command>`` whose errors are one ``ml: error:`` line (exit 2)."""
    parser = ArgumentParser(prog=f"ml {command}", description=description, allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser
