"""The map-style data path (ml.utils.data): batches per process, batched fetches, kept workers, and
the sampler's memory, with real DataLoaders and worker processes."""

import os
import tracemalloc
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from ml.core.diff import segment_changes
from ml.errors import ConfigError
from ml.tasks.sl import DataLoaderConfig, SupervisedLearningTaskConfig
from ml.utils.data import ResumableSampler, rest_of_epoch, resumable_loader, seeded_dataset

SEED = 11


class Noisy(Dataset):
    """Each sample: its index, a random draw (augmentation) and the pid of the process loading it."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "noise": torch.rand(()), "pid": os.getpid(), "via": 0}


class BatchedNoisy(Noisy):
    """A dataset with torch's batched fetch, as Hugging Face datasets have: each sample says which
    method loaded it (0: ``__getitem__``, else the size of the ``__getitems__`` call)."""

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        noise = torch.rand(len(indices))  # one draw for the batch
        return [
            {"index": i, "noise": n, "pid": os.getpid(), "via": len(indices)}
            for i, n in zip(indices, noise, strict=True)
        ]


def _loader(
    data: Dataset, rank: int = 0, world_size: int = 1, phase: str = "train", **cfg: Any
) -> torch.utils.data.DataLoader:
    return resumable_loader(
        data,
        DataLoaderConfig(**{"batch_size": 4, "shuffle": True, **cfg}),
        seed=SEED,
        device_type="cpu",
        phase=phase,
        owner="Tiny",
        rank=rank,
        world_size=world_size,
    )


def _epoch(loader: torch.utils.data.DataLoader, epoch: int, position: int = 0) -> list[dict[str, Any]]:
    return list(rest_of_epoch(loader, epoch, position, SEED))


def _same(
    a: list[dict[str, Any]], b: list[dict[str, Any]], keys: tuple[str, ...] = ("index", "noise")
) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in keys:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


# -- 1. a process without a batch


@pytest.mark.parametrize(
    ("size", "drop_last", "share"),
    [
        (6, True, "6 samples over 2 processes leave 3 to each"),
        (1, False, "1 sample over 2 processes leave 0 to each"),
    ],
)
@pytest.mark.parametrize("rank", [0, 1])
def test_training_data_that_leaves_a_process_without_a_batch_is_refused(
    size: int, drop_last: bool, share: str, rank: int
) -> None:
    # Both pass a check of the whole set against the batch size; each rank would then loop through
    # empty epochs forever.
    with pytest.raises(ConfigError, match="no complete batch") as refused:
        _loader(Noisy(size), rank=rank, world_size=2, drop_last=drop_last)
    message = str(refused.value)
    assert "\n" not in message and share in message and "batch_size 4" in message
    assert "fewer processes" in message and "smaller task.train_dl.batch_size" in message
    assert ("drop_last=false" in message) == drop_last


def test_a_batch_for_every_process_is_accepted() -> None:
    loaders = [_loader(Noisy(8), rank=r, world_size=2, drop_last=True) for r in range(2)]
    batches = [list(rest_of_epoch(loader, 0, 0, SEED)) for loader in loaders]
    assert [len(b) for b in batches] == [1, 1]
    indices = [set(b[0]["index"].tolist()) for b in batches]
    assert indices[0].isdisjoint(indices[1]) and indices[0] | indices[1] == set(range(8))


# -- 2. batched fetches


def test_workers_fetch_a_batch_in_one_call_and_its_draws_follow_its_place() -> None:
    loader = _loader(BatchedNoisy(16), num_workers=2, drop_last=False, batch_size=3)
    first = _epoch(loader, 1)
    assert [int(b["via"][0]) for b in first] == [3, 3, 3, 3, 3, 1]  # no sample through __getitem__
    assert all(len(set(b["via"].tolist())) == 1 for b in first)
    _same(_epoch(loader, 1), first)  # the same positions draw the same numbers
    _same(_epoch(loader, 1, position=6), first[2:])  # from a resume's position too
    assert not torch.equal(first[0]["noise"], _epoch(loader, 2)[0]["noise"])  # seeded per epoch


def test_a_dataset_without_batched_fetch_gets_none() -> None:
    # Torch's fetcher calls __getitems__ wherever the attribute exists.
    assert not hasattr(seeded_dataset(Noisy(4)), "__getitems__")
    assert hasattr(seeded_dataset(BatchedNoisy(4)), "__getitems__")


# -- 3. kept workers


def test_kept_workers_give_the_same_batches_and_stay_the_same_processes() -> None:
    kept = _loader(Noisy(16), num_workers=2, persistent_workers=True, prefetch_factor=1)
    fresh = _loader(Noisy(16), num_workers=2, persistent_workers=False)
    kept_epochs = [_epoch(kept, 0), _epoch(kept, 1)]
    next(rest_of_epoch(kept, 2, 0, SEED))  # a pass left after one batch (a stop, max_steps)
    kept_epochs.append(_epoch(kept, 1, position=8))
    fresh_epochs = [_epoch(fresh, 0), _epoch(fresh, 1)]
    _same(kept_epochs[0], fresh_epochs[0])
    _same(kept_epochs[1], fresh_epochs[1])
    _same(kept_epochs[2], fresh_epochs[1][2:])  # a resume's start, on the same workers
    assert not torch.equal(kept_epochs[0][0]["index"], kept_epochs[1][0]["index"])  # epochs differ

    def pids(batches: list[dict[str, Any]]) -> set[int]:
        return {int(pid) for b in batches for pid in b["pid"]}

    assert len(pids(kept_epochs[0])) == 2
    assert pids(kept_epochs[0]) == pids(kept_epochs[1]) == pids(kept_epochs[2])
    assert pids(fresh_epochs[0]).isdisjoint(pids(fresh_epochs[1]))  # started again per epoch


def test_worker_settings_are_config_keys_and_mean_nothing_without_workers() -> None:
    schema = OmegaConf.structured(SupervisedLearningTaskConfig)
    merged = OmegaConf.merge(schema, {"train_dl": {"persistent_workers": False, "prefetch_factor": 4}})
    assert merged.train_dl.persistent_workers is False and merged.train_dl.prefetch_factor == 4
    assert schema.train_dl.persistent_workers is True and schema.train_dl.prefetch_factor is None
    # num_workers=0 (to debug, say) needs no other change: torch would refuse both.
    loader = _loader(Noisy(8), num_workers=0, persistent_workers=True, prefetch_factor=4)
    assert len(_epoch(loader, 0)) == 2 and not loader.persistent_workers
    with pytest.raises(ConfigError, match=r"task.valid_dl.prefetch_factor of Tiny is 0: set it to 1 or more"):
        _loader(Noisy(8), phase="valid", num_workers=2, prefetch_factor=0)


def test_a_run_from_before_these_keys_resumes() -> None:
    # Its checkpoint's config has none of the keys; worker settings and evaluation's cut may change
    # freely (max_batches is refused on train_dl, but every loader's config has the key: null).
    old = {"task": {"train_dl": {"batch_size": 4, "num_workers": 2}, "valid_dl": {"batch_size": 8}}}
    new = {
        "task": {
            "train_dl": {
                "batch_size": 4,
                "num_workers": 2,
                "persistent_workers": True,
                "prefetch_factor": 2,
                "max_batches": None,
            },
            "valid_dl": {"batch_size": 8, "max_batches": None},
        }
    }
    lines, meaningful = segment_changes(old, new)
    assert len(lines) == 4 and meaningful == []


# -- 4. the sampler's order and memory


@pytest.mark.parametrize(("world_size", "start", "with_seeds"), [(1, 0, False), (2, 6, True), (3, 5, False)])
def test_the_order_is_the_one_earlier_runs_resume_to(world_size: int, start: int, with_seeds: bool) -> None:
    size, epoch = 100_003, 2  # over a chunk of indices
    # What the sampler gave before (int64 permutation, sliced, one list): a resumed run must see it.
    permutation = torch.randperm(size, generator=torch.Generator().manual_seed(SEED + epoch))
    for rank in range(world_size):
        sampler = ResumableSampler(
            range(size), shuffle=True, seed=SEED, rank=rank, world_size=world_size, with_seeds=with_seeds
        )
        sampler.set_epoch(epoch, start=start)
        end = start + (size - start) // world_size * world_size
        expected = permutation[start + rank : end : world_size].tolist()
        got = list(sampler)
        assert [key[0] for key in got] == expected if with_seeds else got == expected
        assert len(got) == len(sampler)


def test_the_first_index_comes_without_a_list_of_the_epoch() -> None:
    sampler = ResumableSampler(range(2_000_000), shuffle=True, seed=SEED)
    tracemalloc.start()
    try:
        iterator = iter(sampler)
        next(iterator)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # a list of the epoch: ~70 MB of Python ints; a chunk: ~2.5 MB
    unshuffled = iter(ResumableSampler(range(10), shuffle=False, seed=SEED, rank=1, world_size=3))
    assert list(unshuffled) == [1, 4, 7]


def test_an_iterator_keeps_the_epoch_it_was_made_in() -> None:
    # Its order and its samples' seeds alike: the epoch and start set later are the next iterator's.
    sampler = ResumableSampler(range(8), shuffle=True, seed=SEED, with_seeds=True)
    sampler.set_epoch(0)
    made_in_epoch_0 = iter(sampler)
    sampler.set_epoch(1, start=2)
    epoch_1, taken_in_epoch_1 = list(sampler), list(made_in_epoch_0)
    sampler.set_epoch(0)
    assert taken_in_epoch_1 == list(sampler) != epoch_1
    assert len(epoch_1) == 6
