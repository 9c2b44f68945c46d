"""Tests for :mod:`ml.lr_schedulers.builtin` and :class:`ml.lr_schedulers.base.SchedulerAdapter`."""

import itertools
import math
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from ml.core.registry import build, lookup, registered_names
from ml.core.state import State
from ml.lr_schedulers.base import BaseLRScheduler, SchedulerAdapter
from ml.lr_schedulers.builtin import (
    ConstantConfig,
    ConstantLRScheduler,
    CosineConfig,
    CosineLRScheduler,
    LinearConfig,
    LinearLRScheduler,
)


def _scale(scheduler: BaseLRScheduler, k: int) -> float:
    """The scale of the ``k``-th update (0-based), as the trainer asks for it."""
    return scheduler.get_lr_scale(State(num_steps=k))


def _in_tree(config_cls: type, max_steps: Any = None, **fields: Any) -> DictConfig:
    """The scheduler's config node inside a tree holding ``task.max_steps``, as the CLI merges it."""
    node = OmegaConf.merge(OmegaConf.structured(config_cls), fields)
    tree = OmegaConf.create({"task": {"max_steps": max_steps}, "lr_scheduler": node})
    return tree.lr_scheduler


def test_builtins_are_registered() -> None:
    assert {"constant", "linear", "cosine"} <= set(registered_names("lr_scheduler"))
    assert lookup("lr_scheduler", "cosine") == (CosineLRScheduler, CosineConfig)
    assert isinstance(build("lr_scheduler", OmegaConf.structured(ConstantConfig)), ConstantLRScheduler)


def test_constant_without_warmup_is_one() -> None:
    scheduler = ConstantLRScheduler(ConstantConfig())
    assert [_scale(scheduler, k) for k in (0, 1, 10**6)] == [1.0, 1.0, 1.0]


def test_constant_warmup_starts_at_one_over_warmup_steps() -> None:
    scheduler = ConstantLRScheduler(ConstantConfig(warmup_steps=4))
    assert [_scale(scheduler, k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_linear_values() -> None:
    scheduler = LinearLRScheduler(LinearConfig(warmup_steps=4, total_steps=14, min_scale=0.1))
    assert _scale(scheduler, 0) == pytest.approx(0.25)  # first update: 1 / warmup_steps, not 0
    assert _scale(scheduler, 3) == 1.0  # last warmup update
    # Update t = k + 1 = 9 is halfway through the 10 decay updates.
    assert _scale(scheduler, 8) == pytest.approx(1.0 - 0.9 * 0.5)
    assert _scale(scheduler, 13) == pytest.approx(0.1)  # the last update of a 14-update run
    assert [_scale(scheduler, k) for k in (14, 15, 10**6)] == [0.1, 0.1, 0.1]


def test_linear_decays_monotonically_to_its_floor() -> None:
    scheduler = LinearLRScheduler(LinearConfig(warmup_steps=3, total_steps=20, min_scale=0.3))
    scales = [_scale(scheduler, k) for k in range(2, 40)]
    assert scales[0] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(scales))
    assert min(scales) == pytest.approx(0.3)
    assert all(s >= 0.3 - 1e-12 for s in scales)


def test_linear_without_warmup_starts_just_below_one() -> None:
    scheduler = LinearLRScheduler(LinearConfig(total_steps=10))
    assert _scale(scheduler, 0) == pytest.approx(0.9)
    assert _scale(scheduler, 9) == 0.0


def test_cosine_values() -> None:
    scheduler = CosineLRScheduler(CosineConfig(warmup_steps=10, total_steps=110, min_scale=0.2))
    assert _scale(scheduler, 0) == pytest.approx(0.1)
    assert _scale(scheduler, 9) == 1.0
    assert _scale(scheduler, 59) == pytest.approx((1.0 + 0.2) / 2)  # t = 60: the decay's midpoint
    assert _scale(scheduler, 109) == pytest.approx(0.2)
    assert [_scale(scheduler, k) for k in (110, 200, 10**6)] == [0.2, 0.2, 0.2]
    decay = [_scale(scheduler, k) for k in range(9, 110)]
    assert all(a > b for a, b in itertools.pairwise(decay))


def test_cosine_restarts_go_back_to_one_at_each_cycle_start() -> None:
    # Warmup ends at t = 2; 30 decay updates split into 3 cycles of 10: restarts at t = 12 and 22.
    scheduler = CosineLRScheduler(CosineConfig(warmup_steps=2, total_steps=32, num_cycles=3))
    for start in (2, 12, 22):
        k = start - 1
        assert _scale(scheduler, k) == 1.0
        assert _scale(scheduler, k + 5) == pytest.approx(0.5)  # midpoint of the cycle
        assert _scale(scheduler, k + 9) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))
    assert _scale(scheduler, 31) == 0.0
    assert _scale(scheduler, 32) == 0.0


