"""Models with a head the loss never uses (``tests.e2e.unused_head:DigitsWithUnusedHead``,
``...:ActorCriticWithUnusedHead``): DDP waits for a gradient of every trainable parameter unless
``trainer.ddp.find_unused_parameters`` is set. The head is made after the model's own layers, so
those start as the plain model's do (same seed, same draws)."""

from torch import nn

from ml.examples.classic_control import ActorCriticMLP, ActorCriticMLPConfig
from ml.examples.digits import DigitsMLP, DigitsMLPConfig


class DigitsWithUnusedHead(DigitsMLP):
    def __init__(self, config: DigitsMLPConfig) -> None:
        super().__init__(config)
        self.unused_head = nn.Linear(8, 2)


class ActorCriticWithUnusedHead(ActorCriticMLP):
    def __init__(self, config: ActorCriticMLPConfig) -> None:
        super().__init__(config)
        self.unused_head = nn.Linear(8, 2)
