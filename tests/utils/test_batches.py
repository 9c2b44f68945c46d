"""Batches as datasets and collate functions make them: ``move_to`` takes every tensor, however
nested, to the device (on CUDA through a side stream that the step's stream waits for), and
``batch_size_of`` counts their samples."""

import dataclasses
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


def test_the_batch_size_is_the_first_tensor_s_even_after_strings() -> None:
    """default_collate of ``{"id": str, "x": tensor}`` samples: the size was asked of the strings."""
    samples = [{"id": f"s{i}", "x": torch.zeros(2), "y": torch.tensor(i)} for i in range(3)]
    assert batch_size_of(default_collate(samples)) == 3
    assert batch_size_of((["a", "b"], [torch.zeros(7, 2)])) == 7
    assert batch_size_of({"text": ["a", "b", "c", "d"]}) == 4  # strings only: the list's length
    with pytest.raises(TypeError, match="holds no tensor and no list"):
        batch_size_of({"n": 3})


def test_on_the_cpu_tensors_already_there_are_handed_on_as_they_are() -> None:
    x, y = torch.arange(3.0), torch.ones(2)
    moved = move_to((x, {"y": y}), torch.device("cpu"))
    assert moved[0] is x and moved[1]["y"] is y


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_every_batch_arrives_whole_and_in_order() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    batches = [
        Sample(torch.full((256, 64), float(i)).pin_memory(), {"y": torch.arange(256).pin_memory() + i})  # type: ignore[arg-type]
        for i in range(20)
    ]
    busy = torch.randn(2048, 2048, device=device)
    seen = []
    for i, batch in enumerate(batches):
        busy = busy @ busy / 2048  # the step's stream is busy while the copy is queued
        moved = move_to(batch, device, torch.float32)
        assert isinstance(moved, Sample)
        assert _devices(moved) == {(device, torch.float32), (device, torch.int64)}
        seen.append((moved.x * 2).sum() + moved.y["y"].sum())  # used on the step's stream at once
        assert torch.equal(moved.x.cpu(), batches[i].x) and torch.equal(moved.y["y"].cpu(), batches[i].y["y"])
    expected = [(b.x * 2).sum() + b.y["y"].sum() for b in batches]
    assert [s.item() for s in seen] == [e.item() for e in expected]
