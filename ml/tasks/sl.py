"""Defines :class:`SupervisedLearningTask`: datasets per phase, the forward pass and the loss.

A supervised task implements :meth:`get_dataset` for the phases it has and :meth:`compute_loss`;
:meth:`run_model` defaults to ``model(batch)``. Data-loader settings live in the config, one block
per phase (``task.train_dl.batch_size=64``).
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


@dataclass
class DataLoaderConfig:
    batch_size: int = conf_field(32, help="Samples per batch")
    num_workers: int = conf_field(0, help="Worker processes loading data (0: load in the main process)")
    pin_memory: bool | None = conf_field(
        None, help="Pin host memory for faster GPU copies (default: on CUDA)"
    )
    # On by default, unlike torch's: a worker start costs ~60 ms here, seconds for a dataset that
    # opens files or imports much, at every epoch and every validation. Kept workers change neither
    # the order nor the draws (the order comes from the main process, every sample's draws from its
    # own seed: ml.utils.data), so exact resume holds. What it costs: an evaluation set's idle
    # workers stay alive during training, and a dataset the main process changes between epochs
    # needs it off (workers keep their copy).
    persistent_workers: bool = conf_field(
        True,
        help="Keep the worker processes from one epoch or evaluation to the next (they keep the "
        "dataset as it was when they started; nothing without workers)",
    )
    prefetch_factor: int | None = conf_field(
        None, help="Batches each worker loads ahead (default: torch's 2; nothing without workers)"
    )
    drop_last: bool = conf_field(False, help="Drop the last incomplete batch")
    shuffle: bool = conf_field(False, help="Shuffle the samples every epoch (resumable mid-epoch)")
    max_batches: int | None = conf_field(
        None,
        help="Validation and test: evaluate at most this many batches of each set in each process, the "
        "set's first ones, the same at every evaluation (null: the whole set)",
    )


def check_max_batches(key: str, max_batches: int | None, *, evaluation: bool) -> None:
    """Refuses a ``max_batches`` that is not positive, or any on training data (which the task's
    limits end: a training epoch is not cut short)."""
    if max_batches is None:
        return
    if not evaluation:
        raise ConfigError(
            f"{key}.max_batches={max_batches}: only validation and test sets are cut short; end "
            "training with task.max_steps, max_epochs or max_samples"
        )
    if max_batches < 1:
        raise ConfigError(f"{key}.max_batches must be positive (or null: the whole set), got {max_batches}")


@dataclass
class SupervisedLearningTaskConfig(BaseTaskConfig):
    seed: int = conf_field(1337, help="Seed of the data order (and of the run's generators)")
    train_dl: DataLoaderConfig = conf_field(
        DataLoaderConfig(shuffle=True, drop_last=True), help="Training data loader"
    )
    valid_dl: DataLoaderConfig = conf_field(DataLoaderConfig(), help="Validation data loader")
    test_dl: DataLoaderConfig = conf_field(DataLoaderConfig(), help="Test data loader")


SLTaskConfigT = TypeVar("SLTaskConfigT", bound=SupervisedLearningTaskConfig)


class SupervisedLearningTask(BaseTask[SLTaskConfigT]):
    """A task that learns from a dataset per phase."""

    def __init__(self, config: SLTaskConfigT) -> None:
        super().__init__(config)
        for phase in ("train", "valid", "test"):
            loader = getattr(config, f"{phase}_dl")
            if loader.batch_size < 1:
                raise ConfigError(f"task.{phase}_dl.batch_size must be positive, got {loader.batch_size}")
            if loader.num_workers < 0:
                raise ConfigError(f"task.{phase}_dl.num_workers must be 0 or more, got {loader.num_workers}")
            check_max_batches(f"task.{phase}_dl", loader.max_batches, evaluation=phase != "train")

    @abstractmethod
    def get_dataset(self, phase: Phase) -> Dataset:
        """Returns the dataset of ``phase`` (``train``, ``valid`` or ``test``).

        A map-style dataset (``__len__`` and ``__getitem__``), or a stream (an ``IterableDataset``
        that reads its shard, :func:`ml.utils.streaming.shard_of_stream`; for training it must
        have ``state_dict``/``load_state_dict`` so that resume is exact: see
        :mod:`ml.utils.streaming`). For ``valid`` and ``test``, a dict of datasets by name evaluates
        each set on its own (logged as ``valid/<name>/<metric>``). Raise ``NotImplementedError``
        for a phase the task does not have: the trainer then skips validation or testing.
        """

    def run_model(self, model: nn.Module, batch: Any, state: State) -> Any:
        """The forward pass; by default the batch's first element (or the batch) goes to the model."""
        del state
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        return model(inputs)

    @abstractmethod
    def compute_loss(
        self, model: nn.Module, batch: Any, state: State, output: Any
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Returns the loss, or a dict of named losses (summed for the backward pass, each logged)."""

    def dataloader_config(self, phase: Phase) -> DataLoaderConfig:
        return {"train": self.config.train_dl, "valid": self.config.valid_dl, "test": self.config.test_dl}[
            phase
        ]
