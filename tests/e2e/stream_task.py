"""A user module for the streaming tests: a task whose data is an ``IterableDataset``, and a model.

The tests run ``ml train`` in a subprocess with this folder on ``PYTHONPATH`` and select the
components as ``stream_task:StreamTask`` and ``stream_task:DropoutMLP``.

:class:`NoisyStream` is what a streaming dataset author writes: it reads only its shard
(:func:`ml.utils.streaming.shard_of_stream`, by rank and loader worker), draws a new order each epoch
(``set_epoch``), adds random noise to every sample it yields (an augmentation, drawn from the
global torch generator of whichever process reads it), and says where it stands with
``state_dict()`` / ``load_state_dict()``.

To interrupt a run at exact steps, ``task.stops`` (``"3:SIGTERM,8:SIGKILL"``) makes rank 0 send
itself each signal during that training step, once: only while ``<task.stop_marker_dir>/stop.<step>``
does not exist (it is created then), so that the continued run goes on.
"""

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

from ml.core.config import conf_field
from ml.core.state import Phase, State
from ml.models.base import BaseModel, BaseModelConfig
from ml.tasks.sl import SupervisedLearningTask, SupervisedLearningTaskConfig
from ml.utils.streaming import shard_of_stream

NUM_FEATURES = 6
NUM_CLASSES = 3
SPLIT_SEEDS = {"train": 0, "valid": 1, "test": 2}


def split(phase: Phase, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``size`` points of ``phase`` (drawn from the split's own seed) and their labels."""
    generator = torch.Generator().manual_seed(SPLIT_SEEDS[phase])
    features = torch.randn(size, NUM_FEATURES, generator=generator)
    labels = (features[:, :NUM_CLASSES].argmax(dim=1) + (features[:, 3] > 1).long()) % NUM_CLASSES
    return features, labels


def epoch_order(size: int, epoch: int) -> torch.Tensor:
    """The indices in the order of ``epoch``; each copy of the stream reads every count-th one."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(epoch))


class NoisyStream(IterableDataset):
    """Streams ``(features + noise, label, index)``; each copy reads its shard of the epoch's order."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, noise: float, *, opaque: bool = False):
        self.features, self.labels, self.noise = features, labels, noise
        self.opaque = opaque  # state_dict() returns an object (refused when checkpointed)
        self.epoch = 0
        self.position = 0  # how many samples of this copy's shard of the epoch were read

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        if self.opaque:
            return {"where": Path(str(self.position))}
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        index, count = shard_of_stream()
        mine = epoch_order(len(self.labels), self.epoch)[index::count].tolist()
        while self.position < len(mine):
            i = mine[self.position]
            self.position += 1
            noise = self.noise * torch.randn(NUM_FEATURES) if self.noise else 0.0
            yield self.features[i] + noise, self.labels[i], torch.tensor(i)


@dataclass
class StreamTaskConfig(SupervisedLearningTaskConfig):
    num_samples: int = conf_field(38, help="Training samples (valid and test have half as many)")
    noise: float = conf_field(0.1, help="Gaussian noise added to training features as they stream")
    empty: bool = conf_field(False, help="Stream nothing (a stream that would never make a step)")
    opaque_state: bool = conf_field(False, help="state_dict() returns an object, not plain data")
    eval_streams: bool = conf_field(True, help="Valid and test sets are streams (else map-style datasets)")
    stops: str = conf_field("", help="STEP:SIGNAL,...: rank 0 sends itself SIGNAL during training step STEP")
    stop_marker_dir: str = conf_field(".", help="Each stop happens once: while stop.<step> is not here")


class StreamTask(SupervisedLearningTask[StreamTaskConfig]):
    """Classifies fixed random points, streamed; every split is a stream (valid and test without noise)."""

    def get_dataset(self, phase: Phase) -> NoisyStream | TensorDataset:
        size = 0 if self.config.empty else self.config.num_samples
        size = size if phase == "train" else size // 2
        features, labels = split(phase, size)
        if phase != "train" and not self.config.eval_streams:
            return TensorDataset(features, labels, torch.arange(size))
        noise = self.config.noise if phase == "train" else 0.0
        return NoisyStream(features, labels, noise, opaque=self.config.opaque_state)

    def _maybe_stop(self, state: State) -> None:
        step = state.num_steps + 1
        stops = dict(stop.split(":") for stop in self.config.stops.split(",") if stop)
        if str(step) not in stops or int(os.environ.get("RANK", "0")) != 0:
            return
        marker = Path(self.config.stop_marker_dir) / f"stop.{step}"
        if marker.exists():
            return
        marker.touch()
        os.kill(os.getpid(), signal.Signals[stops[str(step)]])

    def compute_loss(self, model: nn.Module, batch: Any, state: State, output: torch.Tensor) -> torch.Tensor:
        _, labels, _ = batch
        if state.training:
            self._maybe_stop(state)
        accuracy = (output.argmax(dim=1) == labels).float().mean()
        self.logger.log_scalar("accuracy", accuracy, namespace=state.phase)
        return F.cross_entropy(output, labels)


@dataclass
class DropoutMLPConfig(BaseModelConfig):
    hidden: int = conf_field(16, help="Hidden width")
    dropout: float = conf_field(0.2, help="Dropout probability after the hidden layer")
    log_weight_sum: bool = conf_field(False, help="Log the sum of the weights a training step starts from")


class DropoutMLP(BaseModel[DropoutMLPConfig]):
    """Linear, ReLU, Dropout, Linear: randomness in every training step (and fine with batches of one)."""

    def __init__(self, config: DropoutMLPConfig) -> None:
        super().__init__(config)
        self.net = nn.Sequential(
            nn.Linear(NUM_FEATURES, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, NUM_CLASSES),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training and self.config.log_weight_sum:
            self.logger.log_scalar("weight_sum", sum(p.detach().double().sum() for p in self.parameters()))
        return self.net(features)
