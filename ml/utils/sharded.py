"""Defines the tensors of sharded checkpoints: written and read with ``torch.distributed.checkpoint``.

A sharded checkpoint (``trainer.checkpoint.format=sharded``, the folder ``checkpoints/ckpt.<step>``
that :mod:`ml.run.checkpoints` puts in place) holds the model's and the optimizers' tensors as DCP
writes them: every rank writes the shards it holds (FSDP's ``DTensor`` shards; a tensor every rank
holds whole, as under DDP, is written once), all ranks at once, and DCP's ``.metadata`` records
where each piece of each tensor lies. What is not a tensor (the optimizer's ``param_groups``, a
step count kept as a number) stays in a *skeleton* - the state with each tensor replaced by its
name - which ``ml.pt`` holds with the rest of the checkpoint.

Reading reshards: each process asks for the tensors it holds now (its shards under FSDP with any
number of processes, whole tensors without FSDP), and DCP reads just those pieces - from the
folder's files as :func:`ml.utils.checkpoint.read_checkpoint` verified and holds them open
(:attr:`ShardedState.files`), so a run still training may remove the folder meanwhile.

Nothing read here runs code. DCP itself unpickles ``.metadata`` with plain ``pickle`` and reads
non-tensor items with ``torch.load(weights_only=False)`` (torch 2.13); here ``.metadata`` is read
by an unpickler that knows only DCP's metadata classes, torch's dtypes and sizes and ``pathlib``
paths (:class:`SafeFileSystemReader`), each piece it names must be a file of the folder, and a
non-tensor item is refused (ml writes none: :func:`split_tensors`); tensors are read by DCP with
``torch.load(weights_only=True)``.
"""

import contextlib
import io
import logging
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch import nn

from ml.errors import CheckpointError, UnsafeCheckpointError
from ml.run.checkpoints import ShardedFolder
from ml.utils.checkpoint import ShardedState

logger = logging.getLogger(__name__)

TENSOR_MARK = "\x00ml-sharded-tensor:"  # a skeleton's leaf: the tensor of that name is in the folder

# What a DCP ``.metadata`` pickle may name (torch 2.13): its dataclasses, torch's sizes, dtypes and
# layouts, and the checkpoint's path. Nothing else is resolved, so nothing else can be called.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to read the sharded checkpoint {self._path.parent}: its {self._path.name} names "
            f"{module}.{name}, which is not part of torch.distributed.checkpoint's metadata and could "
            "run code"
        )


