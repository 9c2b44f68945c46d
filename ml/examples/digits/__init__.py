"""Defines the ``digits`` example: the 8x8 handwritten digits that ship with scikit-learn.

1,797 grey-scale images of 64 pixels, split once with a fixed seed into train (1,257), valid (180)
and test (360) samples; no download. The model is a small MLP (``digits_mlp``); the task
(``digits``) computes cross-entropy and logs accuracy, and at each validation a grid of the
validation images the model got wrong (``valid/misclassified``, shown in TensorBoard's images tab).
"""

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ml.core.config import conf_field
from ml.core.registry import register_model, register_task
from ml.core.state import Phase, State
from ml.models.base import BaseModel, BaseModelConfig
from ml.tasks.sl import SupervisedLearningTask, SupervisedLearningTaskConfig

SPLIT_SIZES = {"train": 1257, "valid": 180, "test": 360}
MAX_MISCLASSIFIED_SHOWN = 64  # an 8 x 8 grid


def _digits_file() -> Path | None:
    """scikit-learn's ``digits.csv.gz``, found without importing scikit-learn (which costs ~2 s)."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 images (pixel values 0-16, float64, 64 per row) and their labels, as sklearn has them.

    Reads the CSV that ships inside scikit-learn directly, as ``sklearn.datasets.load_digits`` does
    (64 pixel columns, then the label); falls back to that function if the file is elsewhere.
    """
    path = _digits_file()
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.data, digits.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


@cache
def _load_digits_split(split_seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    data, target = load_digits_arrays()  # the data ships inside scikit-learn
    images = (data / 16.0).astype(np.float32)
    labels = target.astype(np.int64)
    order = np.random.RandomState(split_seed).permutation(len(labels))
    splits, start = {}, 0
    for phase, size in SPLIT_SIZES.items():
        idx = order[start : start + size]
        splits[phase] = (images[idx], labels[idx])
        start += size
    return splits


@dataclass
class DigitsMLPConfig(BaseModelConfig):
    hidden: int = conf_field(256, help="Width of the hidden layers")
    num_layers: int = conf_field(2, help="Number of hidden layers")
    dropout: float = conf_field(0.1, help="Dropout probability after each hidden layer")


@register_model("digits_mlp")
class DigitsMLP(BaseModel[DigitsMLPConfig]):
    """A multi-layer perceptron from 64 pixels to 10 class logits."""

    def __init__(self, config: DigitsMLPConfig) -> None:
        super().__init__(config)
        layers: list[nn.Module] = []
        width = 64
        for _ in range(config.num_layers):
            layers += [nn.Linear(width, config.hidden), nn.ReLU(), nn.Dropout(config.dropout)]
            width = config.hidden
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.flatten(1))


@dataclass
class DigitsCNNConfig(BaseModelConfig):
    channels: int = conf_field(32, help="Channels of the first convolution (the second has twice as many)")
    hidden: int = conf_field(128, help="Width of the hidden fully connected layer")
    dropout: float = conf_field(0.25, help="Dropout probability before the classifier")


@register_model("digits_cnn")
class DigitsCNN(BaseModel[DigitsCNNConfig]):
    """Two 3x3 convolutions, a 2x2 max-pool and two fully connected layers, for 8x8 images."""

    def __init__(self, config: DigitsCNNConfig) -> None:
        super().__init__(config)
        c = config.channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * c * 4 * 4, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images.view(-1, 1, 8, 8)))


@dataclass
class DigitsTaskConfig(SupervisedLearningTaskConfig):
    split_seed: int = conf_field(0, help="Seed of the fixed train/valid/test split")


@register_task("digits")
class DigitsTask(SupervisedLearningTask[DigitsTaskConfig]):
    """Classify 8x8 digit images; logs cross-entropy, accuracy and the misclassified validation images."""

    def __init__(self, config: DigitsTaskConfig) -> None:
        super().__init__(config)
        # The validation batches seen at this step: (images, predictions, labels), kept as they are
        # (on the device) until a logger writes the grid, the only time they are read.
        self._valid_step: int | None = None
        self._valid_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def misclassified_images(self) -> torch.Tensor:
        """The wrongly predicted images of the latest validation (at most 64), ``(N, 8, 8)``, 0..1."""
        wrong = [images[preds != labels] for images, preds, labels in self._valid_batches]
        images = torch.cat(wrong) if wrong else torch.zeros(0, 64)
        self._valid_step = None  # shown: another validation at this step starts its own
        return images[:MAX_MISCLASSIFIED_SHOWN].view(-1, 8, 8).float().cpu()

    def get_dataset(self, phase: Phase) -> Dataset:
        images, labels = _load_digits_split(self.config.split_seed)[phase]
        return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))

    def compute_loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], state: State, output: torch.Tensor
    ) -> torch.Tensor:
        images, labels = batch
        predictions = output.argmax(dim=-1)
        accuracy = (predictions == labels).float().mean()
        self.logger.log_scalar("accuracy", accuracy, namespace=state.phase)
        if state.phase == "valid":
            if self._valid_step != state.num_steps:  # a new validation
                self._valid_step, self._valid_batches = state.num_steps, []
            self._valid_batches.append((images.detach(), predictions.detach(), labels))
            self.logger.log_images("misclassified", self.misclassified_images, namespace="valid")
        return F.cross_entropy(output, labels)
