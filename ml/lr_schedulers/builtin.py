"""Defines the built-in learning-rate schedules: ``constant``, ``linear``, ``cosine``, and the
original framework's ``linear_no_decay`` and ``cosine_decay``.

Every schedule is a pure function of ``state.num_steps``. The trainer calls
:meth:`~ml.lr_schedulers.base.SchedulerAdapter.step` *before* each optimizer step, when
``state.num_steps`` is ``k`` for the ``k``-th update (0-based). The schedules are written in terms of
``t = k + 1``, the 1-based number of the update about to be made, so the whole curve is shifted
consistently:

* warmup: ``t / warmup_steps`` for ``t <= warmup_steps``; the first update uses ``1 / warmup_steps``
  (never 0) and update ``warmup_steps - 1`` (0-based) uses exactly 1;
* decay: from 1 at ``t = warmup_steps`` to ``min_scale`` at ``t = total_steps``, i.e. the last update
  of a run of ``total_steps`` updates (``k = total_steps - 1``) uses exactly ``min_scale``, and every
  later step stays there.

``total_steps`` defaults to the task's length in steps through the resolver ``ml.task_steps``
(:func:`ml.core.config.task_steps`): ``task.max_steps``, or for a reinforcement-learning task the
iterations until ``task.max_steps`` or ``task.max_samples`` (environment steps) ends the run,
whichever comes first. It resolves when
the scheduler's config sits in the same tree as the task's, and stays a reference in the saved
config, so a run continued with a higher limit gets a schedule of the new length.
"""

import logging
import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, TypeVar

from ml.core.config import conf_field
from ml.core.registry import register_lr_scheduler
from ml.core.state import State
from ml.lr_schedulers.base import BaseLRScheduler, BaseLRSchedulerConfig

logger = logging.getLogger(__name__)

TOTAL_STEPS_FROM_TASK = (
    "${ml.task_steps:${oc.select:task.max_steps,null},${oc.select:task.max_samples,null},"
    "${oc.select:task.num_envs,null},${oc.select:task.num_env_steps,null}}"
)


def _warmup_scale(update: int, warmup_steps: int) -> float:
    """Linear warmup for the 1-based ``update`` (``update <= warmup_steps``)."""
    return update / warmup_steps


def _check_warmup_steps(warmup_steps: int) -> None:
    if warmup_steps < 0:
        raise ValueError(f"lr_scheduler.warmup_steps must be non-negative (>= 0), got {warmup_steps}")


def _resolve_total_steps(raw_config: Any, warmup_steps: int, min_scale: float) -> int:
    """Validates the decay fields and returns ``total_steps`` (resolving its interpolation).

    ``total_steps`` is read from the raw OmegaConf node, so the ``task.max_steps`` interpolation is
    resolved against the tree the config belongs to (a standalone config resolves it to null).

    Raises:
        ValueError: If ``total_steps`` is unset, or a field is out of range.
    """
    if not 0.0 <= min_scale <= 1.0:
        raise ValueError(f"lr_scheduler.min_scale must be between 0 and 1 (inclusive), got {min_scale}")
    total_steps = raw_config.total_steps
    if total_steps is None:
        raise ValueError(
            "the learning-rate schedule needs a length: set lr_scheduler.total_steps or task.max_steps "
            "(or task.max_samples for reinforcement learning)"
        )
    total_steps = int(total_steps)
    if total_steps < 1:
        raise ValueError(f"lr_scheduler.total_steps must be positive, got {total_steps}")
    return total_steps


def _clamp_warmup(warmup_steps: int, total_steps: int) -> int:
    """A warm-up no longer than the run: one as long or longer (``task.max_steps=60`` under a
    warm-up of 100) is cut to half the run, with a warning, so that a short run still trains."""
    if warmup_steps < total_steps:
        return warmup_steps
    clamped = total_steps // 2
    logger.warning(
        "lr_scheduler.warmup_steps (%d) is not shorter than the schedule (total_steps %d): "
        "warming up for %d steps, half of it",
        warmup_steps,
        total_steps,
        clamped,
    )
    return clamped


