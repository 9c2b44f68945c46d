"""Defines the ``digits_gan`` example: a conditional GAN that draws the 8x8 digit it is asked for.

The data are the ``digits`` example's training split (1,257 images of scikit-learn's 8x8 digits, no
download). The model (``digits_gan``) is two small MLPs: a generator from noise and a class to 64
pixels in [0, 1], and a discriminator from pixels and a class to a logit, real or drawn. The task
(``digits_gan``) trains them with the non-saturating GAN losses.

How good the digits are is measured, not eyeballed: at each validation the generator draws
``num_eval_samples`` digits, as many of each class, and a classifier trained on the real training
digits (the judge: a small MLP, trained at the first validation of a session from a fixed seed, the
same in every session) reads them. ``valid/accuracy`` is how often it reads the digit that was
asked for (1 / 10 for noise); ``valid/judge_accuracy`` is the judge's own accuracy on the real
validation digits, the ceiling. A grid of drawn digits, one row per class, is logged as
``valid/samples`` (TensorBoard's images tab).
"""

from dataclasses import dataclass
from functools import cache
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ml.core.config import conf_field
from ml.core.registry import register_model, register_task
from ml.core.state import Phase, State
from ml.errors import ConfigError
from ml.examples.digits import _load_digits_split
from ml.models.base import BaseModel, BaseModelConfig
from ml.tasks.gan import GanTask, GanTaskConfig

NUM_CLASSES = 10
GRID_PER_CLASS = 10  # the logged grid: one row of 10 per digit
JUDGE_SEED = 20261205


@dataclass
class DigitsGanConfig(BaseModelConfig):
    noise_dim: int = conf_field(32, help="Size of the generator's noise vector")
    hidden: int = conf_field(256, help="Width of the hidden layers of both parts")


class _Generator(nn.Module):
    """(noise, class) -> 64 pixels in [0, 1]."""

    def __init__(self, noise_dim: int, hidden: int) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.net = nn.Sequential(
            nn.Linear(noise_dim + NUM_CLASSES, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 64),
            nn.Sigmoid(),
        )

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([noise, F.one_hot(labels, NUM_CLASSES).to(noise.dtype)], dim=1))


class _Discriminator(nn.Module):
    """(64 pixels, class) -> a logit: real (high) or drawn (low)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64 + NUM_CLASSES, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, NUM_CLASSES).to(images.dtype)
        return self.net(torch.cat([images.flatten(1), onehot], dim=1)).squeeze(1)


@register_model("digits_gan")
class DigitsGan(BaseModel[DigitsGanConfig]):
    """A class-conditional generator and discriminator of 8x8 digits (the ``gan`` trainer's protocol)."""

    def __init__(self, config: DigitsGanConfig) -> None:
        super().__init__(config)
        if config.noise_dim < 1 or config.hidden < 1:
            raise ValueError(
                f"model.noise_dim and model.hidden must be positive, got {config.noise_dim}, {config.hidden}"
            )
        self.generator = _Generator(config.noise_dim, config.hidden)
        self.discriminator = _Discriminator(config.hidden)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Draws one digit of each class in ``labels``, ``(N, 64)``, from torch's global generator."""
        noise = torch.randn(len(labels), self.config.noise_dim, device=labels.device)
        return self.generator(noise, labels)


@dataclass
class DigitsGanTaskConfig(GanTaskConfig):
    split_seed: int = conf_field(0, help="Seed of the fixed train/valid/test split (the digits example's)")
    num_eval_samples: int = conf_field(1000, help="Digits drawn at each validation (as many of each class)")


@cache
def _judge(split_seed: int) -> tuple[nn.Module, float]:
    """A classifier of the real digits, and its accuracy on the real validation split.

    A 64-128-10 MLP, trained full-batch for 300 Adam steps (~0.5 s on a CPU core) from a fixed
    seed, under its own generators: the same judge in every session and at any step.
    """
    splits = _load_digits_split(split_seed)
    images, labels = (torch.from_numpy(a) for a in splits["train"])
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(JUDGE_SEED)
        judge = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES))
        optim = torch.optim.Adam(judge.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(300):
            optim.zero_grad()
            F.cross_entropy(judge(images), labels).backward()
            optim.step()
    judge.eval()
    valid_images, valid_labels = (torch.from_numpy(a) for a in splits["valid"])
    with torch.no_grad():
        accuracy = (judge(valid_images).argmax(1) == valid_labels).float().mean().item()
    return judge.requires_grad_(False), accuracy


@register_task("digits_gan")
class DigitsGanTask(GanTask[DigitsGanTaskConfig]):
    """Draw the 8x8 digit asked for; judged by a classifier of the real digits."""

    def __init__(self, config: DigitsGanTaskConfig) -> None:
        super().__init__(config)
        if config.num_eval_samples < NUM_CLASSES:
            raise ConfigError(
                f"task.num_eval_samples must be at least {NUM_CLASSES}, got {config.num_eval_samples}"
            )

    def get_dataset(self, phase: Phase) -> Dataset:
        images, labels = _load_digits_split(self.config.split_seed)[phase]
        return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))

    def discriminator_loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], state: State
    ) -> torch.Tensor:
        gan, (images, labels) = cast(DigitsGan, model), batch
        real = gan.discriminator(images, labels)
        drawn_labels = torch.randint(0, NUM_CLASSES, labels.shape, device=labels.device)
        drawn = gan.discriminator(gan(drawn_labels), drawn_labels)  # the generator is frozen: no graph
        self.logger.log_scalar("d_real", torch.sigmoid(real.detach()).mean(), namespace="train")
        self.logger.log_scalar("d_drawn", torch.sigmoid(drawn.detach()).mean(), namespace="train")
        return F.binary_cross_entropy_with_logits(
            real, torch.ones_like(real)
        ) + F.binary_cross_entropy_with_logits(drawn, torch.zeros_like(drawn))

    def generator_loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], state: State
    ) -> torch.Tensor:
        gan = cast(DigitsGan, model)
        labels = torch.randint(0, NUM_CLASSES, batch[1].shape, device=batch[1].device)
        drawn = gan.discriminator(gan(labels), labels)
        return F.binary_cross_entropy_with_logits(drawn, torch.ones_like(drawn))  # non-saturating

    def evaluate(self, model: nn.Module, state: State) -> dict[str, float]:
        judge, judge_accuracy = _judge(self.config.split_seed)
        device = next(model.parameters()).device
        per_class = self.config.num_eval_samples // NUM_CLASSES
        labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(per_class)
        drawn = model(labels)
        read = judge(drawn.float().cpu()).argmax(1)
        accuracy = (read == labels.cpu()).float().mean().item()
        rows = torch.arange(NUM_CLASSES).repeat_interleave(GRID_PER_CLASS) * per_class
        grid = drawn[rows + torch.arange(GRID_PER_CLASS).repeat(NUM_CLASSES) % per_class]
        self.logger.log_images(
            "samples", grid.view(-1, 8, 8).float().cpu(), namespace="valid", columns=GRID_PER_CLASS
        )
        return {"accuracy": accuracy, "judge_accuracy": judge_accuracy}
