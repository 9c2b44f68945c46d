"""Tests for the original framework's schedules (``cosine_decay``, ``linear_no_decay``) and torch
schedules by import path (``torch.optim.lr_scheduler:StepLR``), driven as the trainer drives them."""

import io
import math
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ml.core.compose import build_component, typed_section
from ml.core.state import State
from ml.errors import CheckpointError, ConfigError
from ml.lr_schedulers.base import SchedulerAdapter


def _schedule(section: dict[str, Any], max_steps: int | None = None) -> Any:
    """The schedule of ``section`` in a tree with ``task.max_steps``, built as ``ml train`` builds it."""
    node = typed_section("lr_scheduler", "lr_scheduler", OmegaConf.create(section))
    tree = OmegaConf.create({"task": {"max_steps": max_steps}, "lr_scheduler": node})
    return build_component("lr_scheduler", "lr_scheduler", tree.lr_scheduler)


def _scales(section: dict[str, Any], updates: int, max_steps: int | None = None) -> list[float]:
    schedule = _schedule(section, max_steps)
    return [schedule.get_lr_scale(State(num_steps=k)) for k in range(updates)]


def test_linear_no_decay_warms_up_from_the_first_update_then_stays() -> None:
    scales = _scales({"name": "linear_no_decay"}, 1200)
    assert scales[0] == 1 / 1000  # the original's default; its first update had a scale of 0
    assert scales[498] == pytest.approx(0.499) and scales[999] == 1.0 and set(scales[999:]) == {1.0}
    assert _scales({"name": "linear_no_decay", "warmup_steps": 4}, 6) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decay_cycles_under_a_linear_decay_and_holds_after_total_steps() -> None:
    # 40 updates, 2 cycles of 20, each 4 updates of ramp then 16 of cosine.
    section = {"name": "cosine_decay", "num_resets": 1, "ramp_up_steps": 4, "eta_min": 0.1, "min_decay": 0.01}
    scales = _scales(section, 50, max_steps=40)

    def decay(update: int) -> float:
        return 0.01 + 0.99 * (40 - update) / 40

    assert scales[0] == pytest.approx((0.1 + 0.9 / 4) * decay(1))  # the first update is not 0
    assert scales[3] == pytest.approx(1.0 * decay(4))  # the ramp ends at eta_max
    assert scales[11] == pytest.approx((0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 16))) * decay(12))
    assert scales[19] == pytest.approx(0.1 * decay(20))  # a cycle ends at eta_min
    assert scales[20] == pytest.approx((0.1 + 0.9 / 4) * decay(21))  # the restart ramps up again...
    assert scales[23] < scales[3]  # ...to a lower peak
    assert scales[39] == pytest.approx(0.1 * 0.01)  # the last update: eta_min * min_decay
    assert scales[39:] == [scales[39]] * 11  # then it stays (the original's went negative)
    assert all(s > 0 for s in scales)


def test_cosine_decay_defaults_are_the_originals_and_its_length_is_the_tasks() -> None:
    schedule = _schedule({"name": "cosine_decay"}, max_steps=1000)
    assert (schedule.total_steps, schedule.phase, schedule.ramp_up_steps) == (1000, 1000, 50)
    assert (schedule.eta_min, schedule.eta_max, schedule.min_decay) == (0.01, 1.0, 1e-4)
    # Three cycles of 1000 / 3 updates, rounded up so that no restart begins in the last updates.
    schedule = _schedule({"name": "cosine_decay", "num_resets": 2}, max_steps=1000)
    assert (schedule.phase, schedule.ramp_up_steps) == (334, 16)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "needs a length: set lr_scheduler.total_steps or task.max_steps"),
        (
            {"total_steps": 10, "ramp_up_steps": 10},
            r"ramp_up_steps must be in \[0, phase\) = \[0, 10\), got 10",
        ),
        ({"total_steps": 10, "ramp_up_percent": 1.0}, r"ramp_up_percent must be in \[0, 1\), got 1.0"),
        ({"total_steps": 10, "eta_min": 2.0}, "0 <= eta_min <= eta_max, got 2.0 and 1.0"),
        ({"total_steps": 10, "min_decay": -1.0}, "min_decay must be between 0 and 1"),
        ({"total_steps": 10, "num_resets": -1}, "num_resets must be non-negative"),
    ],
)
def test_cosine_decay_refuses_bad_fields(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _schedule({"name": "cosine_decay", **fields})


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.8, momentum=0.5)


def _train(
    model: nn.Module, optim: torch.optim.Optimizer, adapter: SchedulerAdapter, updates: range
) -> list[float]:
    """The trainer's order: the schedule for update k, then the update; returns the rates used."""
    rates = []
    for k in updates:
        adapter.step(State(num_steps=k))
        rates.append(adapter.lr)
        optim.zero_grad()
        model(torch.randn(4, 3, generator=torch.Generator().manual_seed(k))).pow(2).sum().backward()
        optim.step()
    return rates


STEP_LR = {"name": "torch.optim.lr_scheduler:StepLR", "step_size": 3, "gamma": 0.5}


