"""Defines the one rule for a run's newest complete checkpoint, and how a new one is put in place.

Writing (:func:`write_checkpoint_file`), in this order, so that a process killed at any moment
leaves a complete checkpoint named by the link or beside it:

1. ``ckpt.<step>.pt`` is written to a temporary file, fsynced, and renamed into place; its bytes
   are hashed as they are written and the SHA-256 ends the file (below);
2. the relative link ``ckpt.pt`` is swapped to it (atomically);
3. only then, with retention on, every other numbered checkpoint is removed - except those kept
   for being the best (below);
4. ``.lock_ckpt`` marks the run as having one.

The best checkpoints (``trainer.checkpoint.monitor``, :func:`score_checkpoint`): a checkpoint of a
step that was evaluated carries the monitored metric's value. Before its link swap (step 2),
``scores.json`` is rewritten (atomically) to list the ``keep_top_k`` best scored checkpoints and the
relative link ``best.pt`` is pointed at the best of them; retention (step 3) keeps every checkpoint
``scores.json`` lists or ``best.pt`` names. A file is listed before it may be relied on and
unlisted before it is removed, so a kill at any moment leaves the latest and the best complete.

The checksum lives inside the file, so a checkpoint is one file (copied, moved and removed whole):
``torch.save`` writes a zip archive, whose last record may carry a comment that zip readers
(``torch.load`` included) skip; it is set to ``ml-sha256:<hex>``, the SHA-256 of every byte
before the comment. :func:`verify_checksum` checks it (a file without one, from before checksums or
not from ml, is read without a claim).

A sharded checkpoint (``trainer.checkpoint.format=sharded``) is the folder ``ckpt.<step>/``: every
rank writes its own shards (``torch.distributed.checkpoint``) into ``ckpt.<step>.tmp/``
(:func:`begin_sharded_checkpoint`), then rank 0 alone, once every rank has finished
(:func:`publish_sharded_checkpoint`): writes ``ml.pt`` (what is not a tensor: the state, config,
generators, data order; signed as above; and the SHA-256 of the manifest that follows, which ties it
to these shards), writes ``ml-manifest.json`` (every shard file, its size and its SHA-256, how a shard
lost, truncated or changed since is found), fsyncs, and renames the folder to ``ckpt.<step>``; then
the steps 2 to 4 above. Each rank hashes the files it wrote itself, right after
writing them, all ranks at once, and rank 0 gathers the digests (:mod:`ml.utils.sharded`,
:func:`record_shard_digests`); a file no rank reported (DCP's ``.metadata``) rank 0 hashes here.
A folder is a candidate exactly as a file is, by its step, and verified against its manifest when
read (:func:`open_sharded_checkpoint`): a shard missing, resized or of another SHA-256 makes it
damaged, skipped as a damaged file is; so does an ``ml.pt`` of another save (``ml.utils.checkpoint``
compares the manifest's SHA-256 it holds, and the steps of ``ml.pt``, the manifest and the folder's
name). The files are held open from then on, so what is read is what verified, even while a run
still training removes the folder. The same step saved again (the final checkpoint, then with its
final metrics) keeps the step's shards (the tensors of one step are the same) and replaces ``ml.pt``
alone, atomically (holding the same manifest's SHA-256).

Reading (:func:`checkpoint_candidates`, :func:`newest_checkpoint`), used alike by resume, ``ml
runs``, ``ml export`` and ``ml plot``: the link's target, unless a numbered checkpoint of a later
step lies beside it - a run killed between steps 1 and 2 - which is complete (only finished files
are renamed in), so it wins. A link that leaves the run's ``checkpoints/`` folder is refused.
Resume and ``ml export`` take the newest candidate that verifies
(:func:`newest_verified_checkpoint`): a damaged newer one is skipped, and they say so; one removed
while read (a run still training) sends them back to the newest.
"""

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import stat
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, TypeVar, cast

