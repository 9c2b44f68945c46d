"""Tiny real components (model, task, trainer) shared by the trainer tests."""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ml.core.config import conf_field
from ml.core.state import Phase, State
from ml.lr_schedulers.builtin import CosineConfig, CosineLRScheduler
from ml.models.base import BaseModel, BaseModelConfig
from ml.optimizers.builtin import AdamWConfig, AdamWOptimizer
from ml.tasks.sl import SupervisedLearningTask, SupervisedLearningTaskConfig
from ml.trainers.base import BaseTrainer, BaseTrainerConfig


@dataclass
class TinyModelConfig(BaseModelConfig):
    hidden: int = conf_field(8, help="Hidden width")


class TinyModel(BaseModel[TinyModelConfig]):
    def __init__(self, config: TinyModelConfig) -> None:
        super().__init__(config)
        self.net = nn.Sequential(
            nn.Linear(4, config.hidden), nn.BatchNorm1d(config.hidden), nn.ReLU(), nn.Linear(config.hidden, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyTask(SupervisedLearningTask[SupervisedLearningTaskConfig]):
    def __init__(self, config: SupervisedLearningTaskConfig) -> None:
        super().__init__(config)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def get_dataset(self, phase: Phase) -> Dataset:
        g = torch.Generator().manual_seed({"train": 0, "valid": 1, "test": 2}[phase])
        x = torch.randn(64, 4, generator=g)
        return TensorDataset(x, (x.sum(1) > 0).long() + (x[:, 0] > 1).long())

    def compute_loss(
        self, model: nn.Module, batch: tuple, state: State, output: torch.Tensor
    ) -> torch.Tensor:
        self.seen += batch[0].shape[0]
        return F.cross_entropy(output, batch[1])


class TinyTrainer(BaseTrainer[BaseTrainerConfig, TinyModel, TinyTask]):
    """A base trainer whose train() is not needed by these tests."""


def make_parts(exp_dir: Path, **checkpoint: object) -> tuple:
    """A trainer, model, task, optimizer and scheduler adapter for ``exp_dir``."""
    trainer_config = OmegaConf.merge(
        OmegaConf.structured(BaseTrainerConfig),
        {"name": "tiny", "exp_dir": str(exp_dir), "checkpoint": dict(checkpoint)},
    )
    trainer = TinyTrainer(trainer_config)  # type: ignore[arg-type]
    model = TinyModel(TinyModelConfig(name="tiny"))
    task = TinyTask(SupervisedLearningTaskConfig(name="tiny", max_steps=10))
    optim = AdamWOptimizer(AdamWConfig(name="adamw", lr=1e-2)).get(model)
    sched = CosineLRScheduler(CosineConfig(name="cosine", warmup_steps=2, total_steps=10)).get(optim)
    return trainer, model, task, optim, sched


def train_steps(
    model: nn.Module, task: TinyTask, optim: torch.optim.Optimizer, sched: object, state: State, n: int
) -> None:
    data = task.get_dataset("train")
    for _ in range(n):
        idx = torch.randint(0, len(data), (16,))
        x, y = data[idx]  # type: ignore[index]
        loss = task.compute_loss(model, (x, y), state, model(x))
        optim.zero_grad()
        loss.backward()
        sched.step(state)  # type: ignore[attr-defined]
        optim.step()
        state.num_steps += 1