def test_a_torch_schedule_by_import_path_follows_torchs_own_loop() -> None:
    model, optim = _model_and_optimizer()
    rates = _train(model, optim, _schedule(STEP_LR).get(optim), range(8))

    reference_model, reference_optim = _model_and_optimizer()
    reference = torch.optim.lr_scheduler.StepLR(reference_optim, step_size=3, gamma=0.5)
    expected = []
    for k in range(8):  # torch's documented loop: optimizer.step(), then scheduler.step()
        expected.append(reference_optim.param_groups[0]["lr"])
        reference_optim.zero_grad()
        reference_model(torch.randn(4, 3, generator=torch.Generator().manual_seed(k))).pow(2).sum().backward()
        reference_optim.step()
        reference.step()
    assert rates == expected == [0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.2, 0.2]
    assert torch.equal(model.weight, reference_model.weight)


def test_a_torch_schedule_resumes_exactly_from_a_checkpointed_state() -> None:
    model, optim = _model_and_optimizer()
    adapter = _schedule(STEP_LR).get(optim)
    _train(model, optim, adapter, range(4))
    buffer = io.BytesIO()  # what a checkpoint holds, read back with weights_only=True
    torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "lr": adapter.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    continued = _train(model, optim, adapter, range(4, 10))

    resumed_model, resumed_optim = _model_and_optimizer()
    resumed_adapter = _schedule(STEP_LR).get(resumed_optim)
    resumed_model.load_state_dict(saved["model"])
    resumed_optim.load_state_dict(saved["optim"])
    resumed_adapter.load_state_dict(saved["lr"])
    assert _train(resumed_model, resumed_optim, resumed_adapter, range(4, 10)) == continued
    assert torch.equal(model.weight, resumed_model.weight)


def test_a_torch_schedule_whose_settings_changed_since_the_checkpoint_is_refused() -> None:
    """Torch took the saved step_size and gamma back silently: the run went on halving every 3 steps
    while its config.yaml said every 100."""
    model, optim = _model_and_optimizer()
    adapter = _schedule(STEP_LR).get(optim)
    _train(model, optim, adapter, range(4))
    changed = _schedule({**STEP_LR, "step_size": 100}).get(optim)
    with pytest.raises(
        CheckpointError, match=r"lr_scheduler\.step_size: the checkpoint's StepLR has 3, the config 100"
    ):
        changed.load_state_dict(adapter.state_dict())
    _schedule(dict(STEP_LR)).get(optim).load_state_dict(adapter.state_dict())  # the same settings load


def test_a_torch_schedule_s_settings_kept_under_other_names_are_compared_too() -> None:
    """OneCycleLR keeps max_lr in the optimizer's groups and pct_start in its phases: a changed value
    was taken back silently (the review's 0.1 where the config said 1.0)."""
    one_cycle = {"name": "torch.optim.lr_scheduler:OneCycleLR", "max_lr": 0.1, "total_steps": 20}
    model, optim = _model_and_optimizer()
    adapter = _schedule(one_cycle).get(optim)
    _train(model, optim, adapter, range(4))
    saved = io.BytesIO()
    torch.save(adapter.state_dict(), saved)  # as a checkpoint holds it: weights_only loading
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    changed = _schedule({**one_cycle, "max_lr": 1.0}).get(optim)
    with pytest.raises(CheckpointError, match=r"lr_scheduler\.max_lr: the checkpoint's OneCycleLR has 0\.1"):
        changed.load_state_dict(state)
    _schedule(dict(one_cycle)).get(optim).load_state_dict(state)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"name": "torch.optim.lr_scheduler:StepLR", "step_size": 2, "gama": 0.1},
            "lr_scheduler.gama: Key 'gama' not in 'StepLRConfig'",
        ),
        ({"name": "torch.optim.lr_scheduler:ReduceLROnPlateau"}, "steps on a validation metric"),
        (
            {"name": "torch.optim.lr_scheduler:LinearLR", "start_factor": 2.0},
            "Starting multiplicative factor",
        ),
    ],
)
def test_bad_sections_of_a_torch_schedule_are_refused_with_the_config(
    section: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _schedule(section)


def test_a_torch_schedule_saved_over_two_groups_without_decay_resumes_over_one() -> None:
    # Checkpoints from before a run without weight decay had one parameter group: the schedule's
    # per-group lists (base_lrs, _last_lr, ...) had two equal values.
    from ml.optimizers.builtin import AdamConfig, AdamOptimizer, weight_decay_param_groups

    section = {"name": "torch.optim.lr_scheduler:CosineAnnealingWarmRestarts", "T_0": 3}
    torch.manual_seed(0)
    old_model, new_model = (
        nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)),
        nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)),
    )
    new_model.load_state_dict(old_model.state_dict())
    groups = [{**g, "weight_decay": 0.0} for g in weight_decay_param_groups(old_model, 1.0)]
    old_optim = torch.optim.Adam(groups, lr=0.1)
    old = _schedule(section).get(old_optim)
    for k in range(1, 5):
        old.step(State(num_steps=k))
    saved = old.state_dict()
    assert len(saved["torch_scheduler"]["base_lrs"]) == 2

    new_optim = AdamOptimizer(AdamConfig(lr=0.1)).get(new_model)
    new_optim.load_state_dict(old_optim.state_dict())
    new = _schedule(section).get(new_optim)
    new.load_state_dict(saved)
    for k in range(5, 12):
        old.step(State(num_steps=k))
        new.step(State(num_steps=k))
        assert (
            new_optim.param_groups[0]["lr"]
            == old_optim.param_groups[0]["lr"]
            == old_optim.param_groups[1]["lr"]
        )
    assert new.state_dict()["torch_scheduler"]["base_lrs"] == [0.1]
