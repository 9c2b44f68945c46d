"""Defines :func:`seed_everything` (one seed for Python's, NumPy's and torch's generators) and
:func:`deterministic_algorithms` (``trainer.deterministic``): what makes a run repeatable."""

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seeds Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Uses only deterministic kernels inside the block when ``enabled`` (``trainer.deterministic``);
    restores the setting after."""
    before = torch.are_deterministic_algorithms_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
