"""Defines the data order of training: a sampler that can resume in the middle of an epoch.

The order of epoch ``e`` is a permutation drawn from a generator seeded with ``seed + e``, so it is
the same in every run and on every resume. Resuming at position ``p`` slices the permutation at
``p``: no batch is loaded to skip ahead, so resume time does not grow with the position.

In a job of ``world_size`` processes, rank ``r`` takes positions ``r, r + W, r + 2W, ...`` of what
remains of the epoch, cut to the same length on every rank (up to ``W - 1`` samples at the end of an
epoch are left out). Then step ``i`` of every rank together covers positions ``[i*W*B, (i+1)*W*B)``
of the remainder, exactly the batch a single process with batch size ``W*B`` takes, so the position
in samples means the same for any number of processes, and a run can resume with another world size.
Evaluation shards the same way without cutting (ranks may differ by one sample).

With worker processes, which worker loads a sample depends on where the iteration started, so
random draws inside ``__getitem__`` (augmentation) would change on resume. :class:`SeededDataset`
fixes that: each sample is loaded with the generators seeded from ``(seed, epoch, position)`` (a
dataset with torch's batched ``__getitems__``: each batch, from its first sample's seed). Since
nothing a worker keeps decides the order or the draws, workers may live on between epochs
(``persistent_workers``) without changing either.
"""

import copy
import dataclasses
import functools
import itertools
import random
from collections import UserDict
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ml.utils.signals import isolate_from_stop_signals

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, epoch, position) over the seed space


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A seed for the sample at ``position`` of ``epoch``, distinct for every triple in practice."""
    return ((seed * _MIX + epoch) * _MIX + position) % 2**63


# The sampler hands indices out this many at a time. Made into one list per epoch (as before), 20M
# samples took 1.22 s to the first index and +919 MB of peak memory (48 B/sample: the int64
# permutation, then 20M Python ints and the list); in chunks, with the int32 permutation, 0.55 s and
# +80 MB (4 B/sample), in the same order (ru_maxrss around the first next(iter(sampler)), one
# process per case, 2 cores, torch 2.13 CPU; 2 processes' rank 0 alike: 0.97 s, +536 MB before).
_INDEX_CHUNK = 65_536


class ResumableSampler(Sampler[int]):
    """Yields dataset indices for one epoch, optionally shuffled, from a start position.

    Args:
        data: The dataset (only its length is used).
        shuffle: Draw a new permutation each epoch.
        seed: Base seed of the permutations.
        with_seeds: Yield ``(index, seed)`` keys for :class:`SeededDataset`.
        rank: This process's rank.
        world_size: The number of processes sharing the data.
        even: Cut every rank's share to the same length (training; DDP needs equal step counts).
    """

    def __init__(
        self,
        data: Sized,
        *,
        shuffle: bool,
        seed: int,
        with_seeds: bool = False,
        rank: int = 0,
        world_size: int = 1,
        even: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world of {world_size} processes")
        self.num_samples = len(data)
        self.shuffle = shuffle
        self.seed = seed
        self.with_seeds = with_seeds
        self.rank = rank
        self.world_size = world_size
        self.even = even
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch's order and the position (in samples) to start from."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} is outside the epoch of {self.num_samples} samples")
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        """The epoch's order: the index at each position.

        A permutation is int32 where that holds every index: torch's CPU randperm draws the same
        numbers whatever the dtype (it only stores them in it), so the order is int64's, in half the
        memory and ~30% less time.
        """
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        dtype = torch.int32 if self.num_samples <= torch.iinfo(torch.int32).max else torch.int64
        return torch.randperm(self.num_samples, generator=generator, dtype=dtype)

    def _positions(self) -> range:
        """The epoch positions this rank reads, from :attr:`start` on."""
        remaining = self.num_samples - self.start
        end = self.num_samples
        if self.even:
            end = self.start + remaining // self.world_size * self.world_size
        return range(self.start + self.rank, end, self.world_size)

    def _indices(self, positions: range) -> Iterator[int]:
        """The dataset indices at ``positions``, made into Python ints a chunk at a time.

        Handed out by itertools, with no Python frame per index: as two generators, they cost a
        batch of 64 about 130 generator resumes, a third of what ``ml`` added to a plain loop's
        Python calls per step (tiny MLP, ``bench/overhead.py``).
        """
        if not self.shuffle:
            return iter(positions)  # the index at position p is p: no tensor at all
        mine = self.order()[positions.start : positions.stop : positions.step]
        chunks = range(0, len(mine), _INDEX_CHUNK)
        return itertools.chain.from_iterable(mine[begin : begin + _INDEX_CHUNK].tolist() for begin in chunks)

    def __iter__(self) -> Iterator[Any]:
        positions = self._positions()
        indices = self._indices(positions)
        if not self.with_seeds:
            return indices
        # The epoch as it is now, as the order's: a set_epoch while this iterator is in use is the next's.
        seeds = map(functools.partial(sample_seed, self.seed, self.epoch), positions)
        return zip(indices, seeds, strict=True)

    def __len__(self) -> int:
        return len(self._positions())


def resumable_loader(
    dataset: Any,
    cfg: Any,
    *,
    seed: int,
    device_type: str,
    phase: str,
    owner: str,
    rank: int = 0,
    world_size: int = 1,
    even: bool = True,
) -> DataLoader:
    """A map-style dataset's loader in a resumable order (:class:`ResumableSampler`, seeded by ``seed``
    and the epoch); with workers, each sample's random draws are seeded too (:class:`SeededDataset`).

    ``cfg`` is the task's data loader config (``batch_size``, ``shuffle``, ``num_workers``,
    ``pin_memory`` (None: on CUDA), ``drop_last``, ``persistent_workers``, ``prefetch_factor``; the
    last two mean nothing without workers and are then left out). Training data that gives this
    rank no batch is refused: an epoch without a step would loop forever (``owner`` names the task).
    """
    check_prefetch_factor(cfg, phase, owner)
    workers = cfg.num_workers > 0  # and then exact random draws in them on resume: SeededDataset
    if workers:
        prepare_worker_processes()
    sampler = ResumableSampler(
        dataset,
        shuffle=cfg.shuffle,
        seed=seed,
        with_seeds=workers,
        rank=rank,
        world_size=world_size,
        even=even,
    )
    if phase == "train":
        _check_every_epoch_has_a_batch(sampler, cfg, owner)
    return DataLoader(
        seeded_dataset(dataset) if workers else dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device_type == "cuda" if cfg.pin_memory is None else cfg.pin_memory,
        drop_last=cfg.drop_last,
        generator=torch.Generator(),  # the workers' seeds: not drawn from the global generator
        worker_init_fn=isolate_from_stop_signals,
        # Torch refuses both without workers, where they mean nothing: a config that turns workers
        # off (num_workers=0 to debug) needs no other change.
        persistent_workers=workers and cfg.persistent_workers,
        prefetch_factor=cfg.prefetch_factor if workers else None,
    )


def check_prefetch_factor(cfg: Any, phase: str, owner: str) -> None:
    """Refuses a ``prefetch_factor`` below 1 (torch's own error would come at the first batch)."""
    from ml.errors import ConfigError

    if cfg.prefetch_factor is not None and cfg.prefetch_factor < 1:
        raise ConfigError(
            f"task.{phase}_dl.prefetch_factor of {owner} is {cfg.prefetch_factor}: set it to 1 or more "
            "(batches each worker loads ahead), or null for torch's 2"
        )


def _check_every_epoch_has_a_batch(sampler: ResumableSampler, cfg: Any, owner: str) -> None:
    """Refuses training data of which this rank's share of an epoch makes no batch.

    Every epoch gives a rank as many samples (its cut share, :class:`ResumableSampler`), so one
    epoch without a batch means all are: the training loop would go from empty epoch to empty epoch
    forever, never reaching a step boundary where it stops for a signal.
    """
    from ml.errors import ConfigError

    per_rank = len(sampler)  # epoch 0 from its start
    batches = per_rank // cfg.batch_size if cfg.drop_last else -(-per_rank // cfg.batch_size)
    if batches > 0:
        return
    world_size = sampler.world_size
    fixes = ["a larger set", "a smaller task.train_dl.batch_size"]
    if cfg.drop_last and per_rank > 0:
        fixes.append("task.train_dl.drop_last=false")
    if world_size > 1:
        fixes.append("fewer processes")
    samples = f"{sampler.num_samples} sample{'' if sampler.num_samples == 1 else 's'}"
    share = f"{samples} over {world_size} processes leave {per_rank} to each" if world_size > 1 else samples
    raise ConfigError(
        f"the training data of {owner} has no complete batch for a process: {share}, with batch_size "
        f"{cfg.batch_size} and drop_last {str(cfg.drop_last).lower()}; "
        f"use {', '.join(fixes[:-1])} or {fixes[-1]}"
    )


def rest_of_epoch(loader: Any, epoch: int, position: int, data_seed: int) -> Iterator[Any]:
    """The batches of ``loader`` (over a :class:`ResumableSampler`) from sample ``position`` of epoch
    ``epoch`` on: where a checkpoint left the data order, which depends only on ``(data_seed, epoch)``.

    The sampler skips ahead by index, without loading a batch; the loader's generator (the workers'
    seeds) is seeded from the epoch too. The one rule the trainers resume their data order by.

    Raises:
        CheckpointError: ``position`` is past the end of the data (the dataset changed since).
    """
    from ml.errors import CheckpointError

    sampler = loader.sampler
    assert isinstance(sampler, ResumableSampler) and loader.generator is not None
    if position > sampler.num_samples:
        raise CheckpointError(
            f"the checkpoint stands at sample {position} of epoch {epoch}, but the training data now "
            f"has {sampler.num_samples} samples: was the dataset changed?"
        )
    sampler.set_epoch(epoch, start=position)
    loader.generator.manual_seed(data_seed + epoch)
    return iter(loader)


class SeededDataset(Dataset):
    """Loads ``(index, seed)`` keys: seeds every generator with ``seed``, then returns ``data[index]``.

    Build it with :func:`seeded_dataset`, which keeps a dataset's batched fetch.
    """

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        _seed_generators(seed)
        return self.data[index]


class _BatchedSeededDataset(SeededDataset):
    """A :class:`SeededDataset` over a dataset with ``__getitems__``, torch's batched fetch (Hugging
    Face datasets read a batch in one call, many times faster than sample by sample).

    The generators are seeded once per batch, from its first key's seed: a batch's draws then depend
    only on its keys, which depend only on ``(seed, epoch)`` and the batch's place in the epoch, so
    an exact resume (at a step boundary: the same batches) draws the same numbers.
    """

    def __getitems__(self, keys: list[tuple[int, int]]) -> Any:
        _seed_generators(keys[0][1])
        return self.data.__getitems__([index for index, _ in keys])  # type: ignore[attr-defined]


def seeded_dataset(data: Dataset) -> SeededDataset:
    """``data`` loaded by ``(index, seed)`` keys (:class:`SeededDataset`), batch by batch where it
    has ``__getitems__``: only then, since torch's fetcher looks for the attribute."""
    if callable(getattr(data, "__getitems__", None)):
        return _BatchedSeededDataset(data)
    return SeededDataset(data)


def _seed_generators(seed: int) -> None:
    # Seeds only the CPU generators a worker uses (torch.manual_seed would also touch CUDA and
    # costs ~60x more); about 10 us.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


def batch_size_of(batch: Any) -> int:
    """The number of samples in a batch: the leading size of its first tensor of one dimension or
    more, depth first (a string, a scalar beside the data such as a weight, or another leaf before
    it is passed over); else the length of the first list in it (a batch of strings); else 1 (a
    batch of scalars)."""
    size = _first_tensor_size(batch)
    if size is None:
        size = _first_list_length(batch)
    if size is None and next(_tensors(batch), None) is not None:
        size = 1
    if size is None:
        raise TypeError(
            f"cannot tell the batch size of a {type(batch).__name__}: it holds no tensor and no list"
        )
    return size


def _first_tensor_size(batch: Any, seen: set[int] | None = None) -> int | None:
    """``seen``: the dataclasses walked into (one may refer back to another)."""
    if isinstance(batch, torch.Tensor):  # (a scalar beside the data, such as a weight, is passed over)
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, (list, tuple)):
        items: Any = batch
    elif isinstance(batch, Mapping):
        items = batch.values()
    elif _is_dataclass_instance(batch):
        seen = set() if seen is None else seen
        if id(batch) in seen:
            return None
        seen.add(id(batch))
        items = (getattr(batch, f.name) for f in dataclasses.fields(batch))
    else:
        return None
    for item in items:
        size = _first_tensor_size(item, seen)
        if size is not None:
            return size
    return None


def _first_list_length(batch: Any) -> int | None:
    if isinstance(batch, list):
        return len(batch)
    if isinstance(batch, Mapping):
        return next((n for v in batch.values() if (n := _first_list_length(v)) is not None), None)
    if isinstance(batch, tuple):
        return next((n for v in batch if (n := _first_list_length(v)) is not None), None)
    return None


def move_to(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Moves every tensor in a (nested) batch to ``device``; floating tensors to ``dtype`` if given.

    A batch is a tensor, or a dict, list, tuple, named tuple or dataclass of batches; anything else
    is left as it is. On CUDA the copies run on a side stream (:func:`_on_copy_stream`).
    """
    if device.type == "cuda":
        return _on_copy_stream(batch, device, dtype)
    return _moved(batch, device, dtype)


def _moved(
    batch: Any, device: torch.device, dtype: torch.dtype | None, memo: dict[int, Any] | None = None
) -> Any:
    """``batch`` moved; ``memo``: what the dataclasses around it moved already, by ``id`` (a value
    held twice is moved once, and a reference back to a dataclass being moved is its copy)."""
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point() and batch.dtype != dtype:
            return batch.to(device=device, dtype=dtype, non_blocking=True)
        if batch.device == device:  # (the usual case on the CPU: no call at all)
            return batch
        return batch.to(device=device, non_blocking=True)
    kind = type(batch)
    if kind is list or kind is tuple:  # the usual, first (a list, not a generator: no frame per item)
        return kind([_moved(v, device, dtype, memo) for v in batch])
    if kind is dict:
        return {k: _moved(v, device, dtype, memo) for k, v in batch.items()}
    if isinstance(batch, Mapping):
        values = {k: _moved(v, device, dtype, memo) for k, v in batch.items()}
        if isinstance(batch, (dict, UserDict)):
            # A dict subclass or a ``UserDict`` (``default_collate`` keeps it: transformers'
            # ``BatchEncoding``, an ``OrderedDict``, an attribute dict): a copy of it, with its own
            # items (the original is left as it was), its type, its attributes and a
            # ``defaultdict``'s factory.
            try:
                copied = copy.copy(batch)
                for k, v in values.items():
                    copied[k] = v
                return copied
            except Exception:  # one that refuses to be copied or written: the values, as a dict
                return values
        # Another mapping may keep its items anywhere (a copy could share them with the original):
        # its values in a plain dict.
        return values
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple (default_collate keeps it)
        return kind(*[_moved(v, device, dtype, memo) for v in batch])
    if isinstance(batch, (list, tuple)):  # a subclass
        return kind([_moved(v, device, dtype, memo) for v in batch])
    if _is_dataclass_instance(batch):  # (from a collate_fn of the user's)
        # A copy with each value moved, not a new instance: __init__ would run __post_init__ again
        # and reset the fields it does not take.
        done = {} if memo is None else memo
        if id(batch) in done:  # a back-reference, however deep
            return done[id(batch)]
        moved = done[id(batch)] = copy.copy(batch)
        for name in _dataclass_values(batch):
            value = getattr(batch, name)
            if id(value) not in done:
                done[id(value)] = _moved(value, device, dtype, done)
            object.__setattr__(moved, name, done[id(value)])  # (frozen too)
        return moved
    return batch


def _dataclass_values(batch: Any) -> list[str]:
    """A dataclass batch's fields, and the attributes its ``__post_init__`` made (a mask derived
    from the fields: moved with them), in its ``__dict__`` or in a class's ``__slots__``."""
    names = [f.name for f in dataclasses.fields(batch)]
    slots = []
    for cls in type(batch).__mro__:
        declared = cls.__dict__.get("__slots__", ())
        slots += [declared] if isinstance(declared, str) else list(declared)
    set_slots = [n for n in slots if n not in ("__dict__", "__weakref__") and hasattr(batch, n)]
    attributes = [*getattr(batch, "__dict__", {}), *set_slots]
    return names + [name for name in dict.fromkeys(attributes) if name not in names]


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


@functools.cache
def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    return torch.cuda.Stream(device=device)


def _on_copy_stream(batch: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """``batch`` copied to the GPU on a side stream, ready for the current stream.

    A step does not wait for the GPU (no host reads), so the host queues the next step's copy while
    the GPU still computes this one: on the current stream the copy would wait behind those kernels;
    on a side stream it runs beside them (from pinned memory, ``task.train_dl.pin_memory``). The
    current stream then waits for the copy only, and the tensors are marked as used by it
    (``record_stream``), so that the allocator does not hand their memory out before it is done. The
    batch is not fetched ahead of its step: what a checkpoint saves (the generators a dataset draws
    from, a stream's position) stands where training does.
    """
    if any(t.is_cuda for t in _tensors(batch)):
        # Made on the GPU (a dataset on the device): its tensors were written on the current
        # stream, which a side stream would not wait for; converted there too.
        return _moved(batch, device, dtype)
    compute = torch.cuda.current_stream(device)
    side = _copy_stream(device)
    with torch.cuda.stream(side):
        moved = _moved(batch, device, dtype)
    compute.wait_stream(side)
    for tensor in _tensors(moved):
        tensor.record_stream(compute)
    return moved


def _tensors(value: Any, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor in ``value``; ``seen``: the dataclasses walked into (one may refer back)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item, seen)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item, seen)
    elif _is_dataclass_instance(value):
        seen = set() if seen is None else seen
        if id(value) not in seen:
            seen.add(id(value))
            for name in _dataclass_values(value):
                yield from _tensors(getattr(value, name), seen)


# Torch's default way to pass a batch from a worker process holds one file descriptor per tensor in
# flight; under a low limit on open files (`ulimit -n 20`) a worker's send fails in a background
# thread and the loader waits forever. 1024 is the usual default limit, with which it works.
OPEN_FILES_FOR_WORKERS = 1024


def prepare_worker_processes() -> None:
    """Before DataLoader workers start: make sure passing batches cannot run out of file handles.

    Raises the soft limit on open files towards the hard one; if it stays below
    :data:`OPEN_FILES_FOR_WORKERS`, batches are passed through named shared memory (torch's
    ``file_system`` sharing strategy) instead of file descriptors, which the limit does not bound.
    """
    import logging
    import resource

    import torch.multiprocessing

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= OPEN_FILES_FOR_WORKERS:
        return
    wanted = OPEN_FILES_FOR_WORKERS if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_FOR_WORKERS)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    if soft < OPEN_FILES_FOR_WORKERS and torch.multiprocessing.get_sharing_strategy() != "file_system":
        torch.multiprocessing.set_sharing_strategy("file_system")
        logging.getLogger(__name__).info(
            "Only %d open files allowed (ulimit -n): data loader workers pass batches through shared memory",
            soft,
        )