def _reader_classes() -> tuple[type, type]:
    """The DCP reader and load planner that never unpickle anything but the metadata's classes."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HeldFileSystem(FileSystem):
        """DCP's file access, reading the files of a checkpoint's folder that verified from the
        descriptors held since (:class:`ml.run.checkpoints.ShardedFolder`), not by their names."""

        def __init__(self, files: ShardedFolder) -> None:
            super().__init__()
            self.files = files

        @contextlib.contextmanager
        def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
            name = Path(path).name
            if mode != "rb" or not self.files.holds(name):
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with self.files.open(name) as stream:
                yield stream

    class SafeFileSystemReader(FileSystemReader):
        """DCP's file reader, reading ``.metadata`` with :class:`_MetadataUnpickler`, and only
        pieces that lie in the checkpoint's own folder (from the files held open since they
        verified, when given)."""

        def __init__(self, path: str, files: ShardedFolder | None = None) -> None:
            super().__init__(path)
            if files is not None:
                self.fs = HeldFileSystem(files)

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

            path = Path(self.path) / ".metadata"
            try:
                with self.fs.create_stream(path, "rb") as f:
                    metadata = _MetadataUnpickler(cast(IO[bytes], f), path).load()
            except UnsafeCheckpointError:
                raise
            except FileNotFoundError as e:
                raise CheckpointError(
                    f"{path.parent} has no .metadata: not a complete sharded checkpoint"
                ) from e
            except Exception as e:  # a damaged pickle fails in many ways
                raise CheckpointError(f"cannot read {path}: damaged ({type(e).__name__}: {e})") from e
            if not isinstance(metadata, Metadata):
                raise CheckpointError(f"{path} is not torch.distributed.checkpoint metadata")
            for info in (metadata.storage_data or {}).values():
                name = str(getattr(info, "relative_path", ""))
                if not name or Path(name).name != name:
                    raise UnsafeCheckpointError(f"{path} names {name!r}, which is not a file of its folder")
            storage_meta = metadata.storage_meta or StorageMeta()
            storage_meta.load_id = self.load_id
            metadata.storage_meta = storage_meta
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's planner, refusing non-tensor items (DCP would unpickle them unrestricted)."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            raise UnsafeCheckpointError(
                f"refusing to read {read_item.dest_index.fqn}: a pickled item in a sharded checkpoint "
                "(ml writes tensors only)"
            )

    return SafeFileSystemReader, SafeLoadPlanner


def read_metadata(folder: Path, files: ShardedFolder | None = None) -> Any:
    """The DCP metadata of a sharded checkpoint, read safely (see the module's notes), from its
    files held open when given (:attr:`ShardedState.files`)."""
    reader_class, _ = _reader_classes()
    return reader_class(str(folder), files).read_metadata()


# -- splitting a state into tensors and a skeleton


def split_tensors(value: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors of a (nested) state by name, and its skeleton (each tensor replaced by a mark
    naming it). A name is the tensor's path in the state, joined by ``/``: a model's tensor is named
    by its parameter (``net.0.weight``), an optimizer's by its place (``state/net.0.weight/exp_avg``)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(item: Any, path: str) -> Any:
        if isinstance(item, torch.Tensor):
            tensors[path] = item
            return TENSOR_MARK + path
        if isinstance(item, Mapping):
            return {k: walk(v, f"{path}/{k}" if path else str(k)) for k, v in item.items()}
        if type(item) in (list, tuple):
            return type(item)(walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(item))
        return item

    return tensors, walk(value, "")


def skeleton_tensors(skeleton: Any) -> list[str]:
    """The names of the tensors a skeleton marks, in order."""
    names: list[str] = []

    def walk(item: Any) -> None:
        if isinstance(item, str) and item.startswith(TENSOR_MARK):
            names.append(item[len(TENSOR_MARK) :])
        elif isinstance(item, Mapping):
            for v in item.values():
                walk(v)
        elif isinstance(item, list | tuple):
            for v in item:
                walk(v)

    walk(skeleton)
    return names


def join_tensors(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The state a skeleton stands for, its marks replaced by ``tensors``."""
    if isinstance(skeleton, str) and skeleton.startswith(TENSOR_MARK):
        return tensors[skeleton[len(TENSOR_MARK) :]]
    if isinstance(skeleton, Mapping):
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if type(skeleton) in (list, tuple):
        return type(skeleton)(join_tensors(v, tensors) for v in skeleton)
    return skeleton


# -- the state the ranks hold


def _optimizers(optims: Any) -> dict[str, torch.optim.Optimizer]:
    """``optim`` for one optimizer, ``optim/<name>`` for each of a dict's."""
    if isinstance(optims, Mapping):
        return {f"optim/{name}": optim for name, optim in optims.items()}
    return {"optim": optims}


def _model_state(model: nn.Module) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def _optim_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state by parameter name (for a fresh optimizer, made by a step of lr 0)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optim)


def _quiet_alone() -> None:
    """DCP warns at every read or write without a process group, which is this process's intent.

    Ignored from the first such read or write on, for the process: an asynchronous save warns from
    its background thread, after a ``catch_warnings`` block around the call has ended (it printed the
    warning at each save of a run in one process).
    """
    warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


def _alone() -> bool:
    """Whether this process works without a process group (DCP then reads and writes all by itself)."""
    import torch.distributed as dist

    return not dist.is_initialized()


# -- writing

_async_groups: dict[int, Any] = {}  # per process group: the group of asynchronous saves


def _save_group() -> Any:
    """A gloo group of its own for asynchronous saves: their collectives run in a background thread,
    which must not interleave with the training loop's on the same group (one per process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    world = id(dist.group.WORLD)
    if world not in _async_groups:
        _async_groups.clear()  # of a process group that is gone
        _async_groups[world] = dist.new_group(backend="gloo")
    return _async_groups[world]


def save_shards(
    folder: Path | None, model: nn.Module, optims: Any, *, asynchronous: bool
) -> tuple[dict[str, Any], Future | None]:
    """Writes this rank's shards of the model's and optimizers' tensors into ``folder`` (every rank
    calls this: a collective); None for ``folder`` when the step's shards exist already.

    Right after DCP's write, each rank hashes the files it wrote (all ranks at once) and rank 0
    gathers the SHA-256s, which go into the manifest (:func:`ml.run.checkpoints.record_shard_digests`).

    Asynchronously, this rank's shards are copied to host memory first (:func:`_host_copy`: the
    loop waits for that alone), and DCP writes the copy in a background thread, its collectives on a
    process group of their own: the returned future is done once every rank's shards are durable
    and hashed (:func:`wait_for_shards` waits for it).

    Returns:
        The skeletons of ``model`` and each optimizer (``ml.pt`` keeps them), and the future of an
        asynchronous write (None when the write is done).

    Raises:
        CheckpointWriteError: A rank could not write (the previous checkpoint is kept).
    """
    import torch.distributed.checkpoint as dcp

    state: dict[str, dict[str, torch.Tensor]] = {}
    skeletons: dict[str, Any] = {}
    parts = {"model": _model_state(model)}
    if optims is not None:
        parts.update({key: _optim_state(model, optim) for key, optim in _optimizers(optims).items()})
    for key, part in parts.items():
        state[key], skeletons[key] = split_tensors(part)
    if folder is None:
        return skeletons, None
    writer = _hashing_writer_class()(str(folder), sync_files=True, thread_count=_writer_threads())
    if _alone():
        _quiet_alone()
    try:
        if asynchronous:
            group = _save_group()
            staged = _host_copy(state)  # what the background write reads: training cannot change it
            future = dcp.async_save(
                staged,
                storage_writer=writer,
                process_group=group,
                no_dist=_alone(),
                async_stager=_passthrough_stager(),
            )
            # Staged (copied to host memory) already: the future is the write's, then the hashing.
            return skeletons, cast(Future, _HashedShards(cast(Future, future), folder, writer, group))
        dcp.save(state, storage_writer=writer, no_dist=_alone())
        _share_digests(folder, writer, _save_group())
    except (Exception, _dcp_failure()) as e:
        raise _write_failed(folder, _cause(e)) from e
    return skeletons, None


def _hashing_writer_class() -> type:
    from torch.distributed.checkpoint import FileSystemWriter

    class HashingFileSystemWriter(FileSystemWriter):
        """DCP's file writer, keeping the names of the files this rank wrote (for their digests)."""

        written: tuple[str, ...] = ()

        def write_data(self, plan: Any, planner: Any) -> Any:
            future = super().write_data(plan, planner)
            # FileSystemWriter has written (and fsynced) every file before it returns the future.
            results = future.wait()
            self.written = tuple(sorted({str(r.storage_data.relative_path) for r in results}))
            return future

    return HashingFileSystemWriter


def _share_digests(folder: Path, writer: Any, group: Any) -> None:
    """Every rank hashes the files it wrote into ``folder`` (in parallel threads); rank 0 gathers
    the digests and records them for the manifest. A collective when a process group exists.

    Raises:
        OSError: A file could not be read back (on rank 0: any rank's failure, in words).
    """
    import torch.distributed as dist

    from ml.run.checkpoints import record_shard_digests, sha256_files

    error: str | None = None
    digests: dict[str, str] = {}
    try:
        digests = sha256_files(folder, writer.written, _writer_threads())
    except OSError as e:
        error = f"cannot read back {e.filename or folder}: {e.strerror or e}"
    reports: list[Any] | None
    if _alone():
        reports = [(digests, error)]
    else:
        reports = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((digests, error), reports, dst=0, group=group)
    if error is not None:
        raise OSError(error)
    if reports is None:  # not rank 0
        return
    merged: dict[str, str] = {}
    for report in reports:
        digests_of_rank, error_of_rank = cast(tuple[dict[str, str], str | None], report)
        if error_of_rank is not None:
            raise OSError(error_of_rank)
        merged.update(digests_of_rank)
    record_shard_digests(folder, merged)


class _HashedShards:
    """The future of an asynchronous :func:`save_shards`: DCP's write, then the digests of what each
    rank wrote (hashed and gathered by :func:`wait_for_shards`, in the thread that waits)."""

    def __init__(self, write: Future, folder: Path, writer: Any, group: Any) -> None:
        self._write = write
        self._folder = folder
        self._writer = writer
        self._group = group
        self._hashed = False

    def done(self) -> bool:
        return self._hashed

    def result(self, timeout: float | None = None) -> None:
        if self._hashed:
            return
        self._write.result(timeout)
        _share_digests(self._folder, self._writer, self._group)
        self._hashed = True


def _writer_threads() -> int:
    """DCP's writing threads per process: the machine's cores shared by the node's processes (at
    most 4); a file per thread."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(4, (os.cpu_count() or 1) // max(local, 1)))


def _host_copy(state: Any) -> Any:
    """A copy of a nested state in host memory of its own, each rank's shard alone (a ``DTensor``
    stays one, around a copy of its local piece): one shard's worth of memory."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, Mapping):
        return {k: _host_copy(v) for k, v in state.items()}
    if isinstance(state, DTensor):
        local = state.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(
            local,
            state.device_mesh,
            state.placements,
            run_check=False,
            shape=state.shape,
            stride=state.stride(),
        )
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    return state


def _staged_class() -> type:
    from torch.distributed.checkpoint.staging import AsyncStager

    class Staged(AsyncStager):
        """DCP's stager for a state already copied to host memory (:func:`_host_copy`): DCP's own
        copies a DTensor's local piece with more memory than the piece (torch 2.13, measured)."""

        _synchronize_after_execute = False

        def stage(self, state_dict: Any) -> Any:
            return state_dict

        def synchronize_staging(self) -> None:
            return None

        def close(self) -> None:
            return None

    return Staged


def _passthrough_stager() -> Any:
    return _staged_class()()


def wait_for_shards(folder: Path, future: Future) -> None:
    """Waits for an asynchronous :func:`save_shards` to end.

    Raises:
        CheckpointWriteError: A rank could not write.
    """
    try:
        future.result()
    except (Exception, _dcp_failure()) as e:
        raise _write_failed(folder, _cause(e)) from e


