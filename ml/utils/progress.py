"""Defines :func:`progress`: a terminal progress bar for long phases, silent when not a TTY."""

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

_T = TypeVar("_T")


def progress(
    items: Iterable[_T], *, total: int | None, description: str, enabled: bool = True
) -> Iterator[_T]:
    """Yields ``items``, drawing a tqdm bar on stderr when it is a terminal and ``enabled``."""
    if not enabled or not sys.stderr.isatty():
        yield from items
        return
    from tqdm import tqdm  # imported only when a bar is drawn

    yield from tqdm(items, total=total, desc=description, leave=False, dynamic_ncols=True, file=sys.stderr)
