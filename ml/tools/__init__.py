"""Commands for living with runs: ``ml runs``, ``ml plot``, ``ml diff``, ``ml export``, ``ml tensorboard``.

Each module has ``main(argv: list[str]) -> int`` (the exit code), called by :mod:`ml.cli` with the
arguments after the command's name. Input the user can fix raises :class:`ml.cli.BadInput`, which
the command line reports as one ``ml: error: ...`` line with exit code 2 (``--debug`` shows the
traceback). Heavy libraries (torch, matplotlib, tensorboard) are imported inside the command that
needs them, so ``ml runs`` and ``ml diff`` answer without importing torch.
"""

import argparse


def tool_parser(command: str, description: str) -> argparse.ArgumentParser:
    """An argument parser for ``ml <command>`` whose errors are one ``ml: error:`` line (exit 2)."""
    from ml.cli import _ArgumentParser

    parser = _ArgumentParser(prog=f"ml {command}", description=description, allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser
