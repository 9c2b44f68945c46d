"""Streaming data: an ``IterableDataset`` read through torchdata's ``StatefulDataLoader``, resumed exactly.

A task's ``get_dataset(phase)`` may return a :class:`torch.utils.data.IterableDataset` (a stream)
instead of a map-style dataset. Map-style data keeps :class:`ml.utils.data.ResumableSampler`; a
stream is read as follows.

Sharding. Every process of the job, and every loader worker of each, iterates its own copy of the
dataset; the dataset reads only its share. :func:`shard_of_stream`, called inside ``__iter__``, says
which share: ``(index, count)`` with ``index = rank * workers + worker`` and ``count = world_size *
workers`` (``workers`` counts the main process as one when ``num_workers=0``)::

    def __iter__(self):
        index, count = shard_of_stream()
        for i, record in enumerate(self.records(start=self.position)):
            if i % count == index: ...

Epochs. Exhausting every worker's iterator ends the epoch. ``set_epoch(epoch)``, if the dataset has
it, is called (in the main process, before the workers start) at the start of each epoch. An epoch
that yields no batch is refused. In a job of several processes, every rank takes the same number of
steps: each step, the ranks agree (one small all-reduce, only in such runs) whether any rank's stream
has ended, and if one has, the epoch ends on every rank (the others' unfinished batches are dropped).

Resume. Training streams must implement the ``state_dict()`` / ``load_state_dict(state)`` protocol
of ``StatefulDataLoader``: ``state_dict()`` returns where this copy's iteration stands (plain data:
numbers, strings, lists, dicts, tensors), and after ``load_state_dict(state)`` the next ``__iter__``
continues from there. Without them, ``StatefulDataLoader`` would resume by replaying (fast-forwarding)
every batch already trained on, through generators whose state differs by then: such a dataset is
refused for training rather than resumed differently. The checkpoint holds every rank's loader state
(gathered to rank 0); each rank takes its own back, so a stream resumes only with the same number of
processes. Random draws stay exact: in the main process (``num_workers=0``) they come from the
checkpointed generators; in a worker, the worker's Python, NumPy and torch generator states are saved
with the dataset's state after every batch and restored before it continues, and each epoch's worker
seeds depend only on ``(task.seed, epoch, rank)``.

torchdata is imported only when a training stream is used, so that ``import ml`` stays light.
"""

import copy
import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ml.errors import CheckpointError, ConfigError
from ml.utils.checkpoint import check_loadable, get_rng_state, set_rng_state
from ml.utils.data import batch_size_of, sample_seed
from ml.utils.distributed import all_gather_object, all_sum, is_initialized
from ml.utils.signals import isolate_from_stop_signals

# The (rank, world_size) of the process whose loader iterates a stream, set by _Stream.__iter__ in
# whichever process runs it (the main process or a worker), for shard_of_stream.
_ranks: tuple[int, int] | None = None


def shard_of_stream() -> tuple[int, int]:
    """This copy's share of a stream: ``(index, count)``, ``0 <= index < count``.

    Call it inside the dataset's ``__iter__`` (it runs in the loader's worker, if there are
    workers). Each of the ``count = world_size * max(num_workers, 1)`` copies of the dataset that a
    job iterates gets its own ``index = rank * max(num_workers, 1) + worker_id``; a dataset that
    keeps the records ``i`` with ``i % count == index`` reads each record once per epoch over the
    whole job.
    """
    if _ranks is not None:
        rank, world_size = _ranks
    else:  # outside the trainer's loaders: the launcher's ranks
        from ml.utils.distributed import get_rank, get_world_size

        rank, world_size = get_rank(), get_world_size()
    info = get_worker_info()
    worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
    return rank * workers + worker, world_size * workers


def is_stream(dataset: Any) -> bool:
    """Whether ``dataset`` is an iterable-style dataset (read by streaming, not by index)."""
    return isinstance(dataset, IterableDataset)


def is_resumable(dataset: Any) -> bool:
    """Whether ``dataset`` implements the ``state_dict()`` / ``load_state_dict()`` protocol."""
    return all(callable(getattr(dataset, name, None)) for name in ("state_dict", "load_state_dict"))


class _Stream(IterableDataset):
    """The user's stream, as the loaders read it: tells :func:`shard_of_stream` this process's rank."""

    def __init__(
        self, dataset: IterableDataset, rank: int, world_size: int, *, copy_per_pass: bool = False
    ) -> None:
        self.dataset = dataset
        self.made = dataset  # as the loader was made
        self.copy_per_pass = copy_per_pass  # see eval_loader's cut_short
        self.ranks = (rank, world_size)

    def restart(self) -> None:
        """Before a pass: with ``copy_per_pass``, the pass reads a fresh copy of the stream as made."""
        if self.copy_per_pass:
            self.dataset = copy.deepcopy(self.made)

    def __iter__(self) -> Iterator[Any]:
        global _ranks
        _ranks = self.ranks
        yield from self.dataset

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


class _ResumableStream(_Stream):
    """A stream with state: the dataset's, plus (in a loader worker) the worker's generator states.

    ``StatefulDataLoader`` asks a worker for it after each batch and hands it back to the worker
    that continues the iteration, before that worker's next ``__iter__``.
    """

    def state_dict(self) -> dict[str, Any]:
        in_worker = get_worker_info() is not None
        return {
            "dataset": self.dataset.state_dict(),  # type: ignore[attr-defined]
            # In the main process the checkpoint's own generator state is the one that counts.
            "rng": get_rng_state() if in_worker else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state["dataset"])  # type: ignore[attr-defined]
        if state.get("rng") is not None and get_worker_info() is not None:
            set_rng_state(state["rng"])


def _describe(dataset: Any) -> str:
    return type(dataset).__qualname__


def eval_loader(
    dataset: IterableDataset,
    *,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    drop_last: bool,
    rank: int,
    world_size: int,
    prefetch_factor: int | None = None,
    cut_short: str | None = None,
) -> DataLoader:
    """A loader for a validation or test stream: read to exhaustion, each rank its own shard.

    Start each pass with :func:`begin_pass` (the same worker seeds every time). ``cut_short``
    names the setting (``task.valid_dl.max_batches``) by which passes may end before the stream
    does. Read in this process (no workers), each pass then reads a fresh copy of the stream as it
    is now, as each pass's workers do: the stream itself, left where the cut came, would go on
    from there at the next pass.

    Raises:
        ConfigError: Passes are cut short, without workers, and the stream cannot be copied.
    """
    copy_per_pass = cut_short is not None and num_workers == 0
    if copy_per_pass:
        try:
            copy.deepcopy(dataset)
        except Exception as e:
            raise ConfigError(
                f"{cut_short} cuts each pass over {_describe(dataset)} short, and without workers "
                f"each pass reads a copy of it, which cannot be made ({type(e).__name__}: {e}); "
                "read it with num_workers=1 or more, or whole"
            ) from e
    return DataLoader(
        _Stream(dataset, rank, world_size, copy_per_pass=copy_per_pass),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=torch.Generator(),
        worker_init_fn=isolate_from_stop_signals,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,  # (torch refuses it without workers)
    )


def begin_pass(loader: DataLoader, seed: int) -> None:
    """Before an evaluation pass over a stream: epoch 0, and the same worker seeds on every pass."""
    stream = loader.dataset
    assert isinstance(stream, _Stream) and loader.generator is not None
    stream.restart()
    stream.set_epoch(0)
    # Epoch -1: training's epochs are 0, 1, ...; an evaluation's workers share no seed with them.
    loader.generator.manual_seed(sample_seed(seed, -1, stream.ranks[0]))


