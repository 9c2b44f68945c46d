"""Shared pieces of the fault-injection suite: reading a run's files, waiting on processes, reporting.

The runs themselves are driven with the helpers of ``tests/e2e/test_resume.py`` (``Run`` starts
``ml train`` with ``tests/e2e`` on ``PYTHONPATH`` and continues it from ``<exp_dir>/config.yaml``)
and ``tests/e2e/test_rl.py``; the task that records its sample indices is
``tests/e2e/resume_task.py``. This module only adds what the fault-injection tests need on top:
a snapshot of the checkpoint folder after a fault, checks on it, waiting with a deadline, and a
collector of invariant violations, so that one run reports every broken invariant it met instead
of stopping at the first.
"""

import json
import os
import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.resume_task import read_indices
from tests.e2e.test_resume import _load

__all__ = [
    "DiskState",
    "Violations",
    "checkpoint_problems",
    "ckpt_state",
    "disk_state",
    "file_size",
    "grown",
    "indices_steps",
    "new_partial_checkpoint",
    "partial_checkpoints",
    "poll",
    "print_table",
    "resumed_step",
    "sleep_while_running",
    "wait_for_exit",
    "write_config",
]

_NUMBERED = re.compile(r"ckpt\.(\d+)\.pt")
_PARTIAL = re.compile(r"\.ckpt\.(\d+)\.pt\..+\.tmp")  # atomic_open's temp file of ckpt.<n>.pt
_LINK_TMP = re.compile(r"\.ckpt\.pt\..+\.tmp")  # atomic_symlink's temp link
_RESUMED = re.compile(r"Resumed from (\S+) at step (\d+)")


class Violations:
    """Broken invariants by kind; a test collects them all, prints them, then asserts there are none."""

    def __init__(self) -> None:
        self.by_kind: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, detail: str) -> None:
        self.by_kind[kind].append(detail)

    def merge(self, other: "Violations") -> None:
        for kind, details in other.by_kind.items():
            self.by_kind[kind].extend(details)

    def __bool__(self) -> bool:
        return bool(self.by_kind)

    def summary(self, examples: int = 3) -> str:
        """One line per kind with its count, then up to ``examples`` instances of it."""
        lines = []
        for kind, details in self.by_kind.items():
            lines.append(f"{kind}: {len(details)} time(s)")
            lines.extend(f"    e.g. {d}" for d in details[:examples])
        return "\n".join(lines)


def write_config(folder: Path, name: str, text: str) -> Path:
    """Writes ``text`` to ``folder/name`` (creating the folder); returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def file_size(path: Path) -> int:
    """The size of ``path`` in bytes, 0 while it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def grown(path: Path, size: int) -> Callable[[], bool]:
    """A condition: ``path`` holds more than ``size`` bytes."""

    def condition() -> bool:
        return file_size(path) > size

    return condition


def poll(
    proc: subprocess.Popen,
    condition: Callable[[], bool],
    what: str,
    timeout_s: float = 90.0,
    interval_s: float = 0.002,
) -> bool:
    """Waits until ``condition()`` holds (True) or the process exits first (False); fails on timeout.

    ``interval_s=0`` polls without pausing (only yielding the CPU), to catch a moment of a few ms.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            return condition()
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
    return True


def sleep_while_running(proc: subprocess.Popen, until: float) -> bool:
    """Sleeps until ``time.monotonic()`` reaches ``until``; False if the process exited meanwhile."""
    while (left := until - time.monotonic()) > 0:
        if proc.poll() is not None:
            return False
        time.sleep(min(left, 0.002))
    return proc.poll() is None


def wait_for_exit(proc: subprocess.Popen, since: float, timeout_s: float) -> float | None:
    """Seconds from ``since`` (a ``time.monotonic()``) until the process exited; None if it still runs."""
    deadline = since + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.002)
    return time.monotonic() - since


def resumed_step(stderr: str) -> int | None:
    """The step of the ``Resumed from ... at step N`` line a start logged; None for a fresh start."""
    match = _RESUMED.search(stderr)
    return int(match.group(2)) if match else None


def ckpt_state(path: Path) -> dict[str, Any]:
    """The trainer state (the JSON in the ``state`` key) of a checkpoint, loaded with ``weights_only``."""
    return json.loads(_load(path)["state"])


def indices_steps(path: Path) -> list[int]:
    """The step of each complete line of a ``resume_task`` indices file (one line per batch)."""
    return [step for step, _ in read_indices(path)]


@dataclass(frozen=True)
class DiskState:
    """What a run's checkpoint folder (and experiment folder) holds at one moment."""

    numbered: dict[int, Path]  # ckpt.<n>.pt
    link: str | None  # what checkpoints/ckpt.pt names, None when there is no ckpt.pt
    link_is_symlink: bool
    partial: tuple[str, ...]  # .ckpt.<n>.pt.*.tmp: a checkpoint being written
    link_tmp: tuple[str, ...]  # .ckpt.pt.*.tmp: the link being swapped
    other_tmp: tuple[str, ...]  # any other *.tmp under the experiment folder (relative paths)
    fingerprint: frozenset[tuple[str, int]]  # (name, inode) of each numbered checkpoint, and the link

    def changed_since(self, before: "DiskState") -> bool:
        """Whether a checkpoint was written (a new file, or one replaced) or the link swapped since."""
        return self.fingerprint != before.fingerprint or self.link != before.link

    @property
    def ckpt_temps(self) -> tuple[str, ...]:
        """The ``checkpoints/.ckpt.*.tmp`` files (the ones a new start is meant to remove)."""
        return self.partial + self.link_tmp

    @property
    def writing(self) -> tuple[int, ...]:
        """The steps of the checkpoints being written (their temp files are there)."""
        return tuple(int(m.group(1)) for n in self.partial if (m := _PARTIAL.fullmatch(n)))

    @property
    def newest(self) -> int | None:
        return max(self.numbered) if self.numbered else None

    @property
    def linked_step(self) -> int | None:
        match = _NUMBERED.fullmatch(self.link or "")
        return int(match.group(1)) if match else None


