"""Defines which device a process trains on: ``trainer.device``, overridden by ``$ML_DEVICE``.

Precedence: the ``ML_DEVICE`` environment variable (when set and not empty) wins over the config's
``trainer.device``, which defaults to ``auto``. Either takes:

- ``auto``: CUDA when present, then Apple MPS, then the CPU;
- ``cpu``, ``mps``;
- ``cuda``: this process's GPU (in a distributed job, the one of its local rank: ``LOCAL_RANK``,
  or ``SLURM_LOCALID`` inside an ``srun`` step, modulo the GPUs visible);
- ``cuda:N``: GPU ``N`` (refused where several processes of a machine see several GPUs: they would
  all take that one; with one GPU visible to each, as Slurm's ``--gpus-per-task=1`` gives, ``cuda:0``
  is each one's own).

A value that is no device, or a device this machine does not have (``cuda`` without a usable GPU,
``cuda:N`` beyond the GPUs visible, ``mps`` off a Mac), is bad input: a one-line
:class:`ml.errors.ConfigError` naming where it came from, raised before any run folder is claimed
(``ml train`` asks :func:`resolve_device` first).
"""

import os
import re

import torch

from ml.errors import ConfigError

DEVICE_ENV = "ML_DEVICE"
CHOICES = "auto, cpu, cuda, cuda:N, mps"
_SPEC = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def parse_device(spec: object, where: str = "trainer.device") -> str:
    """The device spec as written (lower case, trimmed), checked for its form only.

    Raises:
        ConfigError: ``spec`` is not one of ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
    """
    text = str(spec).strip().lower() if spec is not None else "auto"
    match = _SPEC.match(text)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ConfigError(f"{where} must be one of {CHOICES}, got {spec!r}")
    return text


def _local_rank() -> int:
    """torchrun's ``LOCAL_RANK``, else an ``srun`` step's ``SLURM_LOCALID`` (before they are exported)."""
    from ml.utils.ranks import dist_env

    local = os.environ.get("LOCAL_RANK")
    return int(local) if local else dist_env().local_rank


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def _no_cuda(where: str, spec: str) -> ConfigError:
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is built without CUDA"
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = "no CUDA GPU is visible" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
    return ConfigError(f"{where}={spec}: {why}; use {where}=cpu or auto")


def resolve_device(spec: object = "auto", where: str = "trainer.device") -> torch.device:
    """The device for ``spec`` (the config's ``trainer.device``), unless ``$ML_DEVICE`` overrides it.

    Args:
        spec: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (None: ``auto``).
        where: What the config calls it, for messages.

    Raises:
        ConfigError: The spec (or ``$ML_DEVICE``) is no device, or one this machine lacks.
    """
    forced = os.environ.get(DEVICE_ENV, "").strip()
    if forced:
        spec, where = forced, DEVICE_ENV
    text = parse_device(spec, where)
    kind, _, index = text.partition(":")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _local_rank() % torch.cuda.device_count())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise ConfigError(f"{where}=mps: Apple's MPS is not available here; use {where}=cpu or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise _no_cuda(where, text)
    count = torch.cuda.device_count()
    if index:
        from ml.utils.ranks import dist_env

        local = dist_env().local_world_size
        if local > 1 and count > 1:  # every process would take that GPU (NCCL: "Duplicate GPU detected")
            raise ConfigError(
                f"{where}={text} names one GPU for the {local} processes on this machine; use {where}=cuda "
                "(each process takes its local rank's GPU; CUDA_VISIBLE_DEVICES chooses which GPUs)"
            )
        if int(index) >= count:
            raise ConfigError(
                f"{where}={text}: only {count} CUDA GPU{'s' if count != 1 else ''} visible (cuda:0"
                f"{f' to cuda:{count - 1}' if count > 1 else ''})"
            )
        return torch.device("cuda", int(index))
    return torch.device("cuda", _local_rank() % count)


def detect_device() -> torch.device:
    """The device of ``trainer.device=auto``: ``$ML_DEVICE`` if set, else CUDA (this rank's), MPS, CPU."""
    return resolve_device("auto")
