"""Batches as datasets and collate functions make them: ``move_to`` takes every tensor, however
nested, to the device (on CUDA through a side stream that the step's stream waits for), and
``batch_size_of`` counts their samples."""

import dataclasses
from collections import OrderedDict, UserDict, defaultdict
from collections.abc import Iterator, MutableMapping
from typing import Any, NamedTuple

import pytest
import torch
from torch.utils.data import default_collate

from ml.utils.data import batch_size_of, move_to


class Sample(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Batch:
    x: torch.Tensor
    extra: dict[str, Any]
    size: int = dataclasses.field(init=False, default=0)


@dataclasses.dataclass
class Shifted:
    """Its __init__ changes what it is given, and it has a field __init__ does not take."""

    x: torch.Tensor
    mask: torch.Tensor | None = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        self.x = self.x + 1
        self.total = self.x.sum(0, keepdim=True)  # an attribute it derives, not a field
        self.same = self.x  # the same tensor again
        self.me = self  # a back-reference


class Slotted:
    __slots__ = ("cached",)


@dataclasses.dataclass
class WithSlottedBase(Slotted):
    x: torch.Tensor

    def __post_init__(self) -> None:
        self.cached = self.x * 2  # kept in the base class's slot


def _devices(batch: Any) -> set[torch.dtype]:
    out: set[Any] = set()
    if isinstance(batch, torch.Tensor):
        out.add((batch.device, batch.dtype))
    elif isinstance(batch, dict):
        for v in batch.values():
            out |= _devices(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            out |= _devices(v)
    elif dataclasses.is_dataclass(batch):
        for f in dataclasses.fields(batch):
            out |= _devices(getattr(batch, f.name))
    return out


def test_named_tuples_and_dataclasses_are_moved_and_keep_their_type() -> None:
    """default_collate keeps a dataset's named tuples: rebuilding one from a generator crashed."""
    samples = [Sample(torch.zeros(3, dtype=torch.float64), torch.tensor(1)) for _ in range(4)]
    collated = default_collate(samples)
    assert isinstance(collated, Sample)
    moved = move_to(collated, torch.device("cpu"), torch.float32)
    assert isinstance(moved, Sample) and moved.x.dtype == torch.float32 and moved.y.dtype == torch.int64
    assert batch_size_of(moved) == 4

    mask = torch.ones(5, dtype=torch.bool)
    batch = Batch(torch.zeros(5, 2, dtype=torch.float64), {"mask": mask, "id": "a"})
    moved_batch = move_to(batch, torch.device("cpu"), torch.float32)
    assert isinstance(moved_batch, Batch) and moved_batch.extra["id"] == "a"
    assert moved_batch.x.dtype == torch.float32 and moved_batch.extra["mask"].dtype == torch.bool
    assert batch_size_of(moved_batch) == 5

    # Moved field by field, not rebuilt through __init__ (which shifted x again and dropped mask).
    shifted = Shifted(torch.zeros(3, dtype=torch.float64))
    shifted.mask = torch.ones(3, dtype=torch.float64)
    moved_shifted = move_to(shifted, torch.device("cpu"), torch.float32)
    assert moved_shifted.x.tolist() == [1.0, 1.0, 1.0] and moved_shifted.x.dtype == torch.float32
    assert moved_shifted.mask is not None and moved_shifted.mask.dtype == torch.float32
    assert moved_shifted.total.dtype == torch.float32 and moved_shifted.total.tolist() == [3.0]
    assert moved_shifted.same is moved_shifted.x and moved_shifted.me is moved_shifted  # kept as one
    slotted = move_to(WithSlottedBase(torch.ones(2, dtype=torch.float64)), torch.device("cpu"), torch.float32)
    assert slotted.x.dtype == slotted.cached.dtype == torch.float32
    assert shifted.x.dtype == torch.float64  # the original is left as it was


@dataclasses.dataclass
class Node:
    x: torch.Tensor
    parent: "Node | None" = None
    child: "Node | None" = None


def test_a_dataclass_that_refers_back_through_another_is_moved_once() -> None:
    """A child pointing back at its parent made move_to recurse until RecursionError (only a field
    pointing at its own object was known), and so did the walk for the batch size."""
    root = Node(torch.zeros(3, dtype=torch.float64))
    root.child = Node(torch.ones(3, dtype=torch.float64), parent=root)
    moved = move_to(root, torch.device("cpu"), torch.float32)
    assert moved is not root and moved.child is not None and moved.child.parent is moved
    assert moved.x.dtype == moved.child.x.dtype == torch.float32
    assert root.x.dtype == torch.float64 and root.child.parent is root  # the original is left as it was
    first = Linked(None, torch.zeros(4))
    first.previous = Linked(first, torch.zeros(4))  # the walk meets the cycle before any tensor
    assert batch_size_of(first) == 4


@dataclasses.dataclass
class Linked:
    previous: "Linked | None"
    x: torch.Tensor


class Encoding(UserDict):
    """A mapping that is not a dict, as transformers' ``BatchEncoding`` is, with an attribute."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.n_sequences = 1


class AttrDict(dict):
    """A dict whose keys are also attributes (a common collate output)."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


def test_mappings_of_other_types_are_moved_and_keep_their_type() -> None:
    """default_collate keeps a sample's mapping type: a ``UserDict`` (a ``BatchEncoding``) was left
    unmoved and uncast, and its batch size unknown (every run failed); a dict subclass came back a
    plain dict (its attributes and a defaultdict's factory lost)."""
    samples = [Encoding({"x": torch.zeros(3, dtype=torch.float64), "y": torch.tensor(i)}) for i in range(4)]
    collated = default_collate(samples)
    assert isinstance(collated, Encoding)
    moved = move_to(collated, torch.device("cpu"), torch.float32)
    assert isinstance(moved, Encoding) and moved.n_sequences == 1
    assert moved["x"].dtype == torch.float32 and moved["y"].dtype == torch.int64
    assert collated["x"].dtype == torch.float64  # the original is left as it was
    assert batch_size_of(collated) == batch_size_of(moved) == 4

    x = torch.zeros(2, 3, dtype=torch.float64)
    for batch in (AttrDict(x=x), OrderedDict(x=x), defaultdict(list, x=x)):
        moved_batch = move_to(batch, torch.device("cpu"), torch.float32)
        assert type(moved_batch) is type(batch) and moved_batch["x"].dtype == torch.float32
    assert move_to(AttrDict(x=x), torch.device("cpu"), torch.float32).x.dtype == torch.float32
    assert move_to(defaultdict(list, x=x), torch.device("cpu"))["missing"] == []

    # A mapping keeping its items in an attribute: a copy would share them, and the move cast the
    # caller's own batch. Its values come back as a plain dict; so do those of a dict subclass that
    # refuses writes (copying one writes its items).
    store = Store(x=x)
    moved_store = move_to(store, torch.device("cpu"), torch.float32)
    assert moved_store == {"x": moved_store["x"]} and moved_store["x"].dtype == torch.float32
    assert store["x"].dtype == torch.float64
    moved_read_only = move_to(ReadOnly(x=x), torch.device("cpu"), torch.float32)
    assert type(moved_read_only) is dict and moved_read_only["x"].dtype == torch.float32


class Store(MutableMapping):
    def __init__(self, **items: Any) -> None:
        self.items_ = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self.items_[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.items_[key] = value

    def __delitem__(self, key: str) -> None:
        del self.items_[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.items_)

    def __len__(self) -> int:
        return len(self.items_)


class ReadOnly(dict):
    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError("a read-only batch")


def test_the_batch_size_is_the_first_tensor_s_even_after_strings() -> None:
    """default_collate of ``{"id": str, "x": tensor}`` samples: the size was asked of the strings."""
    samples = [{"id": f"s{i}", "x": torch.zeros(2), "y": torch.tensor(i)} for i in range(3)]
    assert batch_size_of(default_collate(samples)) == 3
    assert batch_size_of((["a", "b"], [torch.zeros(7, 2)])) == 7
    assert batch_size_of({"text": ["a", "b", "c", "d"]}) == 4  # strings only: the list's length
    assert batch_size_of({"weight": torch.tensor(0.5), "x": torch.zeros(16, 3)}) == 16  # a scalar first
    assert batch_size_of({"weight": torch.tensor(0.5)}) == batch_size_of(torch.tensor(2.0)) == 1
    with pytest.raises(TypeError, match="holds no tensor and no list"):
        batch_size_of({"n": 3})


def test_on_the_cpu_tensors_already_there_are_handed_on_as_they_are() -> None:
    x, y = torch.arange(3.0), torch.ones(2)
    moved = move_to((x, {"y": y}), torch.device("cpu"))
    assert moved[0] is x and moved[1]["y"] is y


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_every_batch_arrives_whole_and_in_order() -> None:
    """Copied on a side stream while the step's stream is busy, from pinned memory that is dropped
    at once (the allocator must not hand it out before its copy is done), and, for a batch made on
    the GPU, converted on the step's stream after the kernel that wrote it."""
    device = torch.device("cuda", torch.cuda.current_device())
    busy = torch.randn(2048, 2048, device=device)
    seen, expected = [], []
    for i in range(20):
        x = torch.full((256, 64), float(i), dtype=torch.float64)
        y = torch.arange(256) + i
        expected.append(float((x * 2).sum() + y.sum()))
        busy = busy @ busy / 2048  # the step's stream is busy while the copy is queued
        moved = move_to(Sample(x.pin_memory(), {"y": y.pin_memory()}), device, torch.float32)  # type: ignore[arg-type]
        assert isinstance(moved, Sample)
        assert _devices(moved) == {(device, torch.float32), (device, torch.int64)}
        seen.append((moved.x * 2).sum() + moved.y["y"].sum())  # used on the step's stream at once
        made_here = torch.full((4, 2), float(i), device=device, dtype=torch.float64) * 3  # written on it
        seen.append(move_to((made_here,), device, torch.float32)[0].sum())
        expected.append(4 * 2 * 3.0 * i)
    assert [float(s) for s in seen] == expected