def _dcp_failure() -> type[BaseException]:
    """DCP's error of a failed save or load (a BaseException: an ``except Exception`` misses it)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _cause(error: BaseException) -> BaseException:
    """The first rank's own error inside DCP's (which lists every rank's, with tracebacks)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return error


def _write_failed(folder: Path, error: BaseException) -> Exception:
    from ml.errors import CheckpointWriteError
    from ml.run.checkpoints import io_reason

    return CheckpointWriteError(
        f"cannot write the shards of {folder.name}: {io_reason(error, folder.parent)}; the checkpoint "
        "before it is kept"
    )


# -- reading


def _load(state: dict[str, dict[str, torch.Tensor]], part: ShardedState, *, alone: bool = False) -> None:
    """Fills ``state``'s tensors (this rank's pieces) from the part's checkpoint folder (its files
    held open, when it has them; a collective when a process group exists, unless ``alone``: read by
    this process by itself).

    Raises:
        CheckpointError: DCP could not read them (its first error, in one line).
    """
    import torch.distributed.checkpoint as dcp

    folder = part.folder
    reader_class, planner_class = _reader_classes()
    if alone or _alone():
        _quiet_alone()
    try:
        dcp.load(
            state,
            storage_reader=reader_class(str(folder), part.files),
            planner=planner_class(),
            no_dist=alone or _alone(),
        )
    except (CheckpointError, UnsafeCheckpointError):
        raise
    except (Exception, _dcp_failure()) as e:
        cause = _cause(e)
        if isinstance(cause, CheckpointError | UnsafeCheckpointError):
            raise cause from e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise CheckpointError(f"cannot load the sharded checkpoint {folder}: {first}") from e


def _check_keys(saved: list[str], wanted: list[str], what: str, where: Path, *, strict: bool) -> list[str]:
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    notes = []
    if missing:
        notes.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        notes.append(f"unexpected keys: {', '.join(unexpected)}")
    if strict and notes:
        raise CheckpointError(
            f"the {what} of {where} do not fit: {'; '.join(notes)} "
            "(checkpoint.load_strict=false loads what fits)"
        )
    return notes


def load_sharded_model(model: nn.Module, part: ShardedState, *, strict: bool) -> list[str]:
    """Loads a sharded checkpoint's model weights into ``model`` (plain, DDP or FSDP; every rank
    calls this), each rank reading the pieces it holds; returns notes on keys that did not fit."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    own = _model_state(model)
    tensors, _ = split_tensors(own)
    saved = skeleton_tensors(part.skeleton)
    notes = _check_keys(saved, list(tensors), "weights", part.folder, strict=strict)
    sizes = _saved_sizes(part)
    misfits = [n for n, t in tensors.items() if n in sizes and sizes[n] != tuple(t.shape)]
    if misfits:
        shapes = ", ".join(f"{n} {sizes[n]} vs {tuple(tensors[n].shape)}" for n in misfits)
        if strict:
            raise CheckpointError(
                f"the weights of {part.folder} do not fit the model: shapes differ: {shapes} "
                "(checkpoint.load_strict=false loads what fits)"
            )
        notes.append(f"not loaded, shapes differ: {shapes}")
    wanted = {name: t for name, t in tensors.items() if name in sizes and name not in misfits}
    _load({part.key: wanted}, part)
    try:
        set_model_state_dict(model, own, options=StateDictOptions(strict=strict))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"the weights of {part.folder} do not fit the model: {str(e).splitlines()[0]}"
        ) from e
    return notes


def _saved_sizes(part: ShardedState) -> dict[str, tuple[int, ...]]:
    """The whole shape of each tensor of ``part``, from the metadata."""
    metadata = read_metadata(part.folder, part.files)
    prefix = f"{part.key}."
    return {
        key[len(prefix) :]: tuple(entry.size)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and hasattr(entry, "size")
    }


def load_sharded_optims(model: nn.Module, optims: Any, parts: Mapping[str, ShardedState]) -> None:
    """Loads a sharded checkpoint's optimizer state (every rank calls this), resharded to the
    parameters this rank holds now."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    for key, optim in _optimizers(optims).items():
        part = parts.get(key)
        if part is None:
            raise CheckpointError(f"the sharded checkpoint has no {key} (it has {', '.join(sorted(parts))})")
        own, _ = split_tensors(_optim_state(model, optim))
        saved = skeleton_tensors(part.skeleton)
        _check_keys(saved, list(own), "optimizer state", part.folder, strict=True)
        _load({key: own}, part)
        try:
            set_optimizer_state_dict(model, optim, optim_state_dict=join_tensors(part.skeleton, own))
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"the optimizer state of {part.folder} does not fit: {str(e).splitlines()[0]}"
            ) from e


def model_tensor_specs(part: ShardedState) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The dtype and whole shape of each of the model's tensors, from the metadata (nothing else read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(part.folder, part.files)
    specs = {}
    for name in skeleton_tensors(part.skeleton):
        entry = metadata.state_dict_metadata.get(f"{part.key}.{name}")
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{part.folder}: the metadata has no tensor {name}")
        specs[name] = (entry.properties.dtype, tuple(entry.size))
    return specs


def stream_model_tensors(
    part: ShardedState, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors whole, one at a time, in ``specs``' order (one in memory at once), read in
    this process alone."""
    for name, (dtype, shape) in specs.items():
        tensor = torch.empty(shape, dtype=dtype)
        _load({part.key: {name: tensor}}, part, alone=True)
        yield name, tensor
        del tensor


def checkpoint_format(mode: str, configured: str | None) -> str:
    """``trainer.checkpoint.format`` as it applies: ``sharded`` under FSDP unless set, else ``full``."""
    if configured is not None:
        return configured
    return "sharded" if mode == "fsdp" else "full"
