"""``to_device_ahead``: the next step's batches are copied to the GPU while the current one computes."""

import pytest
import torch

from ml.utils.data import to_device_ahead


def test_elsewhere_the_groups_pass_as_they_are() -> None:
    groups = [[(torch.arange(3), {"y": torch.ones(2)})], [(torch.arange(2), {"y": torch.zeros(1)})]]
    assert list(to_device_ahead(iter(groups), torch.device("cpu"))) == groups  # the same objects


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_every_group_arrives_whole_and_in_order() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    groups = [
        [(torch.full((256, 64), float(i)).pin_memory(), {"y": torch.arange(256).pin_memory() + i})]
        for i in range(20)
    ]
    seen = []
    for i, group in enumerate(to_device_ahead(iter(groups), device, torch.float32)):
        x, extra = group[0]
        assert x.device == device and extra["y"].device == device
        out = (x * 2).sum() + extra["y"].sum()  # used on the compute stream at once
        seen.append(out)
        assert torch.equal(x.cpu(), groups[i][0][0]) and torch.equal(extra["y"].cpu(), groups[i][0][1]["y"])
    assert len(seen) == 20