def test_cosine_single_cycle_does_not_restart() -> None:
    scheduler = CosineLRScheduler(CosineConfig(warmup_steps=2, total_steps=32, num_cycles=1))
    assert _scale(scheduler, 11) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))


def test_schedules_are_pure_functions_of_the_step() -> None:
    scheduler = CosineLRScheduler(CosineConfig(warmup_steps=5, total_steps=50, num_cycles=2, min_scale=0.1))
    steps = list(range(60))
    forward = [_scale(scheduler, k) for k in steps]
    backward = [_scale(scheduler, k) for k in reversed(steps)]
    assert forward == backward[::-1]


def _two_group_optimizer() -> tuple[torch.optim.Optimizer, torch.nn.Parameter, torch.nn.Parameter]:
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(3))
    optim = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])
    return optim, a, b


def test_adapter_scales_each_group_from_its_initial_lr() -> None:
    optim, _, _ = _two_group_optimizer()
    adapter = LinearLRScheduler(LinearConfig(warmup_steps=4, total_steps=8)).get(optim)
    assert isinstance(adapter, SchedulerAdapter)
    for k, scale in ((0, 0.25), (3, 1.0), (5, 0.5), (7, 0.0), (1, 0.5)):
        adapter.step(State(num_steps=k))
        assert [g["lr"] for g in optim.param_groups] == pytest.approx([0.1 * scale, 0.01 * scale])
        assert [g["initial_lr"] for g in optim.param_groups] == [0.1, 0.01]
        assert adapter.lr == pytest.approx(0.1 * scale)
        assert adapter.lr_scale == pytest.approx(scale)


def test_first_update_uses_the_warmed_up_lr() -> None:
    optim, a, b = _two_group_optimizer()
    adapter = ConstantLRScheduler(ConstantConfig(warmup_steps=4)).get(optim)
    adapter.step(State(num_steps=0))  # before the first optimizer.step(), as the trainer does
    (a.sum() + b.sum()).backward()
    optim.step()
    assert a.detach().tolist() == pytest.approx([-0.025, -0.025])
    assert b.detach().tolist() == pytest.approx([-0.0025] * 3)


def test_adapter_state_dict_holds_no_optimizer_state() -> None:
    optim, _, _ = _two_group_optimizer()
    adapter = CosineLRScheduler(CosineConfig(warmup_steps=2, total_steps=10)).get(optim)
    adapter.step(State(num_steps=0))
    state = adapter.state_dict()
    assert state == {"lr_scale": 0.5}
    assert "state" not in state and "param_groups" not in state

    other = CosineLRScheduler(CosineConfig(warmup_steps=2, total_steps=10)).get(_two_group_optimizer()[0])
    other.load_state_dict(state)
    assert other.lr_scale == 0.5


def test_resumed_optimizer_keeps_the_schedules_base_lr() -> None:
    config = LinearConfig(warmup_steps=2, total_steps=10)
    optim, _, _ = _two_group_optimizer()
    LinearLRScheduler(config).get(optim).step(State(num_steps=5))
    saved = optim.state_dict()

    resumed, _, _ = _two_group_optimizer()
    resumed.load_state_dict(saved)
    adapter = LinearLRScheduler(config).get(resumed)
    adapter.step(State(num_steps=6))
    # t = 7: (7 - 2) / 8 of the way down.
    assert [g["lr"] for g in resumed.param_groups] == pytest.approx([0.1 * 0.375, 0.01 * 0.375])


@pytest.mark.parametrize("config_cls", [LinearConfig, CosineConfig])
def test_total_steps_defaults_to_task_max_steps(config_cls: type) -> None:
    node = _in_tree(config_cls, max_steps=100, warmup_steps=10)
    assert node.total_steps == 100
    scheduler = build("lr_scheduler", node)
    assert scheduler.total_steps == 100
    assert _scale(scheduler, 98) > 0.0
    assert _scale(scheduler, 99) == 0.0


def test_explicit_total_steps_wins_over_task_max_steps() -> None:
    scheduler = build("lr_scheduler", _in_tree(CosineConfig, max_steps=100, total_steps=40))
    assert scheduler.total_steps == 40


