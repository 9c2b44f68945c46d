"""Defines device detection: CUDA when present, then Apple MPS, then the CPU."""

import os

import torch


def detect_device() -> torch.device:
    """Picks the device this process should use.

    ``$ML_DEVICE`` (e.g. ``cpu``, ``cuda:1``) wins; otherwise the local CUDA device for this rank
    (``$LOCAL_RANK``), then MPS, then the CPU.
    """
    forced = os.environ.get("ML_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