@dataclass
class ConstantConfig(BaseLRSchedulerConfig):
    """Config of the ``constant`` schedule."""

    name: str = conf_field("constant", help="Registered name, or `package.module:ClassName`")
    warmup_steps: int = conf_field(0, help="Updates of linear warmup from 1/warmup_steps to 1 (0: none)")


@register_lr_scheduler("constant")
class ConstantLRScheduler(BaseLRScheduler[ConstantConfig]):
    """A constant scale of 1, after an optional linear warmup.

    ``scale(t) = min(1, t / warmup_steps)`` with ``t = state.num_steps + 1`` (1 when there is no
    warmup).

    Raises:
        ValueError: If ``warmup_steps`` is negative.
    """

    def __init__(self, config: ConstantConfig) -> None:
        super().__init__(config)
        self.warmup_steps = int(self.raw_config.warmup_steps)
        _check_warmup_steps(self.warmup_steps)

    def get_lr_scale(self, state: State) -> float:
        update = state.num_steps + 1
        if update < self.warmup_steps:
            return _warmup_scale(update, self.warmup_steps)
        return 1.0


@dataclass
class WarmupDecayConfig(BaseLRSchedulerConfig):
    """Fields shared by the schedules that warm up, then decay to a floor."""

    warmup_steps: int = conf_field(0, help="Updates of linear warmup from 1/warmup_steps to 1 (0: none)")
    total_steps: int | None = conf_field(
        TOTAL_STEPS_FROM_TASK,
        help="Update at which the scale reaches min_scale (default: the task's length in steps)",
    )
    min_scale: float = conf_field(0.0, help="Final scale, kept after total_steps (0 <= min_scale <= 1)")


DecayConfigT = TypeVar("DecayConfigT", bound=WarmupDecayConfig)


class WarmupDecayLRScheduler(BaseLRScheduler[DecayConfigT]):
    """Linear warmup to 1, a decay (:meth:`decay`) to ``min_scale`` at ``total_steps``, then ``min_scale``.

    With ``t = state.num_steps + 1``, ``W = warmup_steps`` and ``T = total_steps``: ``t / W`` for
    ``t < W``; ``decay(t - W, T - W)`` for ``W <= t < T``; ``min_scale`` for ``t >= T``.

    Raises:
        ValueError: If ``total_steps`` resolves to null, or a field is out of range.
    """

    def __init__(self, config: DecayConfigT) -> None:
        super().__init__(config)
        self.warmup_steps = int(self.raw_config.warmup_steps)
        self.min_scale = float(self.raw_config.min_scale)
        _check_warmup_steps(self.warmup_steps)
        self.total_steps = _resolve_total_steps(self.raw_config, self.warmup_steps, self.min_scale)
        self.warmup_steps = _clamp_warmup(self.warmup_steps, self.total_steps)

    @abstractmethod
    def decay(self, step: int, span: int) -> float:
        """The scale ``step`` updates into a decay of ``span`` updates (``0 <= step < span``)."""

    def get_lr_scale(self, state: State) -> float:
        update = state.num_steps + 1
        if update < self.warmup_steps:
            return _warmup_scale(update, self.warmup_steps)
        if update >= self.total_steps:
            return self.min_scale
        return self.decay(update - self.warmup_steps, self.total_steps - self.warmup_steps)


@dataclass
class LinearConfig(WarmupDecayConfig):
    """Config of the ``linear`` schedule."""

    name: str = conf_field("linear", help="Registered name, or `package.module:ClassName`")


@register_lr_scheduler("linear")
class LinearLRScheduler(WarmupDecayLRScheduler[LinearConfig]):
    """Linear warmup, then linear decay from 1 to ``min_scale``: ``1 - (1 - m) * (t - W) / (T - W)``."""

    def decay(self, step: int, span: int) -> float:
        return 1.0 - (1.0 - self.min_scale) * step / span


