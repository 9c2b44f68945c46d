"""Defines :class:`WeightAverage`: an exponential moving average of a model's weights (``trainer.ema``).

After optimizer step ``start_step`` and every ``every_n_steps`` steps from there, each floating
weight and buffer becomes ``decay * average + (1 - decay) * current`` (the first update copies
the model); integer buffers (BatchNorm's batch count) are copied. The average is a second copy
of the model, in the model's dtype and on its device, which evaluation can run
(``trainer.ema.use_for_eval``) and ``ml export --ema`` exports. Its state (the weights and the
number of updates) is part of every checkpoint, so a resumed run averages exactly as one that
never stopped.

The update is ``torch.optim.swa_utils.get_ema_multi_avg_fn``'s (a fused lerp over all tensors of
one dtype), and reads nothing back to the host: the step stays asynchronous on a GPU.
"""

import copy
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class WeightAverage:
    """The moving average of ``model``'s weights.

    Args:
        model: The model (unwrapped: not DDP's or compile's wrapper).
        decay: The weight of the average so far in each update, in [0, 1).
        start_step: The first optimizer step whose weights are averaged (copied).
        every_n_steps: Average every N steps from ``start_step``.
    """

    def __init__(
        self, model: nn.Module, *, decay: float, start_step: int = 0, every_n_steps: int = 1
    ) -> None:
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self.decay, self.start_step, self.every_n_steps = decay, start_step, every_n_steps
        self.num_updates = 0
        self._update = get_ema_multi_avg_fn(decay)
        self._pairs = self._pair_up(model)

    def _pair_up(self, model: nn.Module) -> list[tuple[list[torch.Tensor], list[torch.Tensor], bool]]:
        """The average's tensors and the model's, grouped by dtype and device (one fused update each)."""
        groups: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], list[torch.Tensor]]]
        groups = defaultdict(lambda: ([], []))
        mine = [*self.model.parameters(), *self.model.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        for average, current in zip(mine, theirs, strict=True):
            group = groups[(average.dtype, average.device)]
            group[0].append(average.detach())
            group[1].append(current.detach())
        return [
            (averages, currents, averages[0].is_floating_point() or averages[0].is_complex())
            for averages, currents in groups.values()
        ]

    def due(self, step: int) -> bool:
        """Whether the weights after optimizer step ``step`` are averaged."""
        return step >= self.start_step and (step - self.start_step) % self.every_n_steps == 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Averages the model's current weights in, if ``step`` (the steps taken so far) is due."""
        if not self.due(step):
            return
        for averages, currents, floating in self._pairs:
            if self.num_updates == 0 or not floating:
                for average, current in zip(averages, currents, strict=True):
                    average.copy_(current)
            else:
                self._update(averages, currents, None)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["weights"])
        self.num_updates = int(state["num_updates"])
