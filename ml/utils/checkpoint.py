"""Defines safe checkpoint reading and the pieces of a checkpoint that are not module state.

Checkpoints are read with ``torch.load(weights_only=True)`` only: a file holding anything but
tensors, numbers, strings and containers is refused, never unpickled. Before writing, the payload is
checked for such values too, so a checkpoint that could not be loaded again is never written.

Before ``torch.load`` sees a file (:func:`verify_checkpoint`, which :func:`read_checkpoint` runs):

- it is opened without blocking and must be a regular file (a FIFO would hang ``open``);
- it must be a zip archive (what ``torch.save`` writes) whose directory can be read: a truncated
  file has lost its directory, which is at the end;
- its checksum, when it has one (every checkpoint ml writes, see :mod:`ml.run.checkpoints`), must
  match: a changed bit anywhere is found, before any of it is loaded (a sharded checkpoint's shards:
  against its manifest; and its ``ml.pt`` must be of the same save as the shards);
- no entry may be compressed (``torch.save`` stores them as they are, and ``torch.load`` would
  inflate them), and the sizes the entries declare must sum to no more than the file's size: what
  ``torch.load`` then reads is bounded by the file's size, whatever the archive claims. This is the
  bound, rather than one derived from the model: the optimizer's and the task's state (lazily made
  moments, replay buffers) have no size known before loading, so a bound from the model would
  either refuse good checkpoints or be loose; a stored archive cannot hold more than its file.
"""

import copy
import json
import os
import pickle
import random
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch
from torch import nn

from ml.errors import CheckpointError, DamagedCheckpointError, UnsafeCheckpointError
from ml.run.checkpoints import (
    MANIFEST_DIGEST,
    SHARDED_EXTRAS,
    SHARDED_MANIFEST,
    ShardedFolder,
    is_sharded_checkpoint,
    open_sharded_checkpoint,
    verify_checksum,
)
from ml.run.layout import checkpoint_step
from ml.utils.atomic import NotARegularFileError, open_regular

_PLAIN = (torch.Tensor, int, float, str, bool, bytes, type(None), torch.Size, torch.dtype, torch.device)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class ShardedState:
    """A part of a sharded checkpoint (``model`` or ``optim``) whose tensors stay in its folder until
    they are loaded into a model or optimizer (:mod:`ml.utils.sharded`), or streamed out by ``ml export``.

    Attributes:
        folder: The checkpoint's folder (``checkpoints/ckpt.<step>``).
        key: The part's name among the folder's tensors (``model``, ``optim``, ``optim/<name>``).
        skeleton: The part as saved with each tensor replaced by its name (the rest: plain values).
        files: The folder's files, held open since they verified (:func:`read_checkpoint`): what is
            read is what verified, even if a run still training removes the folder meanwhile. None:
            read by path.
    """

    folder: Path
    key: str
    skeleton: Any
    files: ShardedFolder | None = field(default=None, compare=False, repr=False)


_READS = 3  # tries at reading a link that moved on meanwhile (a run still training)


def read_checkpoint(path: str | Path, device: str | torch.device | None = None) -> dict[str, Any]:
    """Reads a checkpoint file without ever unpickling arbitrary objects.

    The file is checked first (:func:`verify_checkpoint`), then read from the same open file. A
    sharded checkpoint (a folder) is checked against its manifest, its files held open from then on
    (:class:`~ml.run.checkpoints.ShardedFolder`); then its ``ml.pt`` is read as a file is, and must
    belong to the same save (the manifest's SHA-256 it holds; its step, the manifest's and the
    folder's name agree). Its ``model`` and ``optim`` are then :class:`ShardedState` (nothing of
    them read yet). A link (``ckpt.pt``) whose checkpoint is removed while it is read - a run still
    training moved it on - is read again, where it now points.

    Args:
        path: The file or sharded checkpoint folder (a ``ckpt.pt`` link is followed).
        device: Where to put the tensors (``map_location``).

    Returns:
        The checkpoint dict.

    Raises:
        DamagedCheckpointError: The file is missing, not a regular file, truncated or changed since
            it was written, or a sharded checkpoint's parts are of different saves (a
            :class:`CheckpointError`).
        CheckpointError: The file is not a checkpoint of this framework, or its archive is foreign
            (compressed entries, sizes beyond the file).
        UnsafeCheckpointError: The file contains objects other than tensors and plain data.
    """
    path = Path(path)
    for attempt in range(_READS):
        target = path.resolve()
        try:
            return _read_checkpoint(path, device)[0]
        except DamagedCheckpointError:
            if attempt == _READS - 1 or not path.is_symlink() or path.resolve() == target:
                raise
    raise AssertionError("unreachable")