@dataclass
class CosineConfig(WarmupDecayConfig):
    """Config of the ``cosine`` schedule."""

    name: str = conf_field("cosine", help="Registered name, or `package.module:ClassName`")
    num_cycles: int = conf_field(1, help="Equal cosine cycles after warmup, each restarting at 1 (1: none)")


@register_lr_scheduler("cosine")
class CosineLRScheduler(WarmupDecayLRScheduler[CosineConfig]):
    """Linear warmup, then cosine decay from 1 to ``min_scale``, optionally with restarts.

    ``m + (1 - m) * (1 + cos(pi * q)) / 2``, where ``q = frac(n * (t - W) / (T - W))`` is the position
    in the current one of ``n = num_cycles`` cycles. Each cycle starts at exactly 1; the last one ends
    at exactly ``m``.
    """

    def __init__(self, config: CosineConfig) -> None:
        super().__init__(config)
        self.num_cycles = int(self.raw_config.num_cycles)
        if self.num_cycles < 1:
            raise ValueError(f"lr_scheduler.num_cycles must be positive (>= 1), got {self.num_cycles}")
        decay_steps = self.total_steps - self.warmup_steps
        if self.num_cycles > decay_steps:
            raise ValueError(
                f"lr_scheduler.num_cycles must be at most total_steps - warmup_steps ({decay_steps}) "
                f"so that every cycle spans at least one update, got {self.num_cycles}"
            )

    def decay(self, step: int, span: int) -> float:
        # Integer arithmetic, so that a cycle boundary gives exactly 0 (a restart at exactly 1).
        position = (self.num_cycles * step) % span / span
        return self.min_scale + (1.0 - self.min_scale) * 0.5 * (1.0 + math.cos(math.pi * position))


@dataclass
class LinearNoDecayConfig(ConstantConfig):
    """Config of the ``linear_no_decay`` schedule (the original framework's name and default)."""

    name: str = conf_field("linear_no_decay", help="Registered name, or `package.module:ClassName`")
    warmup_steps: int = conf_field(1000, help="Updates of linear warmup from 1/warmup_steps to 1 (0: none)")


@register_lr_scheduler("linear_no_decay", LinearNoDecayConfig)
class LinearNoDecayLRScheduler(ConstantLRScheduler):
    """Linear warmup to 1, then 1: ``constant`` with the original's 1000 warm-up updates.

    The original's first update used a scale of 0 (``num_steps / warmup_steps`` at step 0); here it
    is ``1 / warmup_steps``, as for every schedule of this module.
    """


@dataclass
class CosineDecayConfig(BaseLRSchedulerConfig):
    """Config of the ``cosine_decay`` schedule (the original framework's names and defaults)."""

    name: str = conf_field("cosine_decay", help="Registered name, or `package.module:ClassName`")
    total_steps: int | None = conf_field(
        TOTAL_STEPS_FROM_TASK,
        help="Update at which the decay reaches min_decay (default: the task's length in steps)",
    )
    num_resets: int = conf_field(
        0, help="Restarts of the cosine: num_resets + 1 cycles (when phase is unset)"
    )
    phase: int | None = conf_field(
        None, help="Updates in one cycle (default: total_steps / (num_resets + 1))"
    )
    ramp_up_percent: float = conf_field(
        0.05, help="Share of a cycle that ramps up (when ramp_up_steps is unset)"
    )
    ramp_up_steps: int | None = conf_field(
        None,
        help="Updates of a cycle's linear ramp from eta_min to eta_max (default: phase * ramp_up_percent)",
    )
    eta_min: float = conf_field(0.01, help="Lowest scale of a cycle (before the decay)")
    eta_max: float = conf_field(1.0, help="Highest scale of a cycle (before the decay)")
    min_decay: float = conf_field(1e-4, help="Final factor of the linear decay from 1 over total_steps")