class TrainStream:
    """The training loader of a stream: its epochs, its place in the checkpoint, the ranks' agreement.

    Args:
        dataset: The task's ``IterableDataset`` (with ``state_dict``/``load_state_dict``).
        task_name: Named in errors.
        seed: ``task.seed``: the workers' seeds of epoch ``e`` on rank ``r`` follow from ``(seed, e, r)``.
        rank, world_size: This process's place in the job.
        batch_size, num_workers, pin_memory, drop_last: The loader's settings.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        *,
        task_name: str,
        where: str,
        seed: int,
        rank: int,
        world_size: int,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        drop_last: bool,
        prefetch_factor: int | None = None,
    ) -> None:
        if not is_resumable(dataset):
            raise ConfigError(
                f"{where} returned {_describe(dataset)}, an IterableDataset without state_dict() and "
                "load_state_dict(): a resumed run would replay every batch already trained on "
                "(torchdata's fast-forward) with other random draws; implement both (see ml.utils.streaming)"
            )
        from torchdata.stateful_dataloader import StatefulDataLoader  # only where a stream is trained on

        self.name = _describe(dataset)
        self.task_name = task_name
        self._check_plain(dataset.state_dict())  # type: ignore[attr-defined]  # before the first step
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.stream = _ResumableStream(dataset, rank, world_size)
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self.loader = StatefulDataLoader(
                self.stream,
                batch_size=batch_size,
                num_workers=num_workers,
                pin_memory=pin_memory,
                drop_last=drop_last,
                generator=torch.Generator(),
                worker_init_fn=isolate_from_stop_signals,
                prefetch_factor=prefetch_factor if num_workers > 0 else None,
                snapshot_every_n_steps=1,  # a state for every batch: any step can be resumed
            )
        self._live = False  # an epoch's iteration is under way (its state is worth saving)
        self.step_samples = 0  # the job's samples in the step last handed out (see steps)
        # This rank's samples in it over the job's mean per rank: 1 but at an epoch's last step,
        # where the ranks' last batches may differ in size (drop_last off).
        self.rank_share = 1.0
        self._resume: dict[str, Any] | None = None  # this rank's saved state, for the epoch resumed

    # -- the checkpoint

    def state_dict(self) -> dict[str, Any] | None:
        """This rank's position: the loader's state after the last batch taken; None between epochs."""
        return copy.deepcopy(self.loader.state_dict()) if self._live else None

    def gather(self) -> dict[str, Any]:
        """Every rank's position, for the checkpoint (a collective in a job of several processes).

        Checked on every rank to load with ``torch.load(weights_only=True)``: a dataset state that
        is not plain data is refused, naming the dataset.
        """
        own = self.state_dict()
        ranks = all_gather_object(own) if self.world_size > 1 else [own]
        saved = {"world_size": self.world_size, "num_workers": self.loader.num_workers, "ranks": ranks}
        self._check_plain(saved)
        return saved

    def _check_plain(self, state: Any) -> None:
        """Refuses a dataset state that ``torch.load(weights_only=True)`` could not read back."""
        try:
            check_loadable(state, "stream")
        except TypeError as e:
            raise ConfigError(
                f"{self.name}.state_dict() (the training stream of {self.task_name}) must return plain "
                f"data (numbers, strings, lists, dicts, tensors) to be checkpointed: {e}"
            ) from e

    def resume(self, saved: Any, epoch: int, position: int) -> None:
        """Takes this rank's position from a checkpoint that stands at ``position`` samples into ``epoch``."""
        self._resume = None
        if position == 0:  # saved between epochs: the next one starts afresh
            return
        where = f"the checkpoint stands at sample {position} of epoch {epoch}"
        if not isinstance(saved, dict) or not isinstance(saved.get("ranks"), list):
            raise CheckpointError(
                f"{where} but holds no position in the training stream of {self.task_name} "
                "(was it saved with a map-style dataset?)"
            )
        if saved.get("world_size") != self.world_size or len(saved["ranks"]) != self.world_size:
            raise CheckpointError(
                f"{where} of a stream that {saved.get('world_size')} processes read, each its own shard: "
                f"resume it with {saved.get('world_size')} processes, not {self.world_size}"
            )
        workers = saved.get("num_workers", self.loader.num_workers)
        if workers != self.loader.num_workers:  # each worker reads its own part of the shard
            raise CheckpointError(
                f"{where} of a stream that {workers} loader workers read, each its own part: resume it "
                f"with task.train_dl.num_workers={workers}, not {self.loader.num_workers}"
            )
        own = saved["ranks"][self.rank]
        if own is None:
            raise CheckpointError(f"{where} but holds no position of rank {self.rank} in the training stream")
        self._resume = own

    # -- the epochs

    def steps(self, epoch: int, position: int, batches_per_step: int) -> Iterator[list[Any]]:
        """The rest of ``epoch`` (``position`` samples in), as groups of ``batches_per_step`` batches.

        The last group may be short. In a job of several processes every rank's group holds as many
        batches (the shortest sets how many: see _agreed), and the epoch ends on every rank at the
        first step for which some rank has no batch left.
        """
        self.stream.set_epoch(epoch)
        assert self.loader.generator is not None
        self.loader.generator.manual_seed(sample_seed(self.seed, epoch, self.rank))
        resumed = self._resume if position > 0 else None
        self._resume = None
        if position > 0 and resumed is None:
            raise CheckpointError(
                f"resuming epoch {epoch} at sample {position} without the training stream's saved position"
            )
        batches: Iterator[Any]
        if resumed is not None and resumed.get("_iterator_finished"):
            # The last step taken met the end of the stream (a short last group). StatefulDataLoader
            # would start a finished iterator afresh, reading the epoch again: it is over instead.
            batches = iter(())
        else:
            if resumed is not None:
                self.loader.load_state_dict(resumed)
            batches = iter(self.loader)
        # Until the epoch ends, the loader's state is where the training stands: also once the loop
        # stopped for a signal (and dropped this generator), for the checkpoint saved after it.
        self._live = True
        first = True
        in_job = self.world_size > 1 and is_initialized()  # (not in a test of one rank's shard)
        while True:
            group = list(itertools.islice(batches, batches_per_step))
            sizes = [batch_size_of(batch) for batch in group]
            samples = self._agreed(group, sizes, batches_per_step) if in_job else sum(sizes)
            if not group:
                self._live = False
                if first and position == 0:
                    where = " on at least one rank" if self.world_size > 1 else ""
                    raise ConfigError(
                        f"the training stream of {self.task_name} ({self.name}) yielded no batch in "
                        f"epoch {epoch}{where}: an epoch without a step would never end"
                    )
                return
            first = False
            # The job's samples in this step: every rank's own (the last batches of an epoch may
            # differ in size from rank to rank, when drop_last is off).
            self.step_samples = samples
            self.rank_share = sum(sizes[: len(group)]) * self.world_size / samples if in_job else 1.0
            yield group

    def _agreed(self, group: list[Any], sizes: list[int], batches_per_step: int) -> int:
        """Cuts this rank's ``group`` to the part the job steps over; returns the job's samples in it.

        Every rank steps over as many batches, or none: DDP's and FSDP's collectives need them all
        (FSDP's come with each micro-batch's passes: a rank with fewer would wait forever). The
        shortest group (of a shard that ran out) sets how many; the batches others hold beyond it
        are dropped with the rest of the epoch, as the batches they have not reached are. One
        all-reduce: each rank fills its own row (its count, then its batches' sizes).
        """
        width = batches_per_step + 1
        rows = [0.0] * (self.world_size * width)
        rows[self.rank * width : self.rank * width + len(sizes) + 1] = [float(len(sizes)), *map(float, sizes)]
        job = all_sum(rows)
        per_rank = [job[rank * width : (rank + 1) * width] for rank in range(self.world_size)]
        taken = int(min(row[0] for row in per_rank))
        del group[taken:]
        return int(sum(sum(row[1 : taken + 1]) for row in per_rank))
