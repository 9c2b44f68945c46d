"""Defines safe checkpoint reading and the pieces of a checkpoint that are not module state.

Checkpoints are read with ``torch.load(weights_only=True)`` only: a file holding anything but
tensors, numbers, strings and containers is refused, never unpickled. Before writing, the payload is
checked for such values too, so a checkpoint that could not be loaded again is never written.
"""

import pickle
import random
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

_PLAIN = (torch.Tensor, int, float, str, bool, bytes, type(None), torch.Size, torch.dtype, torch.device)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, foreign or does not fit the objects it is loaded into."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint holds pickled objects that would run code when loaded; it was not loaded."""


def read_checkpoint(path: str | Path, device: str | torch.device | None = None) -> dict[str, Any]:
    """Reads a checkpoint file without ever unpickling arbitrary objects.

    Args:
        path: The file (a ``ckpt.pt`` link is followed).
        device: Where to put the tensors (``map_location``).

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: The file is missing, truncated or not a checkpoint of this framework.
        UnsafeCheckpointError: The file contains objects other than tensors and plain data.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if not refused:
            raise CheckpointError(f"cannot read checkpoint {path}: not a torch checkpoint, or damaged") from e
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds pickled objects that could run code ({refused[0]})"
        ) from e
    except Exception as e:  # a damaged archive fails in many ways (zip, pickle memo, EOF, ...)
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or not a torch file"
        ) from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "state" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not an ml checkpoint (expected keys 'model' and 'state', found {keys})"
        )
    return ckpt


def check_loadable(value: Any, where: str = "checkpoint") -> None:
    """Raises ``TypeError`` naming the first value that ``weights_only`` loading would refuse."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (dict, OrderedDict)):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            check_loadable(item, f"{where}.{key}")
        return
    if isinstance(value, (list, tuple, set)):
        for i, item in enumerate(value):
            check_loadable(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__qualname__}, which torch.load(weights_only=True) cannot read back; "
        "store tensors, numbers, strings, lists or dicts instead"
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """Returns the module inside DDP/FSDP-style (``.module``) and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _strip_wrapper_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def load_model_state(model: nn.Module, state_dict: Mapping[str, Any], *, strict: bool) -> list[str]:
    """Loads model weights, tolerating the ``module.``/``_orig_mod.`` prefixes wrappers add.

    The weights go into the module inside any wrapper. The keys are used as saved when they fit;
    otherwise with the wrapper prefixes removed.

    Returns:
        Human-readable notes about missing/unexpected keys (non-strict loading only).

    Raises:
        CheckpointError: In strict mode, when the keys or shapes do not match the model.
    """
    target = unwrap_model(model)
    expected = set(target.state_dict().keys())
    if set(state_dict) != expected:
        stripped = {_strip_wrapper_prefixes(k): v for k, v in state_dict.items()}
        if len(stripped) == len(state_dict) and len(expected & set(stripped)) > len(
            expected & set(state_dict)
        ):
            state_dict = stripped
    notes = []
    if not strict:  # load what fits: tensors of another shape are left out (and named)
        own = target.state_dict()
        misfits = [
            k
            for k, v in state_dict.items()
            if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)
        ]
        if misfits:
            notes.append(
                "not loaded, shapes differ: "
                + ", ".join(f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in misfits)
            )
            state_dict = {k: v for k, v in state_dict.items() if k not in misfits}
    try:
        result = target.load_state_dict(dict(state_dict), strict=strict)
    except RuntimeError as e:
        # torch lists every problem on its own line: name the first ones, not the generic header.
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        shown = "; ".join(details[:3]) + (f"; and {len(details) - 3} more" if len(details) > 3 else "")
        raise CheckpointError(
            f"checkpoint weights do not fit the model: {shown or str(e).splitlines()[0]} "
            "(checkpoint.load_strict=false loads what fits)"
        ) from e
    if result.missing_keys:
        notes.append(f"missing keys: {', '.join(result.missing_keys)}")
    if result.unexpected_keys:
        notes.append(f"unexpected keys: {', '.join(result.unexpected_keys)}")
    return notes


def get_rng_state() -> dict[str, Any]:
    """Captures the Python, NumPy, torch CPU and CUDA generator states as plain data."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = cast(
        tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True)
    )
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what :func:`get_rng_state` captured (parts missing from ``state`` are left alone)."""
    if "python" in state:
        version, values, gauss = state["python"]
        random.setstate((version, tuple(values), gauss))
    if "numpy" in state:
        np_state = state["numpy"]
        keys = np_state["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state(
            (np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
