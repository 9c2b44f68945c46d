"""A user module whose logged numbers are known exactly: the samples are the numbers 0, 1, ..., N-1.

The model returns its input (plus 0 times a child layer's output, so that there is a gradient) and logs
the batch's mean; the loss is the output's mean; the learning rate is 0 in the tests, so nothing
changes. A validation pass over ``n_valid`` samples then has the mean ``(n_valid - 1) / 2``
whatever the batches and the ranks, and the task also logs ``some``, the mean of the batch holding
``some_at`` only (logged for that batch alone, on one rank alone). Selected as
``counting_task:CountingTask`` and ``counting_task:CountingModel`` (this folder on ``PYTHONPATH``).
"""

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ml.core.config import conf_field
from ml.core.state import Phase, State
from ml.models.base import BaseModel, BaseModelConfig
from ml.tasks.sl import SupervisedLearningTask, SupervisedLearningTaskConfig


class CountingModel(BaseModel[BaseModelConfig]):
    def __init__(self, config: BaseModelConfig) -> None:
        super().__init__(config)
        # A child module: FSDP shards it on its own and gathers its weight at every forward pass (a
        # collective; the root's weights stay gathered after the first pass).
        self.scale = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.scale.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.logger.log_scalar("mean", x.mean())
        return x + 0.0 * self.scale(x.unsqueeze(-1)).squeeze(-1)


class NormedCountingModel(CountingModel):
    """The counting model behind a batch norm: training moves its running statistics, each rank's by
    its own batches; evaluation then gives ``(x - running_mean) / sqrt(running_var + eps)``."""

    def __init__(self, config: BaseModelConfig) -> None:
        super().__init__(config)
        self.norm = nn.BatchNorm1d(1, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x).unsqueeze(-1)).squeeze(-1)


@dataclass
class CountingTaskConfig(SupervisedLearningTaskConfig):
    n_train: int = conf_field(10, help="Training samples: 0, 1, ..., n_train - 1")
    n_valid: int = conf_field(7, help="Validation and test samples")
    some_at: float = conf_field(5.0, help="The sample whose batch alone logs `some`")
    step_sleep_s: float = conf_field(0.0, help="Seconds each training batch sleeps (a slow step)")


class CountingTask(SupervisedLearningTask[CountingTaskConfig]):
    def get_dataset(self, phase: Phase) -> Any:
        n = self.config.n_train if phase == "train" else self.config.n_valid
        return TensorDataset(torch.arange(n, dtype=torch.float32))

    def compute_loss(self, model: nn.Module, batch: Any, state: State, output: torch.Tensor) -> torch.Tensor:
        x = batch[0]
        if state.training:
            time.sleep(self.config.step_sleep_s)
        if bool((x == self.config.some_at).any()):
            self.logger.log_scalar("some", x.mean(), namespace=state.phase)
        return output.mean()