def disk_state(exp_dir: Path) -> DiskState:
    folder = exp_dir / "checkpoints"
    names = sorted(os.listdir(folder)) if folder.is_dir() else []
    numbered = {int(m.group(1)): folder / n for n in names if (m := _NUMBERED.fullmatch(n))}
    link_path = folder / "ckpt.pt"
    is_link = link_path.is_symlink()
    link = os.readlink(link_path) if is_link else ("<a regular file>" if link_path.exists() else None)
    partial = tuple(n for n in names if _PARTIAL.fullmatch(n))
    link_tmp = tuple(n for n in names if _LINK_TMP.fullmatch(n))
    other = tuple(
        str(p.relative_to(exp_dir))
        for p in exp_dir.rglob("*.tmp")
        if p.parent != folder or p.name not in partial + link_tmp
    )
    fingerprint = frozenset((p.name, _inode(p)) for p in [*numbered.values(), link_path])
    return DiskState(numbered, link, is_link, partial, link_tmp, other, fingerprint)


def _inode(path: Path) -> int:
    try:
        return path.lstat().st_ino
    except FileNotFoundError:
        return 0


def partial_checkpoints(exp_dir: Path) -> dict[str, int]:
    """The temp files of checkpoints being written (name -> step), read cheaply enough to poll."""
    try:
        names = os.listdir(exp_dir / "checkpoints")
    except FileNotFoundError:
        return {}
    return {n: int(m.group(1)) for n in names if (m := _PARTIAL.fullmatch(n))}


def new_partial_checkpoint(exp_dir: Path, old: set[str]) -> Callable[[], bool]:
    """A condition: a checkpoint's temp file other than ``old`` ones is there (a save is under way)."""

    def condition() -> bool:
        return bool(set(partial_checkpoints(exp_dir)) - old)

    return condition


def checkpoint_problems(disk: DiskState) -> list[str]:
    """What is wrong with the complete checkpoints on disk, by the rules a crash may never break.

    ``ckpt.pt``, when present, is a symlink naming ``ckpt.<K>.pt``, which loads with
    ``torch.load(weights_only=True)`` and holds step K; every ``ckpt.<n>.pt`` (renamed into place
    only once complete) loads and holds step n.
    """
    problems = []
    if disk.link is not None:
        if not disk.link_is_symlink:
            problems.append("ckpt.pt is not a symlink")
        elif disk.linked_step is None:
            problems.append(f"ckpt.pt names {disk.link!r}, not a complete numbered checkpoint")
        elif disk.linked_step not in disk.numbered:
            problems.append(f"ckpt.pt names {disk.link}, which does not exist")
    for step, path in sorted(disk.numbered.items()):
        try:
            num_steps = ckpt_state(path)["num_steps"]
        except Exception as e:  # any failure to load is the finding
            problems.append(f"{path.name} does not load with weights_only=True: {type(e).__name__}: {e}")
            continue
        if num_steps != step:
            problems.append(f"{path.name} holds step {num_steps}")
    return problems


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Prints an aligned text table (shown with ``pytest -s``, or with a failure's captured output)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  " + "  ".join(padded))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))
