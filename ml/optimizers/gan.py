"""Defines the ``gan`` optimizer: a GAN's generator and discriminator each with an optimizer of its own.

The ``gan`` trainer (:mod:`ml.trainers.gan`) gives each part of the model its own optimizer. A plain
``optimizer`` section (``{name: adam, lr: 2e-4}``) gives both parts an optimizer of those settings;
this one gives each its own settings, as an optimizer section of its own::

    optimizer:
      name: gan
      generator: {name: adam, lr: 2e-4, beta1: 0.5}
      discriminator: {name: sgd, lr: 0.01}

Each part is typed and built by the owners of that (:func:`ml.core.compose.typed_section`,
:func:`ml.core.compose.build_component`), so a wrong key or value is refused in one line naming it
(``optimizer.generator.lr``). The typed part is put back where it was written, so that the run's
``config.yaml`` shows every setting it trained with, and references to other keys in a part's
defaults (a schedule's ``total_steps: ${...task.max_steps...}``) resolve against the whole config.
"""

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer

from ml.core.compose import build_component, typed_section
from ml.core.config import conf_field
from ml.core.registry import Kind, register_optimizer
from ml.errors import ConfigError
from ml.optimizers.base import BaseOptimizer, BaseOptimizerConfig

GAN_PARTS = ("generator", "discriminator")


def build_parts(raw_config: DictConfig, kind: Kind, section: str) -> dict[str, Any]:
    """Types and builds each part's section of a ``gan`` optimizer or schedule (``section.generator``...).

    Raises:
        ConfigError: A part is not a section of a component of ``kind``, or is itself a ``gan`` one.
    """
    built: dict[str, Any] = {}
    for part in GAN_PARTS:
        where = f"{section}.{part}"
        raw = raw_config[part]
        if not isinstance(raw, DictConfig):
            raw = OmegaConf.create(raw) if isinstance(raw, dict) else raw
        if isinstance(raw, DictConfig) and raw.get("name") == "gan":
            raise ConfigError(f"{where}.name: name the {part}'s own {kind} (e.g. adam), not another gan")
        typed = typed_section(where, kind, raw)
        raw_config[part] = typed  # in place: config.yaml shows it whole, and its references resolve
        built[part] = build_component(where, kind, raw_config[part])
    return built


@dataclass
class GanOptimizerConfig(BaseOptimizerConfig):
    """An optimizer section for each part of a GAN."""

    generator: Any = conf_field(
        {"name": "adam"}, help="The generator's optimizer section ({name: adam, ...})"
    )
    discriminator: Any = conf_field(
        {"name": "adam"}, help="The discriminator's optimizer section ({name: adam, ...})"
    )


@register_optimizer("gan")
class GanOptimizer(BaseOptimizer[GanOptimizerConfig]):
    """The generator's and the discriminator's optimizers, each built from its own section."""

    def __init__(self, config: GanOptimizerConfig) -> None:
        super().__init__(config)
        self.parts: dict[str, BaseOptimizer] = build_parts(self.raw_config, "optimizer", "optimizer")

    def get(self, model: nn.Module) -> Optimizer:
        raise ConfigError(
            "optimizer.name=gan gives a GAN's generator and discriminator an optimizer each: it is for "
            "trainer.name=gan; name one optimizer (e.g. adam) for this trainer"
        )

    def get_parts(self, parts: dict[str, nn.Module]) -> dict[str, Optimizer]:
        """A new optimizer for each part's trainable parameters, by part name."""
        return {name: self.parts[name].get(module) for name, module in parts.items()}