@pytest.mark.parametrize(
    "config",
    [
        CosineConfig(),  # a dataclass: the interpolation has no task to point at
        OmegaConf.structured(CosineConfig),  # a standalone node
        _in_tree(CosineConfig, max_steps=None),  # the task has no max_steps
        _in_tree(CosineConfig, max_steps="???"),
    ],
    ids=["dataclass", "standalone", "null", "missing"],
)
def test_missing_total_steps_raises(config: Any) -> None:
    with pytest.raises(ValueError, match=r"set lr_scheduler\.total_steps or task\.max_steps") as info:
        CosineLRScheduler(config)
    assert "\n" not in str(info.value)


def test_missing_total_steps_raises_for_linear() -> None:
    with pytest.raises(ValueError, match=r"lr_scheduler\.total_steps or task\.max_steps"):
        LinearLRScheduler(LinearConfig())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ConstantLRScheduler(ConstantConfig(warmup_steps=-1)), r"warmup_steps must be non-negative"),
        (lambda: LinearLRScheduler(LinearConfig(warmup_steps=-1, total_steps=5)), r"non-negative"),
        (lambda: LinearLRScheduler(LinearConfig(total_steps=5, min_scale=1.5)), r"min_scale must be between"),
        (
            lambda: CosineLRScheduler(CosineConfig(total_steps=5, min_scale=-0.1)),
            r"min_scale must be between",
        ),
        (lambda: CosineLRScheduler(CosineConfig(total_steps=0)), r"total_steps must be positive"),
        (
            lambda: CosineLRScheduler(CosineConfig(total_steps=5, num_cycles=0)),
            r"num_cycles must be positive",
        ),
        (lambda: CosineLRScheduler(CosineConfig(total_steps=5, num_cycles=6)), r"num_cycles must be at most"),
    ],
)
def test_validation_errors_name_the_field(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(("warmup", "total"), [(5, 5), (100, 60)])
def test_a_warmup_as_long_as_the_run_is_clamped_to_half_of_it_with_a_warning(
    warmup: int, total: int, caplog: pytest.LogCaptureFixture
) -> None:
    """``ml train digits task.max_steps=60`` under digits' 100 warm-up steps trains, warned."""
    scheduler = CosineLRScheduler(CosineConfig(warmup_steps=warmup, total_steps=total))
    assert scheduler.warmup_steps == total // 2
    assert f"lr_scheduler.warmup_steps ({warmup}) is not shorter than the schedule" in caplog.text
    scales = [_scale(scheduler, k) for k in range(total)]
    assert max(scales) == 1.0 and scales[-1] < 1.0  # warms up to the peak, then decays
    assert all(0.0 < s <= 1.0 for s in scales[:-1])


def test_boundary_values_are_accepted() -> None:
    scheduler = CosineLRScheduler(CosineConfig(warmup_steps=0, total_steps=1, min_scale=1.0))
    assert _scale(scheduler, 0) == 1.0
    scheduler = CosineLRScheduler(CosineConfig(total_steps=4, num_cycles=4, min_scale=0.0))
    assert [_scale(scheduler, k) for k in range(4)] == [1.0, 1.0, 1.0, 0.0]


def test_a_schedule_lasts_as_long_as_the_task_also_for_rl_limited_by_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cartpole's config no longer hard-codes 391: 100,000 environment steps of 8 x 32 per iteration."""
    from omegaconf import OmegaConf

    from ml.core.compose import compose_config, config_to_save
    from ml.core.config import task_steps

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert task_steps(150, 100_000, 8, 32) == 150  # max_steps wins
    assert task_steps(None, 100_000, 8, 32) == 391
    assert task_steps(None, None, 8, 32) is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # each iteration of 2 processes takes twice the samples
    assert task_steps(None, 100_000, 8, 32) == 196
    monkeypatch.delenv("WORLD_SIZE")

    root = compose_config(["cartpole"], ["trainer.exp_dir=/nonexistent/run_0"])
    assert root.lr_scheduler.total_steps == 391
    saved = config_to_save(root)  # the length stays derived from the task in config.yaml
    assert str(OmegaConf.to_container(saved, resolve=False)["lr_scheduler"]["total_steps"]).startswith(
        "${ml.task_steps:"
    )
    saved.task.max_samples = 200_000  # a run continued with more samples: a schedule that long
    assert saved.lr_scheduler.total_steps == 782