from ml.errors import CheckpointError, CheckpointWriteError, DamagedCheckpointError
from ml.run.layout import LINK_NAME, RunDir, checkpoint_step
from ml.run.locks import write_lock
from ml.utils.atomic import (
    NotARegularFileError,
    atomic_open,
    atomic_symlink,
    atomic_write_text,
    fsync_dir,
    open_regular,
    read_regular,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

_END_RECORD = b"PK\x05\x06"  # a zip archive's end record: 22 bytes, the last two its comment's length
_END_RECORD_SIZE = 22
CHECKSUM_TAG = b"ml-sha256:"
_COMMENT_SIZE = len(CHECKSUM_TAG) + 64  # the tag, then the SHA-256 in hex
_COMMENT_LENGTH = _COMMENT_SIZE.to_bytes(2, "little")
SHARDED_EXTRAS = "ml.pt"  # in a sharded checkpoint's folder: everything but the sharded tensors
SHARDED_MANIFEST = "ml-manifest.json"  # written last: the shard files, their sizes and SHA-256s
MANIFEST_DIGEST = "manifest_sha256"  # in ml.pt: the SHA-256 of the manifest of the shards it goes with
_SHARDED_TEMP = re.compile(r"ckpt\.\d+\.tmp")  # a sharded checkpoint being written


@dataclass(frozen=True)
class Checkpoint:
    """One of a run's complete checkpoints.

    Attributes:
        path: The file to read: the link ``ckpt.pt`` when it names this one, else the numbered file.
        step: Its step (from the file name; None for a ``ckpt.pt`` that is a plain file).
        mtime: When it was written (seconds since the epoch).
        unlinked: A numbered checkpoint newer than what the link names (the run that wrote it
            stopped before swapping the link).
    """

    path: Path
    step: int | None
    mtime: float
    unlinked: bool = False

    @property
    def file(self) -> Path:
        """The checkpoint file itself (what the link points to, when :attr:`path` is the link)."""
        return self.path.parent / os.readlink(self.path) if self.path.is_symlink() else self.path


def numbered_checkpoints(run: RunDir) -> dict[int, Path]:
    """Every ``ckpt.<step>.pt`` file and ``ckpt.<step>`` folder of the run, by step (a folder wins
    over a file of the same step: it was written later, by a run that switched to sharded)."""
    try:
        names = sorted(os.listdir(run.checkpoints), key=lambda name: name.endswith(".pt"))
    except OSError:
        return {}
    found: dict[int, Path] = {}
    for name in names:
        step = checkpoint_step(Path(name))
        if step is not None:
            found.setdefault(step, run.checkpoints / name)
    return found


def step_checkpoint(run: RunDir, step: int) -> Path:
    """The checkpoint of ``step`` as it lies: the folder ``ckpt.<step>`` if there is one, else the
    file ``ckpt.<step>.pt`` (which may not exist)."""
    folder = run.sharded_checkpoint(step)
    return folder if folder.is_dir() else run.checkpoint(step)


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` (a link is followed) is a sharded checkpoint's folder rather than a file."""
    return Path(path).is_dir()


def checkpoint_candidates(run: RunDir) -> list[Checkpoint]:
    """The run's checkpoints, newest first; the first is :func:`newest_checkpoint`'s.

    The link's target comes first, unless numbered checkpoints of later steps lie beside it (then
    those, newest first, and the link after them); then every older numbered checkpoint. Without a
    link, the numbered checkpoints; a ``ckpt.pt`` that is not a link comes first itself. Nothing is
    read: which of them is intact is for the reader to find (:func:`newest_verified_checkpoint`).

    Raises:
        CheckpointError: ``ckpt.pt`` links to a file that is gone, or a link (``ckpt.pt`` or a
            numbered one) leads out of the run's ``checkpoints/`` folder (the message says how to fix it).
    """
    link = run.link
    folder = run.checkpoints.resolve()
    numbered = numbered_checkpoints(run)
    for path in numbered.values():
        if path.is_symlink():
            _check_inside(path, folder)
    steps = sorted(numbered, reverse=True)
    if link.is_symlink():
        if not link.exists():
            raise CheckpointError(
                f"{link} points to {os.readlink(link)}, which does not exist; point the link at another "
                f"checkpoint in {link.parent} (or remove it to start over)"
            )
        target = _check_inside(link, folder)
        linked = checkpoint_step(target) if target.parent == folder else None
        if linked is None:
            return [_checkpoint(link, None), *(_checkpoint(numbered[s], s) for s in steps)]
        return [
            *(_checkpoint(numbered[s], s, unlinked=True) for s in steps if s > linked),
            _checkpoint(link, linked),
            *(_checkpoint(numbered[s], s) for s in steps if s < linked),
        ]
    first = [_checkpoint(link, None)] if link.exists() else []  # a plain file (or a FIFO, refused on read)
    return [*first, *(_checkpoint(numbered[s], s) for s in steps)]


def newest_checkpoint(run: RunDir) -> Checkpoint | None:
    """The run's newest complete checkpoint; None when it has none.

    The link's target, unless a numbered checkpoint of a later step lies beside it (then that one);
    without a link, the highest-numbered checkpoint; a ``ckpt.pt`` that is a plain file, itself.
    Nothing is read (``ml runs`` asks this); resume and ``ml export`` take the newest that
    verifies (:func:`newest_verified_checkpoint`).

    Raises:
        CheckpointError: ``ckpt.pt`` links to a file that is gone or out of the run's
            ``checkpoints/`` (the message says how to fix it).
    """
    candidates = checkpoint_candidates(run)
    return candidates[0] if candidates else None


@dataclass(frozen=True)
class Verified(Generic[T]):
    """The newest checkpoint that verifies, what reading it gave, and the newer ones skipped."""

    checkpoint: Checkpoint
    value: T
    skipped: tuple[tuple[Checkpoint, DamagedCheckpointError], ...] = field(default=())

    @property
    def warnings(self) -> list[str]:
        """What to tell the user about the choice (empty when it is the plain newest)."""
        said = []
        if self.skipped:
            reasons = "; ".join(f"skipping {c.file} ({e})" for c, e in self.skipped)
            said.append(f"{reasons}; using {self.checkpoint.file}, the newest checkpoint that verifies")
        if self.checkpoint.unlinked:
            said.append(
                f"{self.checkpoint.path.name} is newer than what {LINK_NAME} names: the run that wrote it "
                "stopped before linking it; using it"
            )
        return said


def newest_verified_checkpoint(run: RunDir, read: Callable[[Path], T]) -> Verified[T] | None:
    """The newest of :func:`checkpoint_candidates` that ``read`` accepts; None when there is none.

    Args:
        run: The run.
        read: Reads (or only checks) a checkpoint; raises :class:`DamagedCheckpointError` for one
            that does not verify, which is then skipped for the next older one. Any other error
            (a file that would run code, one of another program) stops the search: it is raised.
            A checkpoint removed while it was read (by a run still training: retention after its
            next save) is not skipped: the checkpoints are listed again, and the search starts over
            from the newest (a few times at most).

    Raises:
        CheckpointError: No candidate verifies (the newest one's problem, and the others' names),
            the link is broken (:func:`checkpoint_candidates`), or the checkpoints kept being
            replaced while read.
    """
    skipped: list[tuple[Checkpoint, DamagedCheckpointError]] = []
    for _ in range(_LOOKS):
        skipped = []
        gone = False
        for candidate in checkpoint_candidates(run):
            try:
                value = read(candidate.path)
            except DamagedCheckpointError as e:
                # Removed while it was read: a run still training removes its older checkpoints
                # after each save, so the newest are listed again (not skipped as damaged).
                gone = _gone(run, candidate)
                if gone:
                    break
                skipped.append((candidate, e))
                continue
            return Verified(candidate, value, tuple(skipped))
        if not gone:
            break
    else:
        raise CheckpointError(
            f"the checkpoints in {run.checkpoints} were replaced {_LOOKS} times while being read (a run "
            "saving very often?); try again, or name a checkpoint the run keeps (best, a step)"
        )
    if not skipped:
        return None
    first = skipped[0][1]
    if len(skipped) == 1:
        raise first
    others = ", ".join(c.file.name for c, _ in skipped[1:])
    raise DamagedCheckpointError(f"{first} (and no older checkpoint verifies either: {others})") from first


_LOOKS = 5  # how often the checkpoints are listed again when the one being read was removed meanwhile


def _gone(run: RunDir, candidate: Checkpoint) -> bool:
    """Whether the checkpoint ``candidate`` stood for when listed no longer exists (for the link:
    the one it named then)."""
    path = candidate.path if candidate.step is None else step_checkpoint(run, candidate.step)
    return not os.path.lexists(path)


def _check_inside(link: Path, folder: Path) -> Path:
    """The file ``link`` leads to; CheckpointError when that is outside ``folder``."""
    target = link.resolve()
    if not target.is_relative_to(folder):
        raise CheckpointError(
            f"{link} points to {target}, outside the run's checkpoint folder {folder}; a run reads only "
            f"its own checkpoints: copy that file into {link.parent} and point the link at the copy"
        )
    return target


def _checkpoint(path: Path, step: int | None, *, unlinked: bool = False) -> Checkpoint:
    try:
        mtime = path.stat().st_mtime
    except OSError:  # removed while we look
        mtime = 0.0
    return Checkpoint(path, step, mtime, unlinked)


class _ChecksumWriter:
    """Passes a zip archive's bytes through to ``file``, hashing them, and ends it with the checksum.

    The last 22 bytes written are held back: once the writer is done (:meth:`finish`), they are the
    archive's end record, whose comment length is set before they are written, then the comment
    ``ml-sha256:<hex>`` of everything before it. Bytes that do not end in an end record without a
    comment (not a torch zip) are written unchanged, without a checksum.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self._held = b""

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        if size >= _END_RECORD_SIZE:
            self._put(self._held)
            self._put(view[: size - _END_RECORD_SIZE])
            self._held = bytes(view[size - _END_RECORD_SIZE :])
        else:
            held = self._held + bytes(view)
            cut = max(0, len(held) - _END_RECORD_SIZE)
            self._put(held[:cut])
            self._held = held[cut:]
        return size

    def flush(self) -> None:
        self._file.flush()

    def finish(self) -> bool:
        """Writes the held end record and the checksum; whether there was an end record to sign."""
        held, self._held = self._held, b""
        if len(held) == _END_RECORD_SIZE and held.startswith(_END_RECORD) and held.endswith(b"\0\0"):
            self._put(held[:-2] + _COMMENT_LENGTH)
            self._file.write(CHECKSUM_TAG + self._hash.hexdigest().encode("ascii"))
            return True
        self._put(held)
        return False

    def _put(self, data: bytes | memoryview) -> None:
        if len(data):
            self._hash.update(data)
            self._file.write(data)


def verify_checksum(file: IO[bytes], path: Path) -> bool:
    """Checks the checksum at the end of a checkpoint (see the module's notes), reading it once in
    1 MiB pieces.

    Args:
        file: The open file (seekable); left at an arbitrary position.
        path: Its name, for the message.

    Returns:
        Whether it had a checksum (which matched); False for a file without one.

    Raises:
        DamagedCheckpointError: The checksum does not match: the file changed after it was written.
    """
    size = os.fstat(file.fileno()).st_size
    tail_size = _END_RECORD_SIZE + _COMMENT_SIZE
    if size < tail_size:
        return False
    file.seek(size - tail_size)
    tail = file.read(tail_size)
    comment = tail[_END_RECORD_SIZE:]
    if not (
        tail.startswith(_END_RECORD) and tail[20:22] == _COMMENT_LENGTH and comment.startswith(CHECKSUM_TAG)
    ):
        return False
    file.seek(0)
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(1 << 20))
    left = size - _COMMENT_SIZE
    while left:
        n = file.readinto(buffer[: min(left, len(buffer))])  # type: ignore[attr-defined]
        if not n:
            break
        digest.update(buffer[:n])
        left -= n
    if left or digest.hexdigest().encode("ascii") != comment[len(CHECKSUM_TAG) :]:
        raise DamagedCheckpointError(
            f"cannot read checkpoint {path}: checksum mismatch: the file changed after it was written "
            "(damaged on disk or in a copy); restore a good copy, or use another checkpoint"
        )
    return True


@dataclass(frozen=True)
class Ranking:
    """``trainer.checkpoint.monitor``: which checkpoints are kept for being the best.

    Attributes:
        metric: The monitored metric (``valid/loss``).
        mode: ``min`` or ``max``.
        keep: How many of the best are kept (besides the latest).
    """

    metric: str
    mode: str
    keep: int


def read_scores(run: RunDir) -> dict[int, float]:
    """The checkpoints kept for being the best, by step (best first), with their values; {} when none."""
    return _scores_of(_read_scores_record(run))


def _scores_of(record: dict) -> dict[int, float]:
    """The scores of a ``scores.json`` record, by step, best first (entries that are not numbers left out)."""
    scores = record.get("scores")
    if not isinstance(scores, dict):
        return {}
    found = {}
    for step, value in scores.items():
        try:
            found[int(step)] = float(value)
        except (TypeError, ValueError):
            continue
    return found


def best_checkpoint(run: RunDir) -> Path | None:
    """The file ``best.pt`` names; None when there is none (or it names nothing)."""
    link = run.best_link
    if not link.is_symlink() or not link.exists():
        return None
    return _check_inside(link, run.checkpoints.resolve())


def score_checkpoint(run: RunDir, step: int, value: float, ranking: Ranking) -> None:
    """Ranks the checkpoint of ``step`` by its ``value`` of the monitored metric (it must exist).

    ``scores.json`` then lists the ``ranking.keep`` best (a tie keeps the earlier) and ``best.pt``
    names the best; a non-finite value ranks nowhere. Listed checkpoints of another metric or
    mode (the monitor changed) are forgotten. Nothing is removed here: retention does that
    (:func:`link_checkpoint`), after the link swap.
    """
    record = _read_scores_record(run)
    same = record.get("monitor") == ranking.metric and record.get("mode") == ranking.mode
    kept = _scores_of(record)
    if kept and not same:
        logger.warning(
            "checkpoint.monitor is now %s (%s), not %s (%s): the checkpoints kept for that (%s) are "
            "no longer kept",
            ranking.metric,
            ranking.mode,
            record.get("monitor"),
            record.get("mode"),
            ", ".join(step_checkpoint(run, s).name for s in sorted(kept)),
        )
    scores = {s: v for s, v in kept.items() if same and s != step and step_checkpoint(run, s).exists()}
    if math.isfinite(value):
        scores[step] = value
    sign = 1.0 if ranking.mode == "min" else -1.0
    ranked = sorted(scores.items(), key=lambda item: (sign * item[1], item[0]))[: ranking.keep]
    _write_scores(run, dict(ranked), ranking.metric, ranking.mode)


def _read_scores_record(run: RunDir) -> dict:
    """``scores.json`` as written; {} when it is missing or unreadable (then nothing is kept for it)."""
    try:
        record = json.loads(read_regular(run.scores))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_scores(run: RunDir, scores: dict[int, float], metric: str | None, mode: str | None) -> None:
    """Writes ``scores.json`` (best first), then points ``best.pt`` at the first (or removes it)."""
    text = json.dumps(
        {"monitor": metric, "mode": mode, "scores": {str(s): v for s, v in scores.items()}}, indent=2
    )
    atomic_write_text(run.scores, text + "\n")
    link = run.best_link
    if not scores:
        link.unlink(missing_ok=True)
        return
    best = step_checkpoint(run, next(iter(scores))).name
    if not (link.is_symlink() and os.readlink(link) == best):
        atomic_symlink(best, link)


def write_checkpoint_file(
    run: RunDir,
    step: int,
    write: Callable[[IO[bytes]], None],
    *,
    keep_older: bool = False,
    score: tuple[float, Ranking] | None = None,
) -> Path:
    """Writes ``ckpt.<step>.pt`` with ``write(file)`` durably, ranks it, links it, then applies retention.

    The bytes are hashed as ``write`` writes them (a zip archive, what ``torch.save`` writes), and
    the checksum ends the file (see the module's notes).

    Args:
        run: The run.
        step: The step it holds.
        write: Writes the checkpoint's bytes to the open file (only ``write`` and ``flush`` are used).
        keep_older: Keep the other numbered checkpoints (else they are removed once it is linked,
            except the best: :func:`score_checkpoint`).
        score: The monitored metric's value at this step and the ranking (``checkpoint.monitor``).

    Returns:
        The new checkpoint's path.

    Raises:
        CheckpointWriteError: The file could not be written; the link still names the one before.
    """
    path = run.checkpoint(step)
    previous = _linked(run)
    try:
        _write_signed(path, write)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        raise _write_error(path, e, previous) from e
    _put_in_place(run, step, path, previous, keep_older=keep_older, score=score)
    return path


def _linked(run: RunDir) -> Path | None:
    return run.link.resolve() if run.link.is_symlink() and run.link.exists() else None


def _write_signed(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Writes ``path`` atomically with ``write(file)``, its checksum at the end (the module's notes)."""
    with atomic_open(path, "wb") as f:
        writer = _ChecksumWriter(f)
        write(cast(IO[bytes], writer))
        writer.finish()


def _write_error(path: Path, error: BaseException, previous: Path | None) -> CheckpointWriteError:
    kept = f"{previous.name} is kept" if previous is not None else "no earlier checkpoint exists"
    return CheckpointWriteError(f"cannot write checkpoint {path}: {io_reason(error, path.parent)}; {kept}")


def _put_in_place(
    run: RunDir,
    step: int,
    path: Path,
    previous: Path | None,
    *,
    keep_older: bool,
    score: tuple[float, Ranking] | None,
) -> None:
    """After the checkpoint of ``step`` is durable at ``path``: rank it, link it, apply retention."""
    if score is not None:
        score_checkpoint(run, step, *score)
    link_checkpoint(run, path, keep_older=keep_older)
    write_lock(run, "ckpt", exists_ok=True)
    # The same step saved again (a run's final checkpoint, then with its final metrics) is said once.
    logger.log(logging.DEBUG if previous == path.resolve() else logging.INFO, "Saved checkpoint %s", path)


def sharded_temp_folder(run: RunDir, step: int) -> Path:
    """``checkpoints/ckpt.<step>.tmp/``: where the ranks write the shards of ``step``."""
    return run.checkpoints / f"ckpt.{step}.tmp"


def begin_sharded_checkpoint(run: RunDir, step: int) -> Path | None:
    """Rank 0, before the ranks write the shards of ``step``: an empty temporary folder for them
    (one a killed writer left is emptied); None when the link names the step's checkpoint already
    (saved again: its shards are kept, :func:`publish_sharded_checkpoint` replaces only ``ml.pt``).
    A folder of the step the link does not name (left by an earlier process, perhaps damaged) is
    removed first: the new one takes its place.

    Raises:
        CheckpointWriteError: The folder could not be made; the link still names the one before.
    """
    final = run.sharded_checkpoint(step)
    if final.is_dir() and _linked(run) == final.resolve():
        return None
    temp = sharded_temp_folder(run, step)
    _take_shard_digests(temp)  # of an earlier try at this step that was not published
    try:
        _remove(final)
        _remove(temp)
        temp.mkdir(parents=True)
    except OSError as e:
        raise _write_error(temp, e, _linked(run)) from e
    return temp


def publish_sharded_checkpoint(
    run: RunDir,
    step: int,
    write_extras: Callable[[IO[bytes], Mapping[str, str]], None],
    *,
    keep_older: bool = False,
    score: tuple[float, Ranking] | None = None,
) -> Path:
    """Rank 0, once every rank has written its shards of ``step`` (durably): completes the
    checkpoint folder, renames it into place, ranks it, links it, then applies retention (see the
    module's notes).

    Args:
        run: The run.
        step: The step it holds.
        write_extras: Writes ``ml.pt`` (what is not a sharded tensor) to the open file, with the
            items it is given added (``{MANIFEST_DIGEST: <hex>}``, which ties it to the shards).
        keep_older: As :func:`write_checkpoint_file`'s.
        score: As :func:`write_checkpoint_file`'s.

    Returns:
        The folder ``ckpt.<step>``.

    Raises:
        CheckpointWriteError: It could not be written; the link still names the one before.
    """
    final = run.sharded_checkpoint(step)
    temp = sharded_temp_folder(run, step)
    previous = _linked(run)
    reported = _take_shard_digests(temp)
    try:
        if final.is_dir():  # the same step again: its shards are there, only ml.pt changes
            manifest_text = read_regular(final / SHARDED_MANIFEST)
            _write_signed(final / SHARDED_EXTRAS, _bound_to(manifest_text, write_extras))
        else:
            files = {
                entry.name: entry.stat(follow_symlinks=False).st_size
                for entry in os.scandir(temp)
                if entry.name not in (SHARDED_EXTRAS, SHARDED_MANIFEST)
            }
            # The ranks hashed what they wrote; what none reported (DCP's .metadata, which its
            # coordinator writes) is hashed here.
            digests = {name: reported[name] for name in files if name in reported}
            digests.update(sha256_files(temp, [name for name in files if name not in digests]))
            manifest = {
                "format": "ml-sharded-1",
                "step": step,
                "files": dict(sorted(files.items())),
                "sha256": dict(sorted(digests.items())),
            }
            manifest_text = (json.dumps(manifest, indent=1) + "\n").encode("utf-8")
            # ml.pt holds the manifest's SHA-256 (it is written first, the manifest last): an ml.pt
            # put beside the shards of another save is found when read.
            _write_signed(temp / SHARDED_EXTRAS, _bound_to(manifest_text, write_extras))
            with atomic_open(temp / SHARDED_MANIFEST, "wb") as f:
                f.write(manifest_text)
            os.rename(temp, final)
            fsync_dir(run.checkpoints)
    except (OSError, RuntimeError) as e:
        raise _write_error(final, e, previous) from e
    _put_in_place(run, step, final, previous, keep_older=keep_older, score=score)
    return final


def _bound_to(
    manifest_text: bytes, write_extras: Callable[[IO[bytes], Mapping[str, str]], None]
) -> Callable[[IO[bytes]], None]:
    """``write_extras`` writing an ``ml.pt`` that holds the SHA-256 of ``manifest_text``."""
    bound = {MANIFEST_DIGEST: hashlib.sha256(manifest_text).hexdigest()}
    return lambda file: write_extras(file, bound)


class ShardedFolder:
    """A sharded checkpoint's folder that verified against its manifest, its files held open.

    What is read later (``ml.pt``, DCP's ``.metadata`` and shards: :meth:`open`) is what verified,
    even if the folder is removed meanwhile (a run still training removes its older checkpoints
    after each save): an open file's bytes stay until it is closed. The files are closed by
    :meth:`close`, or when the object is dropped.

    Attributes:
        folder: The folder (links resolved).
        step: The step its manifest names (None in a manifest without one).
        manifest_sha256: The SHA-256 of its ``ml-manifest.json`` (what ``ml.pt`` holds, since
            :data:`MANIFEST_DIGEST`).
    """

    def __init__(self, folder: Path, step: int | None, manifest_sha256: str, fds: dict[str, int]) -> None:
        self.folder = folder
        self.step = step
        self.manifest_sha256 = manifest_sha256
        self._fds = fds
        self._close = weakref.finalize(self, _close_fds, list(fds.values()))

    def holds(self, name: str) -> bool:
        return name in self._fds

    def open(self, name: str) -> IO[bytes]:
        """A reader of the held file ``name`` with a position of its own (closing it keeps the file held)."""
        return io.BufferedReader(_HeldFile(self._fds[name], str(self.folder / name)), 1 << 20)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "ShardedFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _HeldFile(io.RawIOBase):
    """Reads a held file descriptor at a position of its own (``pread``: readers do not share one)."""

    def __init__(self, fd: int, name: str) -> None:
        super().__init__()
        self._fd = fd
        self._position = 0
        self.name = name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: os.fstat(self._fd).st_size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: Any) -> int:
        n = _read_at(self._fd, buffer, self._position)
        self._position += n
        return n


def _read_at(fd: int, buffer: Any, offset: int) -> int:
    """Reads into ``buffer`` from ``offset`` of ``fd`` (its own position untouched); the bytes read."""
    view = memoryview(buffer).cast("B")
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _open_held(path: Path) -> int:
    """A descriptor of the regular file ``path`` (never a link, a FIFO or a folder: OSError)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFileError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _room_for_files(count: int) -> None:
    """Raises this process's limit of open files (up to the hard one) where ``count`` more need it."""
    try:
        import resource
    except ImportError:  # not a Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 1024  # beside what the process holds already (data loaders, sockets, logs)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    raised = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    with contextlib.suppress(ValueError, OSError):  # (opening then says what is missing)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))


def open_sharded_checkpoint(folder: Path) -> ShardedFolder:
    """Opens a sharded checkpoint's folder and checks it against its manifest: every file is there,
    a regular file, of the size written, and (read whole, several files at once) of the SHA-256
    written; ``ml.pt`` is there (its own checksum is checked when it is read). The files stay open
    (:class:`ShardedFolder`): what is read later is what verified.

    Raises:
        DamagedCheckpointError: The manifest or a file is missing, or a shard changed (size or bytes).
        CheckpointError: A file could not be opened or read (the disk's error: not a verdict on it).
    """
    folder = Path(folder)
    where = f"sharded checkpoint {folder}"
    fds: dict[str, int] = {}
    try:
        manifest_text, files, digests, step = _read_manifest(folder, where, fds)
        _room_for_files(len(files) + 1)
        for name, size in [*files.items(), (SHARDED_EXTRAS, None)]:
            try:
                fds[name] = fd = _open_held(folder / name)
            except FileNotFoundError as e:
                if name == SHARDED_EXTRAS:
                    raise DamagedCheckpointError(f"checkpoint not found: {folder / name}") from e
                raise DamagedCheckpointError(f"cannot read {where}: {name} is missing") from e
            except (NotARegularFileError, IsADirectoryError) as e:
                raise DamagedCheckpointError(f"cannot read {where}: {name} is not a regular file") from e
            except OSError as e:
                if e.errno == errno.ELOOP:  # O_NOFOLLOW: a link
                    raise DamagedCheckpointError(f"cannot read {where}: {name} is not a regular file") from e
                raise CheckpointError(f"cannot read {where}: {name}: {e.strerror or e}") from e
            found = os.fstat(fd).st_size
            if size is not None and found != size:
                raise DamagedCheckpointError(
                    f"cannot read {where}: {name} has {found} bytes, {size} were written "
                    "(truncated or changed since); restore a good copy, or use another checkpoint"
                )
        if digests is not None:
            try:
                hashed = _sha256_held({name: fds[name] for name in files})
            except OSError as e:
                raise CheckpointError(f"cannot read {where}: {e.strerror or e}") from e
            changed = sorted(name for name, digest in hashed.items() if digest != digests[name])
            if changed:
                raise DamagedCheckpointError(
                    f"cannot read {where}: {', '.join(changed)} does not match the SHA-256 written (changed "
                    "since it was written: damaged on disk or in a copy); restore a good copy, or use "
                    "another checkpoint"
                )
    except BaseException:
        _close_fds(list(fds.values()))
        raise
    _close_fds([fds.pop(SHARDED_MANIFEST)])  # read already
    return ShardedFolder(folder, step, hashlib.sha256(manifest_text).hexdigest(), fds)


def _read_manifest(
    folder: Path, where: str, fds: dict[str, int]
) -> tuple[bytes, dict[str, int], dict[str, str] | None, int | None]:
    """The manifest's bytes, its files (by size), their digests (None in one from before them) and
    its step; its descriptor goes into ``fds``."""
    try:
        fds[SHARDED_MANIFEST] = fd = _open_held(folder / SHARDED_MANIFEST)
        with open(fd, "rb", closefd=False) as f:
            text = f.read()
        manifest = json.loads(text)
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(size, int) for size in files.values()):
            raise TypeError("files is not a mapping of sizes")
        # Manifests written before shards had digests (same day) have no "sha256": they are
        # accepted by the sizes alone, without the guarantee that a changed byte is found.
        digests = manifest.get("sha256")
        if digests is not None and not (isinstance(digests, dict) and set(digests) == set(files)):
            raise TypeError("sha256 does not list each file once")
        step = manifest.get("step")
    except FileNotFoundError as e:
        raise DamagedCheckpointError(
            f"cannot read {where}: it has no {SHARDED_MANIFEST} (not written to the end); "
            "use another checkpoint"
        ) from e
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedCheckpointError(f"cannot read {where}: its {SHARDED_MANIFEST} is damaged ({e})") from e
    for name in files:
        if Path(str(name)).name != name or name in (SHARDED_EXTRAS, SHARDED_MANIFEST):
            raise DamagedCheckpointError(
                f"cannot read {where}: its manifest names {name!r}, not a shard in it"
            )
    return text, files, digests, step if isinstance(step, int) and not isinstance(step, bool) else None


def verify_sharded_checkpoint(folder: Path) -> None:
    """Checks a sharded checkpoint's folder against its manifest (:func:`open_sharded_checkpoint`,
    closed again).

    Raises:
        DamagedCheckpointError: The manifest or a file is missing, or a shard changed (size or bytes).
        CheckpointError: A file could not be read (the disk's error: not a verdict on the file).
    """
    open_sharded_checkpoint(folder).close()


def _sha256_held(fds: Mapping[str, int]) -> dict[str, str]:
    """The SHA-256 of each held file, several read at once (one thread per core, at most 8)."""
    threads = min(8, os.cpu_count() or 1, len(fds))
    if threads <= 1:
        return {name: _sha256_fd(fd) for name, fd in fds.items()}
    with ThreadPoolExecutor(threads, thread_name_prefix="ml-sha256") as pool:
        return dict(zip(fds, pool.map(_sha256_fd, fds.values()), strict=True))


def _sha256_fd(fd: int) -> str:
    """The SHA-256 of a held file, read from its start in 1 MiB pieces (hashing releases the GIL)."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(1 << 20))
    offset = 0
    while n := _read_at(fd, buffer, offset):
        digest.update(buffer[:n])
        offset += n
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """The SHA-256 of a regular file, in hex (read in 1 MiB pieces; hashing releases the GIL)."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(1 << 20))
    with open_regular(path) as f:
        while n := f.readinto(buffer):  # type: ignore[attr-defined]
            digest.update(buffer[:n])
    return digest.hexdigest()


def sha256_files(folder: Path, names: Iterable[str], threads: int | None = None) -> dict[str, str]:
    """The SHA-256 of each file ``names`` names in ``folder``, several read at once (by default one
    thread per core, at most 8)."""
    names = list(names)
    threads = threads or min(8, os.cpu_count() or 1)
    if len(names) <= 1 or threads <= 1:
        return {name: sha256_file(folder / name) for name in names}
    with ThreadPoolExecutor(min(threads, len(names)), thread_name_prefix="ml-sha256") as pool:
        return dict(zip(names, pool.map(lambda name: sha256_file(folder / name), names), strict=True))


_shard_digests: dict[Path, dict[str, str]] = {}  # by temporary folder: what the ranks reported
_shard_digests_lock = threading.Lock()


def record_shard_digests(folder: Path, digests: Mapping[str, str]) -> None:
    """Rank 0, after the ranks wrote their shards into ``folder`` (the temporary one): the SHA-256 of
    each file they wrote, which :func:`publish_sharded_checkpoint` puts in the manifest."""
    with _shard_digests_lock:
        _shard_digests[Path(folder)] = dict(digests)


def _take_shard_digests(folder: Path) -> dict[str, str]:
    with _shard_digests_lock:
        return _shard_digests.pop(Path(folder), {})


def link_checkpoint(run: RunDir, path: Path, *, keep_older: bool = False) -> None:
    """Points ``ckpt.pt`` at ``path`` (a checkpoint of this run), then applies retention.

    Also what resuming does: a run killed before its link swap or its retention left a newer
    unlinked checkpoint or older ones behind. Best checkpoints of steps after ``path``'s (a run
    resumed from before them will train those steps again) are forgotten. Retention keeps the
    best (those ``scores.json`` lists, and what ``best.pt`` names). A checkpoint outside the run's
    folder is left alone.
    """
    target = path.resolve()
    if target.parent != run.checkpoints.resolve():
        return
    step = checkpoint_step(target)
    record = _read_scores_record(run)
    scores = _scores_of(record)
    if step is not None and any(s > step for s in scores):
        earlier = {s: v for s, v in scores.items() if s <= step}
        _write_scores(run, earlier, record.get("monitor"), record.get("mode"))
        scores = earlier
    if not (run.link.is_symlink() and run.link.resolve() == target):
        atomic_symlink(target.name, run.link)
    if not keep_older:
        # Every other numbered checkpoint, not only the one the link named before: a process
        # killed between a link swap and this point left its previous one behind.
        keep = {target.name, *(step_checkpoint(run, s).name for s in scores)}
        best = run.best_link
        if best.is_symlink():
            keep.add(os.readlink(best))
        for name in os.listdir(run.checkpoints):
            # Any other numbered checkpoint (a file of the same step too, from before the run went
            # sharded), and sharded writes a killed process left unfinished.
            numbered = checkpoint_step(Path(name)) is not None
            if (numbered and name not in keep) or _SHARDED_TEMP.fullmatch(name):
                _remove(run.checkpoints / name)


def _remove(path: Path) -> None:
    """Removes a checkpoint: a file (or link), or a sharded checkpoint's folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
