"""Defines :class:`GanTask`: the data and the two losses of a generative adversarial network.

The ``gan`` trainer (:mod:`ml.trainers.gan`) trains it. The protocol, in full:

- The model has two submodules, ``model.generator`` and ``model.discriminator`` (any
  ``nn.Module``; the trainer refuses a model without them, or whose parts share parameters). Each
  part has its own optimizer and schedule (``optimizer: {name: gan, generator: ..., discriminator:
  ...}``, or one plain section for both).
- :meth:`GanTask.get_dataset` gives the real samples (``get_dataset("train")``, map-style); the
  trainer loads them with ``task.train_dl`` in a resumable order.
- A training step takes ``trainer.discriminator_steps`` batches: for each, one discriminator
  update on :meth:`GanTask.discriminator_loss`; then one generator update on
  :meth:`GanTask.generator_loss` (given the step's last batch: its size, its labels). While one part
  is updated the other's parameters are frozen, so a loss may run both parts freely: fakes drawn in
  the discriminator's loss carry no graph into the generator, nothing needs ``detach()``.
- A step logs one value per key: the scalars :meth:`GanTask.discriminator_loss` logs (with
  ``self.logger.log_scalar``, or the model's logger) are averaged over the step's discriminator
  updates, weighted by batch size, as its loss is; those :meth:`GanTask.generator_loss` logs are its
  one update's.
- Noise comes from torch's global generator (``torch.randn``), which every checkpoint holds: a
  resumed run draws what an uninterrupted one would.
- :meth:`GanTask.evaluate` (optional) is the validation: sample, score, log images (with
  ``self.logger.log_images(..., namespace="valid")``); it returns metrics, logged as
  ``valid/<name>``. It runs under ``torch.no_grad`` with the model in eval mode and torch's global
  generators seeded from the step and restored afterwards, so it draws the same samples at a given
  step in every run and changes nothing about training.
"""

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset

from ml.core.config import conf_field
from ml.core.state import Phase, State
from ml.errors import ConfigError
from ml.tasks.base import BaseTask, BaseTaskConfig
from ml.tasks.sl import DataLoaderConfig, check_max_batches

Losses = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class GanTaskConfig(BaseTaskConfig):
    seed: int = conf_field(1337, help="Seed of the data order (and of the run's generators)")
    train_dl: DataLoaderConfig = conf_field(
        DataLoaderConfig(shuffle=True, drop_last=True), help="Training data loader (the real samples)"
    )


GanTaskConfigT = TypeVar("GanTaskConfigT", bound=GanTaskConfig)


class GanTask(BaseTask[GanTaskConfigT]):
    """A task that trains a generator against a discriminator (see the module docstring)."""

    def __init__(self, config: GanTaskConfigT) -> None:
        super().__init__(config)
        loader = config.train_dl
        if loader.batch_size < 1:
            raise ConfigError(f"task.train_dl.batch_size must be positive, got {loader.batch_size}")
        if loader.num_workers < 0:
            raise ConfigError(f"task.train_dl.num_workers must be 0 or more, got {loader.num_workers}")
        check_max_batches("task.train_dl", loader.max_batches, evaluation=False)

    @abstractmethod
    def get_dataset(self, phase: Phase) -> Dataset:
        """The real samples the discriminator learns from (the trainer asks for ``train`` only)."""

    @abstractmethod
    def discriminator_loss(self, model: nn.Module, batch: Any, state: State) -> Losses:
        """The discriminator's loss on a batch of real samples and fakes it draws (a scalar, or
        named scalars, summed)."""

    @abstractmethod
    def generator_loss(self, model: nn.Module, batch: Any, state: State) -> Losses:
        """The generator's loss on fakes it draws (``batch``: the step's last real batch)."""

    def evaluate(self, model: nn.Module, state: State) -> dict[str, float]:
        """The validation's metrics by name (logged as ``valid/<name>``); none by default."""
        del model, state
        return {}

    @property
    def evaluates(self) -> bool:
        """Whether this task has a validation (overrides :meth:`evaluate`)."""
        return type(self).evaluate is not GanTask.evaluate

    def dataloader_config(self, phase: Phase) -> DataLoaderConfig:
        del phase
        return self.config.train_dl
