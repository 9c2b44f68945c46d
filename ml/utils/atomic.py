"""Defines atomic file writes, and reads that cannot hang.

Writes: a reader sees the old file or the new one, never a partial one. Each write goes to a
temporary file in the destination's folder, is flushed and fsynced, then ``os.replace``-d over the
destination, and the folder is fsynced so the rename survives a crash. If the writer is interrupted
(an exception, Ctrl-C), the temporary file is removed.

Reads of files a run folder holds (:func:`open_regular`, :func:`read_regular`): only regular files.
A FIFO put where a checkpoint, a lock or ``status.json`` is expected would block ``open()`` until a
writer comes, which may be never; the file is opened without blocking and its type checked first.
"""

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TextIO, cast


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it, which is not thread-safe


def fsync_dir(path: Path) -> None:
    """Flushes a folder's entries (renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Opens a temporary file that replaces ``path`` when the block exits without error.

    Args:
        path: The destination file.
        mode: ``"wb"`` or ``"w"``.

    Yields:
        The open temporary file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, KeyboardInterrupt) and isinstance(e.__context__, KeyboardInterrupt):
            # A writer interrupted by Ctrl-C (torch.save's zip writer) fails again while unwinding;
            # what happened is the interrupt, so that is what propagates.
            raise e.__context__ from None
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_with(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Calls ``write(file)`` on a temporary file that then atomically replaces ``path``."""
    with atomic_open(path, "wb") as f:
        write(f)


class NotARegularFileError(OSError):
    """The path names a FIFO, a socket, a device or a folder, where a regular file was expected."""


def open_regular(path: str | Path) -> IO[bytes]:
    """Opens ``path`` for reading in binary mode, refusing anything but a regular file (never blocks).

    Raises:
        FileNotFoundError: There is no such file.
        NotARegularFileError: It is a FIFO, socket, device or folder.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFileError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path) -> bytes:
    """The bytes of a regular file (see :func:`open_regular`)."""
    with open_regular(path) as f:
        return f.read()


def open_append(path: str | Path, *, buffering: int = -1) -> TextIO:
    """Opens ``path`` (created if missing) for appending UTF-8 text; anything but a regular file is
    refused at once (a FIFO without a reader would otherwise block ``open()``).

    Raises:
        NotARegularFileError: It is a FIFO, socket, device or folder.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO with no reader; a folder
            raise NotARegularFileError(errno.EINVAL, "not a regular file", str(path)) from e
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFileError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return cast(TextIO, os.fdopen(fd, "a", buffering=buffering, encoding="utf-8"))
    except BaseException:
        os.close(fd)
        raise


def atomic_symlink(target: str, link: Path) -> None:
    """Points ``link`` at ``target`` (kept as given, e.g. relative), replacing any old link atomically."""
    tmp = link.parent / f".{link.name}.{os.getpid()}.link.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
