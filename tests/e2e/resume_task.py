"""A user module for the resume tests: a task that records the order it sees the samples in, and a model.

The resume tests run ``ml train`` in a subprocess with this folder on ``PYTHONPATH`` and select the
components as ``resume_task:IndexedTask`` and ``resume_task:DropoutBNModel``. Every training batch
carries the indices of its samples; :class:`IndexedTask` appends one line per batch to
``task.indices_file`` (``<step> <i>,<j>,...``, flushed at once), so a test can wait for a step, stop
the run there, and compare the sample order of an interrupted run with an uninterrupted one.
``task.step_sleep_s`` slows each batch down so that a test can interrupt mid-run, and
``task.ballast_mb`` makes each checkpoint large, so that saving takes long enough to be killed in.

A signal can be made to land at an exact moment: ``task.signal_name`` is sent to the process itself
during the first batch of ``task.signal_phase`` (``valid``, ``test``, ``train``) at step
``task.signal_step``, or with ``signal_phase: end`` in the task's ``on_training_end`` hook (the
teardown), or with ``signal_phase: exit`` as the interpreter exits. With ``task.signal_marker`` the
signal is sent once: only while that file does not exist (it is created then).
"""

import atexit
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ml.core.config import conf_field
from ml.core.state import Phase, State
from ml.models.base import BaseModel, BaseModelConfig
from ml.tasks.sl import SupervisedLearningTask, SupervisedLearningTaskConfig

NUM_FEATURES = 8
NUM_CLASSES = 3
SPLIT_SEEDS = {"train": 0, "valid": 1, "test": 2}


@dataclass
class IndexedTaskConfig(SupervisedLearningTaskConfig):
    num_samples: int = conf_field(48, help="Training samples (valid and test have half as many)")
    indices_file: str | None = conf_field(None, help="Append each training batch's sample indices here")
    step_sleep_s: float = conf_field(0.0, help="Sleep this long in each training batch's loss")
    ballast_mb: float = conf_field(0.0, help="A buffer of this many MiB in the task, to slow saving")
    augment_noise: float = conf_field(0.1, help="Gaussian noise added to training features on loading")
    signal_name: str = conf_field("SIGINT", help="The signal sent at signal_phase")
    signal_phase: str | None = conf_field(None, help="valid, test, train, end (teardown) or exit")
    signal_step: int = conf_field(0, help="The step (state.num_steps) at which to send it")
    signal_marker: str | None = conf_field(None, help="Send it only while this file does not exist")
    dataset_sleep_s: float = conf_field(0.0, help="Sleep this long in get_dataset (a start-up that hangs)")


class NoisyDataset(Dataset):
    """Adds fresh Gaussian noise to the features each time a sample is loaded (an augmentation)."""

    def __init__(self, data: TensorDataset, noise: float) -> None:
        self.data, self.noise = data, noise

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        features, label, idx = self.data[index]
        return features + self.noise * torch.randn(features.shape), label, idx


class IndexedTask(SupervisedLearningTask[IndexedTaskConfig]):
    """Classifies fixed random points; each item is ``(features, label, index)``."""

    def __init__(self, config: IndexedTaskConfig) -> None:
        super().__init__(config)
        ballast = int(config.ballast_mb * 2**20) // 4
        self.register_buffer("ballast", torch.zeros(ballast))

    def get_dataset(self, phase: Phase) -> Dataset:
        time.sleep(self.config.dataset_sleep_s)
        size = self.config.num_samples if phase == "train" else max(self.config.num_samples // 2, 1)
        generator = torch.Generator().manual_seed(SPLIT_SEEDS[phase])
        features = torch.randn(size, NUM_FEATURES, generator=generator)
        labels = (features[:, :NUM_CLASSES].argmax(dim=1) + (features[:, 3] > 1).long()) % NUM_CLASSES
        data = TensorDataset(features, labels, torch.arange(size))
        return NoisyDataset(data, self.config.augment_noise) if phase == "train" else data

    def _signal(self) -> None:
        marker = self.config.signal_marker
        if marker is not None:
            if Path(marker).exists():
                return
            Path(marker).touch()
        os.kill(os.getpid(), signal.Signals[self.config.signal_name])
        time.sleep(0.05)  # delivered here, in the middle of what it interrupts

    def on_training_start(self, state: State, model: Any, optim: Any, lr_sched: Any) -> None:
        super().on_training_start(state, model, optim, lr_sched)
        if self.config.signal_phase == "exit":
            atexit.register(self._signal)

    def on_training_end(self, state: State, model: Any, optim: Any, lr_sched: Any) -> None:
        super().on_training_end(state, model, optim, lr_sched)
        if self.config.signal_phase == "end":
            self._signal()

    def compute_loss(self, model: nn.Module, batch: Any, state: State, output: torch.Tensor) -> torch.Tensor:
        _, labels, indices = batch
        if state.phase == self.config.signal_phase and state.num_steps == self.config.signal_step:
            self._signal()
        if state.training:
            if self.config.indices_file is not None:
                line = f"{state.num_steps + 1} {','.join(map(str, indices.tolist()))}\n"
                with Path(self.config.indices_file).open("a") as f:
                    f.write(line)
            time.sleep(self.config.step_sleep_s)
        accuracy = (output.argmax(dim=1) == labels).float().mean()
        self.logger.log_scalar("accuracy", accuracy, namespace=state.phase)
        return F.cross_entropy(output, labels)


@dataclass
class DropoutBNModelConfig(BaseModelConfig):
    hidden: int = conf_field(16, help="Hidden width")
    dropout: float = conf_field(0.2, help="Dropout probability after the hidden layer")


class DropoutBNModel(BaseModel[DropoutBNModelConfig]):
    """Linear, BatchNorm, ReLU, Dropout, Linear: state in buffers and randomness in every step."""

    def __init__(self, config: DropoutBNModelConfig) -> None:
        super().__init__(config)
        self.net = nn.Sequential(
            nn.Linear(NUM_FEATURES, config.hidden),
            nn.BatchNorm1d(config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, NUM_CLASSES),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def read_indices(path: Path) -> list[tuple[int, list[int]]]:
    """The ``(step, sample indices)`` of each complete line of an indices file, in order.

    A line cut short by a killed process (no newline yet) is left out.
    """
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        step, _, indices = line.strip().partition(" ")
        rows.append((int(step), [int(i) for i in indices.split(",")]))
    return rows
