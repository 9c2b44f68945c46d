"""``assert_same``: what the exact-resume tests compare checkpoints with."""

from typing import Any

import torch


def assert_same(a: Any, b: Any, where: str = "ckpt") -> None:
    """Recursively equal: tensors bit for bit with the same dtype and shape, the rest with ``==``.

    ``where`` names the place compared (``ckpt.optim.state.0``), for the message.
    """
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        equal = torch.equal(a, b)  # (a bare torch.equal in the assert would print both tensors)
        assert equal, f"{where} differs (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
