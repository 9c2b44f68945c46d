"""Defines the one rule for a run's newest complete checkpoint, and how a new one is put in place.

Writing (:func:`write_checkpoint_file`), in this order, so that a process killed at any moment
leaves a complete checkpoint named by the link or beside it:

1. ``ckpt.<step>.pt`` is written to a temporary file, fsynced, and renamed into place;
2. the relative link ``ckpt.pt`` is swapped to it (atomically);
3. only then, with retention on, every other numbered checkpoint is removed;
4. ``.lock_ckpt`` marks the run as having one.

Reading (:func:`newest_checkpoint`), used alike by resume, ``ml runs``, ``ml export`` and ``ml
plot``: the link's target, unless a numbered checkpoint of a later step lies beside it - a run
killed between steps 1 and 2 - which is complete (only finished files are renamed in), so it wins.
"""

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ml.errors import CheckpointError, CheckpointWriteError
from ml.run.layout import RunDir, checkpoint_step
from ml.run.locks import write_lock
from ml.utils.atomic import atomic_symlink, atomic_write_with

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """A run's newest complete checkpoint.

    Attributes:
        path: The file to read: the link ``ckpt.pt`` when it names the newest, else the numbered file.
        step: Its step (from the file name; None for a ``ckpt.pt`` that is a plain file).
        mtime: When it was written (seconds since the epoch).
    """

    path: Path
    step: int | None
    mtime: float

    @property
    def file(self) -> Path:
        """The checkpoint file itself (what the link points to, when :attr:`path` is the link)."""
        return self.path.parent / os.readlink(self.path) if self.path.is_symlink() else self.path


def numbered_checkpoints(run: RunDir) -> dict[int, Path]:
    """Every ``ckpt.<step>.pt`` of the run, by step."""
    try:
        names = os.listdir(run.checkpoints)
    except OSError:
        return {}
    return {
        step: run.checkpoints / name for name in names if (step := checkpoint_step(Path(name))) is not None
    }


def newest_checkpoint(run: RunDir) -> Checkpoint | None:
    """The run's newest complete checkpoint; None when it has none.

    The link's target, unless a numbered checkpoint of a later step lies beside it (then that one);
    without a link, the highest-numbered checkpoint; a ``ckpt.pt`` that is a plain file, itself.

    Raises:
        CheckpointError: ``ckpt.pt`` links to a file that is gone (the message says how to fix it).
    """
    link = run.link
    numbered = numbered_checkpoints(run)
    latest = max(numbered, default=None)
    if link.is_symlink():
        if not link.exists():
            raise CheckpointError(
                f"{link} points to {os.readlink(link)}, which does not exist; point the link at another "
                f"checkpoint in {link.parent} (or remove it to start over)"
            )
        target = link.resolve()
        linked = checkpoint_step(target) if target.parent == run.checkpoints.resolve() else None
        if latest is not None and linked is not None and latest > linked:
            return _checkpoint(numbered[latest], latest)
        return _checkpoint(link, linked)
    if link.is_file():
        return _checkpoint(link, None)
    if latest is not None:
        return _checkpoint(numbered[latest], latest)
    return None


def _checkpoint(path: Path, step: int | None) -> Checkpoint:
    try:
        mtime = path.stat().st_mtime
    except OSError:  # removed while we look
        mtime = 0.0
    return Checkpoint(path, step, mtime)


def write_checkpoint_file(
    run: RunDir, step: int, write: Callable[[IO[bytes]], None], *, keep_older: bool = False
) -> Path:
    """Writes ``ckpt.<step>.pt`` with ``write(file)`` durably, links it, then applies retention.

    Args:
        run: The run.
        step: The step it holds.
        write: Writes the checkpoint's bytes to the open file.
        keep_older: Keep the other numbered checkpoints (else they are removed once it is linked).

    Returns:
        The new checkpoint's path.

    Raises:
        CheckpointWriteError: The file could not be written; the link still names the one before.
    """
    path = run.checkpoint(step)
    previous = run.link.resolve() if run.link.is_symlink() and run.link.exists() else None
    try:
        atomic_write_with(path, write)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        kept = f"{previous.name} is kept" if previous is not None else "no earlier checkpoint exists"
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {io_reason(e, path.parent)}; {kept}"
        ) from e
    link_checkpoint(run, path, keep_older=keep_older)
    write_lock(run, "ckpt", exists_ok=True)
    # The same step saved again (a run's final checkpoint, then with its final metrics) is said once.
    logger.log(logging.DEBUG if previous == path.resolve() else logging.INFO, "Saved checkpoint %s", path)
    return path


def link_checkpoint(run: RunDir, path: Path, *, keep_older: bool = False) -> None:
    """Points ``ckpt.pt`` at ``path`` (a checkpoint of this run), then applies retention.

    Also what resuming does: a run killed before its link swap or its retention left a newer
    unlinked checkpoint or older ones behind. A checkpoint outside the run's folder is left alone.
    """
    target = path.resolve()
    if target.parent != run.checkpoints.resolve():
        return
    if not (run.link.is_symlink() and run.link.resolve() == target):
        atomic_symlink(target.name, run.link)
    if not keep_older:
        # Every other numbered checkpoint, not only the one the link named before: a process
        # killed between a link swap and this point left its previous one behind.
        for old in numbered_checkpoints(run).values():
            if old.name != target.name:
                old.unlink(missing_ok=True)


def io_reason(error: BaseException, folder: Path) -> str:
    """Why a write failed, in words: the OS error, and how much space is left where it wrote."""
    os_error = error if isinstance(error, OSError) else None
    cause: BaseException | None = error
    while os_error is None and cause is not None:  # torch wraps the OSError in a RuntimeError
        cause = cause.__cause__ or cause.__context__
        os_error = cause if isinstance(cause, OSError) else None
    reason = os_error.strerror if os_error is not None and os_error.strerror else str(error).splitlines()[0]
    try:
        free = shutil.disk_usage(folder).free
        reason += f" ({free / 2**20:.1f} MiB free there)"
    except OSError:
        pass
    return reason
