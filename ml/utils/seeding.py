"""Defines :func:`seed_everything` (one seed for Python's, NumPy's and torch's generators),
:func:`generators_of_their_own` (an evaluation's draws apart from training's) and
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
def generators_of_their_own(seed: int, step: int) -> Iterator[None]:
    """Inside the block every generator (Python's, NumPy's, torch's CPU and CUDA ones) starts from
    ``(seed, step, this process's rank)``; after it, each is back where it was.

    For evaluations, which may draw (a VAE's sampling, a noisy loss, a random ``__getitem__`` without
    workers): their numbers then depend on the step only (and differ from process to process, each
    evaluating its own share), and training's draws do not depend on whether, how often or how far
    an evaluation ran (one abandoned by a stop signal is redone on resume, from the generators the
    checkpoint saved).
    """
    from ml.utils.checkpoint import get_rng_state, set_rng_state
    from ml.utils.data import sample_seed
    from ml.utils.distributed import get_rank

    # Epoch -1 - step: training's samples are seeded with epochs 0, 1, ..., so no evaluation shares
    # a seed with a training sample's augmentation.
    seed = sample_seed(seed, -1 - step, get_rank())
    saved = get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # (else a seed queued for later)
        torch.cuda.manual_seed_all(seed)
    try:
        yield
    finally:
        set_rng_state(saved)


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