def _read_checkpoint(path: Path, device: str | torch.device | None) -> tuple[dict[str, Any], bool]:
    """:func:`read_checkpoint` once; and whether the file (``ml.pt``) had a checksum."""
    if is_sharded_checkpoint(path):
        folder = path.resolve()
        files = open_sharded_checkpoint(folder)
        try:
            with files.open(SHARDED_EXTRAS) as f:
                ckpt, checked = _load(f, folder / SHARDED_EXTRAS, device)
            parts = ckpt.pop("sharded", None) if isinstance(ckpt, dict) else None
            if not isinstance(parts, dict):
                raise CheckpointError(
                    f"{path} is not an ml sharded checkpoint (its {SHARDED_EXTRAS} lists no parts)"
                )
            _check_one_save(files, ckpt)
        except BaseException:
            files.close()
            raise
        for key, skeleton in parts.items():
            ckpt[key] = ShardedState(folder, key, skeleton, files)
    else:
        with _open(path) as f:
            ckpt, checked = _load(f, path, device)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "state" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not an ml checkpoint (expected keys 'model' and 'state', found {keys})"
        )
    return ckpt, checked


def _check_one_save(files: ShardedFolder, ckpt: dict[str, Any]) -> None:
    """Refuses a sharded checkpoint whose ``ml.pt`` and shards are of different saves (an ``ml.pt``
    copied from another checkpoint's folder): ``ml.pt`` holds its manifest's SHA-256 (those written
    before it did are compared by their steps alone), and its step, the manifest's and the folder
    name's must agree.

    Raises:
        DamagedCheckpointError: They do not.
    """
    where = f"cannot read sharded checkpoint {files.folder}"
    fix = "restore the folder's own, or use another checkpoint"
    steps = {
        SHARDED_EXTRAS: _step_of(ckpt),
        SHARDED_MANIFEST: files.step,
        "the folder's name": checkpoint_step(files.folder),
    }
    known = {what: step for what, step in steps.items() if step is not None}
    if len(set(known.values())) > 1:
        said = ", ".join(f"{what} says step {step}" for what, step in known.items())
        raise DamagedCheckpointError(f"{where}: its files are of different saves ({said}); {fix}")
    bound = ckpt.pop(MANIFEST_DIGEST, None)
    if bound is not None and bound != files.manifest_sha256:
        raise DamagedCheckpointError(
            f"{where}: its {SHARDED_EXTRAS} was written with other shards (it holds the SHA-256 of "
            f"another {SHARDED_MANIFEST}: a file of another save); {fix}"
        )


def _step_of(ckpt: Mapping[str, Any]) -> int | None:
    """The step a checkpoint's ``state`` names (a JSON string, or a dict in older ones); None if none."""
    raw = ckpt.get("state")
    try:
        state = json.loads(raw) if isinstance(raw, str) else raw
        step = state["num_steps"] if isinstance(state, Mapping) else None
    except (ValueError, KeyError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _load(f: IO[bytes], path: Path, device: str | torch.device | None) -> tuple[Any, bool]:
    """The checkpoint in the open file ``f`` (checked first), and whether it had a checksum."""
    checked = _check_file(f, path)
    f.seek(0)
    try:
        return torch.load(f, map_location=device, weights_only=True), checked
    except pickle.UnpicklingError as e:
        refused = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if not refused:
            raise CheckpointError(f"cannot read checkpoint {path}: not a torch checkpoint, or damaged") from e
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds pickled objects that could run code ({refused[0]})"
        ) from e
    except Exception as e:  # a damaged archive fails in many ways (zip, pickle memo, EOF, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is damaged or not a torch file ({first})"
        ) from e


