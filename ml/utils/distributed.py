"""Defines helpers that ask which process this is in a (possibly) distributed job."""

import os

import torch.distributed as dist


def get_rank() -> int:
    """This process's global rank: the process group's if one exists, else ``$RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_master() -> bool:
    """True on the one process that writes files and logs (global rank 0)."""
    return get_rank() == 0
