"""Defines :class:`NonFiniteRecord`: which training steps had a NaN or infinite loss or gradient,
decided on the device and read on the host only when someone asks.

Reading a value on the host (``.item()``) inside a step makes the host wait for the device, so the
next step's host work (data, Python) cannot overlap this step's kernels. The trainer therefore
decides on the device: :meth:`NonFiniteRecord.record` turns a step's loss and gradient norms into a
``found_inf`` flag (1.0 when any is not finite), which the optimizer's fused kernel takes to skip
the update, as ``torch.amp.GradScaler`` does; and writes the step's numbers into a ring buffer on
the device. :meth:`NonFiniteRecord.read` - when a logger writes, before a checkpoint, when the ring
is full (every :data:`CAPACITY` steps) - reads the ring once and says which steps were not finite,
with their loss, gradient norm and first non-finite module, so that a stop still names the exact
step and module, a few steps after it happened. About 6 small device operations per step (~15 us
on one CPU thread).

An optimizer without a fused kernel cannot take the flag: it is read on the host before such a
step anyway, so there the loss is read instead (:meth:`NonFiniteRecord.check_on_host`, ~1 us).
The gradient norm is part of the check only on the steps it is measured (every step with gradient
clipping or ``trainer.check_grads``: a pass over the gradients, 1-2% of a small model's step).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

CAPACITY = 1000  # steps kept between reads; the ring is read when it is full


@dataclass(frozen=True)
class NonFiniteStep:
    """A step whose loss or gradient norm was not finite."""

    step: int
    loss: float
    grad_norm: float | None  # None: not measured at that step
    module: str | None  # the first module with a non-finite gradient, when known

    def describe(self) -> str:
        norm = f", gradient norm {self.grad_norm}" if self.grad_norm is not None else ""
        where = f", first non-finite gradient in `{self.module}`" if self.module else ""
        return f"loss {self.loss}{norm}{where}"


class NonFiniteRecord:
    """The recent steps' losses and gradient norms, on the device.

    Args:
        names: The parameters' names, in the order of the gradients given to :meth:`record`.
        device: Where the steps compute.
    """

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        # Columns: found_inf (as every rank agreed), loss, 1.0 where the gradient norm was measured,
        # the total gradient norm, each gradient's norm. Rows are zeroed when read.
        self._ring = torch.zeros(CAPACITY, 4 + len(names), device=device)
        self._one = torch.ones(1, device=device)
        self._rows = 0  # rows written since the last read
        # The step (or minibatch) each row is of: a step may write several rows (a GAN's
        # discriminator updates) and a caller may record only some of its updates (RL).
        self._row_steps: list[int] = []
        self._row_which: list[tuple[int, ...] | None] = []  # whose gradient norms each row holds
        self._on_host: list[NonFiniteStep] = []  # what check_on_host found since the last read

    @property
    def full(self) -> bool:
        return self._rows == CAPACITY

    @property
    def pending(self) -> bool:
        return self._rows > 0 or bool(self._on_host)

    def found_inf(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """1.0 when the loss or the gradient norm (if given) is not finite, else 0.0 (float32, on
        the device). A sum is not finite when a term is not: one check for both."""
        value = loss.detach().float() if grad_norm is None else loss.detach().float() + grad_norm.float()
        return torch.isfinite(value).logical_not_().float()

    def record(
        self,
        step: int,
        found_inf: torch.Tensor,
        loss: torch.Tensor,
        grad_norm: torch.Tensor | None = None,
        norms: torch.Tensor | None = None,
        which: tuple[int, ...] | None = None,
    ) -> None:
        """Keeps step ``step``'s flag and numbers (``grad_norm``: None when not measured; ``norms``:
        the gradients' norms, of the parameters ``which`` (their places in :attr:`names`; None: all
        of them, in order): a frozen parameter has none). The caller reads (:meth:`read`) first when
        :attr:`full`."""
        self._row_steps.append(step)
        self._row_which.append(which)
        row = self._ring[self._rows]
        parts = [found_inf.view(1), loss.detach().float().view(1)]
        width = 2
        if grad_norm is not None:
            parts += [self._one, grad_norm.float().view(1)]
            width = 4
            if norms is not None and norms.numel() == self._count(which):
                parts.append(norms.float())
                width += norms.numel()
        torch.cat(parts, out=row[:width])  # the rest stays 0 (zeroed by read): no module is named
        self._rows += 1

    def check_on_host(
        self,
        step: int,
        loss: torch.Tensor,
        grad_norm: torch.Tensor | None = None,
        norms: torch.Tensor | None = None,
        which: tuple[int, ...] | None = None,
    ) -> bool:
        """Whether step ``step`` is finite, read on the host now (for an optimizer that would read
        the flag on the host anyway); a step that is not is kept for :meth:`read`."""
        loss_value = loss.item()
        norm_value = None if grad_norm is None else grad_norm.item()
        if math.isfinite(loss_value) and (norm_value is None or math.isfinite(norm_value)):
            return True
        module = None
        if norms is not None and norms.numel() == self._count(which):
            module = self._first_bad_module(norms.tolist(), which)
        self._on_host.append(NonFiniteStep(step, loss_value, norm_value, module))
        return False

    def read(self) -> list[NonFiniteStep]:
        """The steps recorded since the last read that were not finite (one host read); clears."""
        found, self._on_host = self._on_host, []
        rows, steps, whiches = self._rows, self._row_steps, self._row_which
        self._rows, self._row_steps, self._row_which = 0, [], []
        if rows == 0:
            return found
        ring = self._ring[:rows]
        bad = torch.nonzero(ring[:, 0]).flatten().tolist()  # the one wait for the device
        values_of_bad = ring[bad].tolist()
        ring.zero_()
        for index, values in zip(bad, values_of_bad, strict=True):
            module = self._first_bad_module(values[4:], whiches[index])
            found.append(NonFiniteStep(steps[index], values[1], values[3] if values[2] else None, module))
        return found

    def _count(self, which: tuple[int, ...] | None) -> int:
        return len(self.names) if which is None else len(which)

    def _first_bad_module(self, norms: list[float], which: tuple[int, ...] | None) -> str | None:
        """The module of the first parameter whose gradient norm in ``norms`` is not finite."""
        bad = next((i for i, norm in enumerate(norms) if not math.isfinite(norm)), None)
        if bad is None:
            return None
        return self._module(bad if which is None else which[bad])

    def _module(self, index: int) -> str:
        name = self.names[index]
        return name.rsplit(".", 1)[0] if "." in name else name


def all_finite(tensors: Sequence[torch.Tensor], distributed: bool = False) -> bool:
    """Whether every element of ``tensors`` is finite (each rank's shard of a sharded tensor), read on
    the host; with ``distributed``, on every rank (an all-reduce: every rank calls it).

    What the trainers ask of the weights before saving them: a finite loss and gradient do not make
    a finite update (a learning rate that overflows, Adam with ``eps=0`` on a zero gradient).
    """
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    if not local:
        return True
    bad = torch.stack([torch.isfinite(t.detach()).all() for t in local]).logical_not().any().float()
    if distributed:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bad.item()


def float_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """``module``'s floating-point buffers (a batch norm's running statistics): checked with its
    weights, since a skipped update's forward pass still wrote them."""
    return [b for b in module.buffers() if b.is_floating_point()]


def present_grads(params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], tuple[int, ...] | None]:
    """The gradients ``params`` have, and whose they are when some have none (a frozen or unused
    parameter; None: every one's): the ``which`` of :meth:`NonFiniteRecord.record` for their norms."""
    grads = [g for p in params if (g := p.grad) is not None]
    if len(grads) == len(params):
        return grads, None
    return grads, tuple(i for i, p in enumerate(params) if p.grad is not None)