def verify_checkpoint(path: str | Path) -> bool:
    """Checks a checkpoint file as :func:`read_checkpoint` does before loading it (see the module's
    notes), without loading it. A sharded checkpoint's ``ml.pt`` is loaded (it is small: the shards
    are not), to check that it belongs to the same save as the shards.

    Returns:
        Whether its checksum was checked (False: a file without one, from before checksums).

    Raises:
        DamagedCheckpointError: Missing, not a regular file, truncated, or changed since written
            (or a sharded checkpoint's parts of different saves).
        CheckpointError: Not a zip archive as ``torch.save`` writes them.
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        ckpt, checked = _read_checkpoint(path, "cpu")
        close_checkpoint(ckpt)
        return checked
    with _open(path) as f:
        return _check_file(f, path)


def close_checkpoint(ckpt: Mapping[str, Any]) -> None:
    """Closes the files a sharded checkpoint's parts hold (:func:`read_checkpoint`) once it is read."""
    for value in ckpt.values():
        if isinstance(value, ShardedState) and value.files is not None:
            value.files.close()


def _open(path: Path) -> IO[bytes]:
    try:
        return open_regular(path)
    except FileNotFoundError as e:
        raise DamagedCheckpointError(f"checkpoint not found: {path}") from e
    except NotARegularFileError as e:
        raise DamagedCheckpointError(
            f"cannot read checkpoint {path}: not a regular file (a FIFO, socket, device or folder); "
            "put a checkpoint file there"
        ) from e
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e


_ZIP_MAGIC = b"PK\x03\x04"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.0f} {unit}"
    return f"{n} bytes"


def _check_file(f: IO[bytes], path: Path) -> bool:
    """The checks of :func:`verify_checkpoint` on the open file; whether a checksum was checked."""
    f.seek(0)
    if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
        raise DamagedCheckpointError(
            f"cannot read checkpoint {path}: not a torch checkpoint, or damaged (torch.save writes a zip "
            "archive, and this file does not start like one)"
        )
    # First the checksum: a changed bit is named as such, wherever it is (the zip directory too).
    checked = verify_checksum(f, path)
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as archive:  # reads the directory only, at the end of the file
            entries = archive.infolist()
    except OSError:  # the disk failed to read it: not a verdict on the file
        raise
    except Exception as e:  # a damaged directory fails in many ways (BadZipFile, struct, Unicode...)
        raise DamagedCheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or damaged (its zip directory cannot "
            f"be read: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
            "restore a good copy, or use another checkpoint"
        ) from e
    declared = sum(entry.file_size for entry in entries)
    compressed = [
        e for e in entries if e.compress_type != zipfile.ZIP_STORED or e.compress_size != e.file_size
    ]
    if compressed:
        raise CheckpointError(
            f"refusing to load {path}: {len(compressed)} of its {len(entries)} entries are compressed "
            f"({_size(size)} on disk, inflating to {_size(declared)}); torch.save stores entries as they "
            "are, so this file was not written by it"
        )
    if declared > size:
        raise CheckpointError(
            f"refusing to load {path}: its entries declare {declared} bytes, more than the file's "
            f"{size}; it was not written by torch.save"
        )
    return checked


