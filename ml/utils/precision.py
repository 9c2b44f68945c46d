"""Defines :class:`MixedPrecision`: autocast and, for float16, the gradient scaler; and
:func:`float32_matmul_precision` (``trainer.float32_matmul_precision``: TF32 on CUDA).

``fp32`` runs everything in float32 (or float64 when the trainer keeps float64 weights); ``bf16``
and ``fp16`` run the forward pass under ``torch.autocast`` with the weights and inputs kept in
float32, and ``fp16`` scales the loss so small gradients do not underflow. The scaler's state is
checkpointed; a checkpoint without one (from an fp32 run, or from the CPU) loads fine.
"""

import contextlib
from collections.abc import Iterator
from typing import Any, Literal, get_args

import torch
from torch.optim import Optimizer

from ml.optimizers.fast import match_amp_scaling

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_NO_AUTOCAST = contextlib.nullcontext()  # reusable: it holds no state
# torch.set_float32_matmul_precision's names: on CUDA, `high` lets float32 matmuls run on TF32
# tensor cores (inputs rounded to a 10-bit mantissa), `medium` on bfloat16 ones.
MATMUL_PRECISIONS = ("highest", "high", "medium")


@contextlib.contextmanager
def float32_matmul_precision(precision: str | None) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` inside the block, restored after; ``None``
    leaves torch's setting as it is (``highest`` unless the user's code changed it)."""
    if precision is None:
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def describe_matmul_precision(device: torch.device) -> str:
    """How float32 matmuls run on ``device`` now (said at a session's start on CUDA, where TF32
    makes them several times faster: torch leaves it off for matmuls, so Lightning warns too)."""
    precision = torch.get_float32_matmul_precision()
    if precision == "highest":
        return (
            f"float32 matmuls on {device} run in full float32: trainer.float32_matmul_precision=high "
            "runs them on TF32 tensor cores (faster; inputs rounded to 10 mantissa bits)"
        )
    cores = "TF32" if precision == "high" else "bfloat16 or TF32"
    return f"float32 matmuls on {device} may run on {cores} tensor cores (matmul precision {precision!r})"


class MixedPrecision:
    """Autocast and loss scaling for one device.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16``.
        device: The device the model runs on.
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.device_type = device.type
        self.dtype = _AUTOCAST_DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` to the precision's dtype; a no-op context (cheap, every step) for fp32."""
        if self.dtype is None:
            return _NO_AUTOCAST
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale_(self, optim: Optimizer) -> None:
        """Brings gradients back to their true scale (before clipping or measuring them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optim)

    def step(self, optim: Optimizer) -> None:
        """Steps the optimizer (the scaler skips steps whose gradients are not finite)."""
        if self.scaler is None:
            optim.step()
        else:
            match_amp_scaling(optim)
            self.scaler.step(optim)
            self.scaler.update()

    def skip_step(self) -> None:
        """Drops this step after :meth:`unscale_` (the scaler lowers its scale as for an overflow)."""
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scaler is not None and state_dict:
            self.scaler.load_state_dict(state_dict)
