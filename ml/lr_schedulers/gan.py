"""Defines the ``gan`` schedule: a GAN's generator and discriminator each with a schedule of its own.

The counterpart of the ``gan`` optimizer (:mod:`ml.optimizers.gan`, which says how the parts are
typed and built). A plain ``lr_scheduler`` section gives both parts' optimizers that schedule; this
one gives each its own::

    lr_scheduler:
      name: gan
      generator: {name: cosine, warmup_steps: 100}
      discriminator: {name: constant}

A part's ``total_steps`` defaults to ``task.max_steps``, as a plain section's does.
"""

from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer

from ml.core.config import conf_field
from ml.core.registry import register_lr_scheduler
from ml.core.state import State
from ml.errors import ConfigError
from ml.lr_schedulers.base import BaseLRScheduler, BaseLRSchedulerConfig, SchedulerAdapter
from ml.optimizers.gan import build_parts

_FOR_THE_GAN_TRAINER = (
    "lr_scheduler.name=gan gives a GAN's generator and discriminator a schedule each: it is for "
    "trainer.name=gan; name one schedule (e.g. cosine) for this trainer"
)


@dataclass
class GanLRSchedulerConfig(BaseLRSchedulerConfig):
    """A schedule section for each part of a GAN."""

    generator: Any = conf_field({"name": "constant"}, help="The generator's schedule section")
    discriminator: Any = conf_field({"name": "constant"}, help="The discriminator's schedule section")


@register_lr_scheduler("gan")
class GanLRScheduler(BaseLRScheduler[GanLRSchedulerConfig]):
    """The generator's and the discriminator's schedules, each built from its own section."""

    def __init__(self, config: GanLRSchedulerConfig) -> None:
        super().__init__(config)
        self.parts: dict[str, BaseLRScheduler] = build_parts(self.raw_config, "lr_scheduler", "lr_scheduler")

    def get_lr_scale(self, state: State) -> float:
        raise ConfigError(_FOR_THE_GAN_TRAINER)

    def get(self, optim: Optimizer) -> SchedulerAdapter:
        raise ConfigError(_FOR_THE_GAN_TRAINER)

    def get_parts(self, optims: dict[str, Optimizer]) -> dict[str, SchedulerAdapter]:
        """Each part's schedule bound to that part's optimizer, by part name."""
        return {name: self.parts[name].get(optim) for name, optim in optims.items()}
