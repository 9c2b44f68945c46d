"""ml.optimizers.fast: the fused Adam on the CPU, called directly, and what gets fused."""

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ml.lr_schedulers.builtin import ConstantConfig, ConstantLRScheduler
from ml.optimizers.builtin import AdamConfig, AdamOptimizer, weight_decay_param_groups
from ml.optimizers.fast import FusedAdamStep, use_fast_optimizer
from ml.tasks.sl import SupervisedLearningTaskConfig
from ml.trainers.sl import SupervisedLearningTrainer, SupervisedLearningTrainerConfig
from tests.tiny import TinyModel, TinyModelConfig, TinyTask


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW])
def test_the_fused_adam_step_is_torch_s_step(optimizer: type[torch.optim.Adam]) -> None:
    """Bit for bit the same parameters and optimizer state as ``optim.step()``, learning rate changing."""
    torch.manual_seed(0)
    models = [_mlp()]
    models.append(copy.deepcopy(models[0]))
    optims = [optimizer(weight_decay_param_groups(m, 0.01), lr=1e-3, eps=1e-5) for m in models]
    for optim in optims:
        use_fast_optimizer(optim)
    x = torch.randn(64, 4)
    for _ in range(3):  # updates: a new step object each, as the trainer makes
        fused = FusedAdamStep(optims[1])
        steps: list[Callable[[], Any]] = [optims[0].step, fused]
        for _ in range(4):
            for model, step in zip(models, steps, strict=True):
                model.zero_grad(set_to_none=True)
                model(x).square().sum().backward()
                step()
        for optim in optims:
            for group in optim.param_groups:
                group["lr"] *= 0.5
    assert fused._groups is not None  # the direct path ran
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    state = [optim.state_dict()["state"] for optim in optims]
    for key, entry in state[0].items():
        for name, value in entry.items():
            assert torch.equal(value, state[1][key][name]), (key, name)


def test_only_plain_float_parameters_on_a_fused_device_get_the_fused_kernel() -> None:
    model = _mlp()
    half = nn.Linear(4, 4).to(torch.float16)
    adam = torch.optim.Adam([{"params": list(model.parameters())}, {"params": list(half.parameters())}])
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    use_fast_optimizer(adam)
    use_fast_optimizer(sgd)
    assert (adam.param_groups[0]["fused"], adam.param_groups[0]["foreach"]) == (True, False)
    assert not adam.param_groups[1]["fused"] and adam.param_groups[1]["foreach"]  # float16: no fused CPU Adam
    assert sgd.param_groups[0]["foreach"] and not sgd.param_groups[0].get("fused")


def test_a_step_without_every_gradient_goes_through_torch() -> None:
    """A parameter without a gradient (unused this step) makes the direct path hand over to torch."""
    torch.manual_seed(0)
    first = _mlp()
    models = [first, copy.deepcopy(first)]
    optims = [torch.optim.Adam(m.parameters(), lr=1e-2, fused=True) for m in models]
    x = torch.randn(8, 4)
    for i in range(4):
        for model, optim, direct in zip(models, optims, (False, True), strict=True):
            optim.zero_grad(set_to_none=True)
            out = model[0](x) if i == 2 else model(x)  # step 3: the last layers get no gradient
            out.square().sum().backward()
            FusedAdamStep(optim)() if direct else optim.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)


def _train(exp_dir: Path, fast: bool) -> list[torch.Tensor]:
    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {"name": "sl", "exp_dir": str(exp_dir), "fast_optimizer": fast, "valid_at_end": False},
    )
    trainer = SupervisedLearningTrainer(config)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = TinyModel(TinyModelConfig(name="tiny"))
    task = TinyTask(SupervisedLearningTaskConfig(name="tiny", max_steps=3))
    trainer.train(
        model,
        task,
        AdamOptimizer(AdamConfig(name="adam", lr=1e-2)),
        ConstantLRScheduler(ConstantConfig(name="constant")),
    )
    ckpt = torch.load(exp_dir / "checkpoints" / "ckpt.pt", weights_only=True, map_location="cpu")
    groups = ckpt["optim"]["param_groups"]
    assert all(bool(g.get("fused")) == fast for g in groups), groups
    return [p.detach().flatten() for p in model.parameters()]


def test_the_sl_trainer_steps_the_fused_adam_and_matches_the_multi_tensor_one(tmp_path: Path) -> None:
    fused = _train(tmp_path / "fused", fast=True)
    plain = _train(tmp_path / "plain", fast=False)
    # The same update in another order: float32 rounding apart (~2e-9 after 3 steps here). Adam
    # magnifies such differences where gradients are near 0, so later steps drift apart further.
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
