"""The gradients' joint 2-norm, and clipping to it, with torch's private ``foreach`` kernels called directly.

This module is the one place that calls ``torch._foreach_norm`` and ``torch._foreach_mul_`` (for the
trainers' gradient norm and clipping). :func:`total_norm` is ``nn.utils.get_total_norm(grads)`` and
:func:`clip_grad_norm_` is ``nn.utils.clip_grad_norm_(params, max_norm, foreach=True)``: the same
kernels on the same tensors, so the same numbers bit for bit, without torch's grouping of the tensors
by device and dtype and its per-call checks, which for a small model's dozen tensors cost more than
the arithmetic. Measured with ``python bench/fast_paths.py grad_norm`` (one CPU thread; the best of
5 ``timeit`` repeats; two runs), on the gradients of a 64-256-256-10 MLP (6 tensors) and of a
64-1024-1024-1024-10 one (8 tensors)::

                      tiny: this   torch           big: this   torch
    total_norm            ~24 us   ~32 us  1.33x       ~253 us  ~266 us  1.05x
    clip_grad_norm_       ~43 us   ~65 us  1.51x       ~385 us  ~420 us  1.09x

The tiny MLP's whole training step there takes ~0.7-1 ms, so that is ~1% of it for the norm the sl
trainer measures at every step and ~2-3% for the rl trainer's clipping; for the big one, less.

Where the private kernels are gone or no longer behave as here (checked once per process, on a
few small tensors with known norms), both functions warn once and use the public
functions instead, without ``foreach`` (whose implementation calls the same private kernels): the
same norms and scaling, computed one tensor at a time.
"""

import logging
from collections.abc import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)

_KERNELS = ("_foreach_norm", "_foreach_mul_")
_usable: bool | None = None  # whether the private kernels work as expected; checked on first use


def _kernels_usable() -> bool:
    """Whether ``torch._foreach_norm`` and ``torch._foreach_mul_`` exist and compute what they should."""
    global _usable
    if _usable is None:
        _usable = _check_kernels()
    return _usable


def _check_kernels() -> bool:
    missing = [name for name in _KERNELS if not hasattr(torch, name)]
    if missing:
        return _give_up(f"this torch has no {', '.join('torch.' + n for n in missing)}")
    try:
        grads = [torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])]
        norms = torch._foreach_norm(grads, 2.0)
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        torch._foreach_mul_(grads, torch.tensor(0.5))
        ok = total.item() == 13.0 and grads[0].tolist() == [1.5, 2.0] and grads[1].tolist() == [[6.0]]
    except (AttributeError, TypeError, RuntimeError, NotImplementedError) as e:
        return _give_up(f"torch's private foreach kernels failed ({type(e).__name__}: {e})")
    return ok or _give_up("torch's private foreach kernels give unexpected results")


def _give_up(reason: str) -> bool:
    logger.warning("gradient norms through torch's public functions (slower): %s", reason)
    return False


def _fast_path(grads: list[torch.Tensor]) -> bool:
    """Whether the kernels can take ``grads`` in one call: plain tensors of one CPU or CUDA device
    and one dtype, outside any graph (anything else goes through torch's functions)."""
    if not grads or not _kernels_usable():
        return False
    first = grads[0]
    device, dtype = first.device, first.dtype
    return device.type in ("cpu", "cuda") and all(
        type(g) is torch.Tensor and not g.requires_grad and g.device == device and g.dtype == dtype
        for g in grads
    )


def tensor_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's 2-norm, stacked (a 1-d tensor on the first tensor's device; empty for none).

    ``torch.linalg.vector_norm(tensor_norms(grads))`` is :func:`total_norm`'s number, bit for bit;
    the trainers keep the parts to name the first module whose gradient is not finite.
    """
    if _fast_path(grads):
        try:
            return torch.stack(torch._foreach_norm(grads, 2.0))
        except (AttributeError, TypeError, NotImplementedError) as e:  # changed since checked
            _stop_using(e)
    if not grads:
        return torch.zeros(0)
    return torch.stack([torch.linalg.vector_norm(g.detach(), 2.0) for g in grads])


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """``nn.utils.get_total_norm(grads)``: the joint 2-norm of the tensors (0 for none), the same number.

    A 0-dimensional tensor on the first tensor's device; nothing waits for it to be computed.
    """
    if _fast_path(grads):
        try:
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        except (AttributeError, TypeError, NotImplementedError) as e:  # changed since checked
            _stop_using(e)
    return nn.utils.get_total_norm(grads, foreach=None if _kernels_usable() else False)


def clip_grads_with_norm_(grads: list[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """``nn.utils.clip_grads_with_norm_`` for gradients whose joint norm ``total`` is known: each is
    multiplied by ``min(max_norm / (total + 1e-6), 1)``, on the device (no host sync, no copy of the
    factor to the device it is already on)."""
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if _fast_path(grads):
        try:
            torch._foreach_mul_(grads, coefficient)
            return
        except (AttributeError, TypeError, NotImplementedError) as e:  # before any gradient changed
            _stop_using(e)
    for grad in grads:
        grad.mul_(coefficient)


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scales the gradients so that their joint 2-norm is at most ``max_norm``; returns the norm before.

    ``nn.utils.clip_grad_norm_(params, max_norm, foreach=True)``'s rule and numbers: every gradient
    is multiplied by ``min(max_norm / (norm + 1e-6), 1)`` (with no host sync, so also when it is 1).
    Parameters without a gradient are left out; with none, the norm is 0.
    """
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if _fast_path(grads):
        try:
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
            return total
        except (AttributeError, TypeError, NotImplementedError) as e:  # before any gradient changed
            _stop_using(e)
    foreach = None if _kernels_usable() else False
    with torch.no_grad():
        total = nn.utils.get_total_norm(grads, foreach=foreach)
        nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total


def _stop_using(error: Exception) -> None:
    global _usable
    _usable = False
    _give_up(f"torch's private foreach kernels failed ({type(error).__name__}: {error})")