@register_lr_scheduler("cosine_decay")
class CosineDecayLRScheduler(BaseLRScheduler[CosineDecayConfig]):
    """Cosine cycles (each a linear ramp up, then a cosine down) under a linear decay, as the original had.

    With ``t = state.num_steps + 1``, ``T = total_steps``, ``P = phase``, ``R = ramp_up_steps`` and
    ``c = (t - 1) mod P`` the update's place in its cycle: the cycle's shape is
    ``eta_min + (eta_max - eta_min) * (c + 1) / R`` while ``c < R``, then
    ``eta_min + (eta_max - eta_min) * (1 + cos(pi * (c + 1 - R) / (P - R))) / 2``; it is multiplied by
    the decay ``min_decay + (1 - min_decay) * (T - t) / T``, so each restart peaks lower. Every
    update from ``T`` on keeps the scale of update ``T``.

    Fixed against the original: a cycle lasts ``phase`` updates (it lasted ``phase + ramp_up_steps``,
    so the cycles overran ``total_steps``); past ``total_steps`` the scale stays put (the decay went
    negative: a negative learning rate); the ramp rises to ``eta_max`` (it rose to 1) and its first
    update is not 0; the default phase rounds up, so that ``num_resets + 1`` cycles fit without a
    restart in the last updates; and the length may come from a reinforcement-learning task's
    ``max_samples``.

    Raises:
        ValueError: ``total_steps`` resolves to null, or a field is out of range.
    """

    def __init__(self, config: CosineDecayConfig) -> None:
        super().__init__(config)
        raw = self.raw_config
        self.min_decay = float(raw.min_decay)
        self.eta_min, self.eta_max = float(raw.eta_min), float(raw.eta_max)
        self.total_steps = _resolve_total_steps(raw, 0, 0.0)
        if not 0.0 <= self.min_decay <= 1.0:
            raise ValueError(
                f"lr_scheduler.min_decay must be between 0 and 1 (inclusive), got {self.min_decay}"
            )
        if not 0.0 <= self.eta_min <= self.eta_max:
            raise ValueError(
                f"lr_scheduler.eta_min and eta_max must satisfy 0 <= eta_min <= eta_max, "
                f"got {self.eta_min} and {self.eta_max}"
            )
        num_resets = int(raw.num_resets)
        if num_resets < 0:
            raise ValueError(f"lr_scheduler.num_resets must be non-negative (>= 0), got {num_resets}")
        self.phase = (
            int(raw.phase) if raw.phase is not None else math.ceil(self.total_steps / (num_resets + 1))
        )
        if self.phase < 1:
            raise ValueError(f"lr_scheduler.phase must be positive, got {self.phase}")
        if raw.ramp_up_steps is not None:
            self.ramp_up_steps = int(raw.ramp_up_steps)
        else:
            if not 0.0 <= float(raw.ramp_up_percent) < 1.0:
                raise ValueError(f"lr_scheduler.ramp_up_percent must be in [0, 1), got {raw.ramp_up_percent}")
            self.ramp_up_steps = int(self.phase * float(raw.ramp_up_percent))
        if not 0 <= self.ramp_up_steps < self.phase:
            raise ValueError(
                f"lr_scheduler.ramp_up_steps must be in [0, phase) = [0, {self.phase}), "
                f"got {self.ramp_up_steps}"
            )

    def get_lr_scale(self, state: State) -> float:
        update = min(state.num_steps + 1, self.total_steps)
        place = (update - 1) % self.phase
        ramp, span = self.ramp_up_steps, self.eta_max - self.eta_min
        if place < ramp:
            shape = self.eta_min + span * (place + 1) / ramp
        else:
            shape = self.eta_min + span * 0.5 * (
                1.0 + math.cos(math.pi * (place + 1 - ramp) / (self.phase - ramp))
            )
        decay = self.min_decay + (1.0 - self.min_decay) * (self.total_steps - update) / self.total_steps
        return shape * decay