def check_loadable(value: Any, where: str = "checkpoint") -> None:
    """Raises ``TypeError`` naming the first value that ``weights_only`` loading would refuse."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (dict, OrderedDict)):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            check_loadable(item, f"{where}.{key}")
        return
    if isinstance(value, (list, tuple, set)):
        for i, item in enumerate(value):
            check_loadable(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__qualname__}, which torch.load(weights_only=True) cannot read back; "
        "store tensors, numbers, strings, lists or dicts instead"
    )


def optimizer_misfit(reason: str) -> CheckpointError:
    """The one line for a checkpoint's optimizer state that does not fit the optimizer."""
    return CheckpointError(
        f"the checkpoint's optimizer state does not fit the optimizer ({reason}): were the model's "
        "parameters or optimizer.weight_decay (0 or not) changed since?"
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """Returns the module inside DDP/FSDP-style (``.module``) and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _strip_wrapper_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def load_model_state(model: nn.Module, state_dict: Mapping[str, Any], *, strict: bool) -> list[str]:
    """Loads model weights, tolerating the ``module.``/``_orig_mod.`` prefixes wrappers add.

    The weights go into the module inside any wrapper. The keys are used as saved when they fit;
    otherwise with the wrapper prefixes removed.

    Returns:
        Human-readable notes about missing/unexpected keys (non-strict loading only).

    Raises:
        CheckpointError: In strict mode, when the keys or shapes do not match the model.
    """
    target = unwrap_model(model)
    expected = set(target.state_dict().keys())
    if set(state_dict) != expected:
        stripped = {_strip_wrapper_prefixes(k): v for k, v in state_dict.items()}
        if len(stripped) == len(state_dict) and len(expected & set(stripped)) > len(
            expected & set(state_dict)
        ):
            state_dict = stripped
    notes = []
    if not strict:  # load what fits: tensors of another shape are left out (and named)
        own = target.state_dict()
        misfits = [
            k
            for k, v in state_dict.items()
            if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)
        ]
        if misfits:
            notes.append(
                "not loaded, shapes differ: "
                + ", ".join(f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in misfits)
            )
            state_dict = {k: v for k, v in state_dict.items() if k not in misfits}
    try:
        result = target.load_state_dict(dict(state_dict), strict=strict)
    except RuntimeError as e:
        # torch lists every problem on its own line: name the first ones, not the generic header.
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        shown = "; ".join(details[:3]) + (f"; and {len(details) - 3} more" if len(details) > 3 else "")
        raise CheckpointError(
            f"checkpoint weights do not fit the model: {shown or str(e).splitlines()[0]} "
            "(checkpoint.load_strict=false loads what fits)"
        ) from e
    if result.missing_keys:
        notes.append(f"missing keys: {', '.join(result.missing_keys)}")
    if result.unexpected_keys:
        notes.append(f"unexpected keys: {', '.join(result.unexpected_keys)}")
    return notes


def get_rng_state() -> dict[str, Any]:
    """Captures the Python, NumPy, torch CPU and CUDA generator states as plain data."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = cast(
        tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True)
    )
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
        # The process's own GPU's (the one it trains on): resumed where the GPUs are numbered
        # otherwise (another CUDA_VISIBLE_DEVICES), it goes to the GPU trained on, not by number.
        state["cuda_current"] = torch.cuda.get_rng_state().cpu()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what :func:`get_rng_state` captured (parts missing from ``state`` are left alone)."""
    if "python" in state:
        version, values, gauss = state["python"]
        random.setstate((version, tuple(values), gauss))
    if "numpy" in state:
        np_state = state["numpy"]
        keys = np_state["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state(
            (np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        # Those of the GPUs visible now: a checkpoint saved where more were visible (a process
        # trains on one) is resumed, not refused with an IndexError.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)
        if "cuda_current" in state:
            torch.cuda.set_rng_state(state["cuda_current"].cpu())


class HostSnapshot:
    """Copies checkpoints into host memory that belongs to the copy alone (for asynchronous saves).

    :meth:`take` rebuilds the containers and copies every tensor's memory into a host buffer, so
    the copy can be written in the background while training changes the originals in place (the
    next optimizer step). Tensors sharing memory (tied weights, views) share it in the copy too,
    so ``torch.save`` writes the same file from either. From a CUDA device the buffers are pinned
    and the copies asynchronous, waited for once at the end.

    Once the copy is written, :meth:`release` keeps its buffers for the next :meth:`take` (a
    pinned allocation is slow, and fresh host pages cost page faults): between saves one copy of
    the checkpoint stays allocated.
    """

    def __init__(self) -> None:
        self._spare: dict[tuple[int, bool], list[torch.Tensor]] = {}
        self._used: list[tuple[tuple[int, bool], torch.Tensor]] = []

    def take(self, value: Any) -> Any:
        """A copy of ``value`` (tensors and plain data) whose tensors live in this object's buffers.

        The buffers of the previous copy are reused only if :meth:`release` was called for it
        (once it is no longer read); otherwise they are left to it.
        """
        self._used = []
        copies: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        cuda_devices: set[torch.device] = set()
        try:
            return self._copy(value, copies, cuda_devices)
        finally:
            for device in cuda_devices:  # the pinned copies were queued on the device's stream
                torch.cuda.synchronize(device)
            self._spare.clear()  # buffers that fit nothing this time are freed

    def release(self) -> None:
        """The last copy is written and dropped: its buffers may be reused."""
        for key, buffer in self._used:
            self._spare.setdefault(key, []).append(buffer)
        self._used = []

    def _buffer(self, nbytes: int, pinned: bool) -> torch.Tensor:
        key = (nbytes, pinned)
        spare = self._spare.get(key)
        buffer = spare.pop() if spare else torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self._used.append((key, buffer))
        return buffer

    def _copy_tensor(
        self,
        tensor: torch.Tensor,
        copies: dict[tuple[int, int, torch.device], torch.Tensor],
        cuda_devices: set[torch.device],
    ) -> torch.Tensor:
        if (
            type(tensor) not in (torch.Tensor, nn.Parameter)
            or tensor.layout != torch.strided
            or tensor.is_quantized
            or tensor.is_conj()
            or tensor.is_neg()
        ):
            return tensor.detach().to("cpu", copy=True)  # sparse, quantized, subclasses: torch's copy
        storage = tensor.untyped_storage()
        device = tensor.device
        key = (storage.data_ptr(), storage.nbytes(), device)
        memory = copies.get(key)
        if memory is None:
            source = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
            pinned = device.type == "cuda"
            memory = self._buffer(storage.nbytes(), pinned)
            if device.type == "cpu":
                # A plain memcpy: torch's copy_ splits every tensor over its thread pool, which
                # costs more than it gains when the cores are busy (data loaders): 10x slower on
                # a loaded 2-core machine.
                np.copyto(memory.numpy(), source.numpy())
            else:
                memory.copy_(source, non_blocking=pinned)
            if pinned:
                cuda_devices.add(device)
            copies[key] = memory
        out = torch.empty(0, dtype=tensor.dtype).set_(
            memory.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride()
        )
        if type(tensor) is nn.Parameter:
            return nn.Parameter(out, requires_grad=tensor.requires_grad)
        return out.requires_grad_(tensor.requires_grad)

    def _copy(
        self,
        value: Any,
        copies: dict[tuple[int, int, torch.device], torch.Tensor],
        cuda_devices: set[torch.device],
    ) -> Any:
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value, copies, cuda_devices)
        if isinstance(value, dict):
            out = copy.copy(value)  # keeps the type and attributes (a state dict's ``_metadata``)
            for key, item in value.items():
                out[key] = self._copy(item, copies, cuda_devices)
            return out
        if type(value) in (list, tuple):
            return type(value)(self._copy(item, copies, cuda_devices) for item in value)
        return copy.deepcopy(value)  # numbers, strings and the like: immutable, returned as they are
