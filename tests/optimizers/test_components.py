"""Tests for the library optimizers (``lion``, ``adan``, ...) and torch optimizers by import path.

Each is built from a config section as ``ml train`` builds it (``typed_section`` +
``build_component``), steps a real model, and its state dict round-trips: an optimizer loaded from
another's state continues exactly as the original does.
"""

import io
import sys
from typing import Any

import pytest
import pytorch_optimizer
import torch
from omegaconf import OmegaConf
from torch import nn

from ml.core.compose import build_component, typed_section
from ml.errors import ConfigError


def _optimizer(section: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    node = typed_section("optimizer", "optimizer", OmegaConf.create(section))
    optim: torch.optim.Optimizer = build_component("optimizer", "optimizer", node).get(model)
    return optim


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def _saved_and_loaded(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict as a checkpoint returns it: written, then read with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def _train(model: nn.Module, optim: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step))
        optim.zero_grad()
        model(x).pow(2).mean().backward()
        optim.step()


@pytest.mark.parametrize(
    ("section", "library_class", "betas"),
    [
        ({"name": "lion", "lr": 3e-4, "weight_decay": 0.1}, pytorch_optimizer.Lion, (0.9, 0.99)),
        ({"name": "adan", "beta3": 0.95}, pytorch_optimizer.Adan, (0.98, 0.92, 0.95)),
        ({"name": "shampoo", "momentum": 0.5}, pytorch_optimizer.Shampoo, None),
        ({"name": "lamb", "weight_decay": 0.01}, pytorch_optimizer.Lamb, (0.9, 0.999)),
        ({"name": "prodigy"}, pytorch_optimizer.Prodigy, (0.9, 0.999)),
    ],
)
def test_library_optimizers_step_and_resume_exactly(
    section: dict[str, Any], library_class: type, betas: tuple[float, ...] | None
) -> None:
    model = _model()
    optim = _optimizer(section, model)
    assert type(optim) is library_class
    if section.get("weight_decay", 0.0) > 0:
        decayed, undecayed = optim.param_groups  # biases and the norm are not decayed
        assert decayed["weight_decay"] == section["weight_decay"] and undecayed["weight_decay"] == 0.0
        assert len(undecayed["params"]) == 4 and len(decayed["params"]) == 2  # biases, norm; two weights
    else:  # without decay, one group
        (decayed,) = optim.param_groups
        assert decayed["weight_decay"] == 0.0 and len(decayed["params"]) == 6
    assert decayed["lr"] == section.get("lr", decayed["lr"])
    if betas is not None:
        assert tuple(decayed["betas"]) == betas
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, optim, range(3))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    # Resume: a fresh model and optimizer loaded from the state at step 3 continue as the original.
    copy = _model()
    copy.load_state_dict(model.state_dict())
    resumed = _optimizer(section, copy)
    resumed.load_state_dict(_saved_and_loaded(optim.state_dict()))
    _train(model, optim, range(3, 6))
    _train(copy, resumed, range(3, 6))
    for a, b in zip(model.parameters(), copy.parameters(), strict=True):
        assert torch.equal(a, b)


def test_library_optimizer_bad_values_are_config_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"optimizer \(lion\): optimizer.beta2 must be in \[0, 1\), got 1.5"
    ):
        _optimizer({"name": "lion", "beta2": 1.5}, _model())
    with pytest.raises(
        ConfigError,
        match=r"optimizer.lrr: Key 'lrr' not in 'LionConfig'. Did you mean: 'lr'\? \(lion takes: name, lr, ",
    ):
        typed_section("optimizer", "optimizer", OmegaConf.create({"name": "lion", "lrr": 1}))


def test_a_torch_optimizer_by_import_path_gets_its_keyword_arguments() -> None:
    node = typed_section(
        "optimizer", "optimizer", OmegaConf.create({"name": "torch.optim:SGD", "lr": 0.1, "momentum": 0.9})
    )
    # Every keyword argument of torch.optim.SGD, with its default; `params` is the trainer's.
    assert node.nesterov is False and node.dampening == 0.0 and node.foreach is None and "params" not in node
    model = _model()
    optim = build_component("optimizer", "optimizer", node).get(model)
    assert type(optim) is torch.optim.SGD
    (group,) = optim.param_groups  # the class as written: one group of every trainable parameter
    assert group["lr"] == 0.1 and group["momentum"] == 0.9 and len(group["params"]) == 6

    # The same arithmetic as torch.optim.SGD made by hand, and its state dict round trip.
    reference_model = _model()
    reference = torch.optim.SGD(reference_model.parameters(), lr=0.1, momentum=0.9)
    _train(model, optim, range(3))
    _train(reference_model, reference, range(3))
    resumed = build_component("optimizer", "optimizer", node).get(reference_model)
    resumed.load_state_dict(_saved_and_loaded(optim.state_dict()))
    _train(model, optim, range(3, 5))
    _train(reference_model, resumed, range(3, 5))
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_tuple_argument_and_another_librarys_class_by_import_path() -> None:
    optim = _optimizer({"name": "torch.optim:Adam", "betas": [0.5, 0.6], "amsgrad": True}, _model())
    assert optim.param_groups[0]["betas"] == (0.5, 0.6) and optim.param_groups[0]["amsgrad"] is True
    optim = _optimizer({"name": "pytorch_optimizer:AdaBelief", "lr": 0.01}, _model())
    assert type(optim) is pytorch_optimizer.AdaBelief and optim.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"name": "torch.optim:SGD", "momentm": 0.9},
            "optimizer.momentm: Key 'momentm' not in 'SGDConfig'. Did you mean: 'momentum'? "
            "(torch.optim:SGD takes: name, lr, momentum, dampening, weight_decay, nesterov, maximize, "
            "foreach, differentiable, fused)",
        ),
        ({"name": "torch.optim:SGD", "lr": "fast"}, "optimizer.lr: Value 'fast' of type 'str' could not be"),
        ({"name": "torch.nn:Linear"}, "optimizer.name: cannot tell the config dataclass of torch.nn"),
    ],
)
def test_bad_sections_of_an_imported_optimizer_are_one_line(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        typed_section("optimizer", "optimizer", OmegaConf.create(section))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_an_imported_optimizers_bad_value_is_refused_when_built() -> None:
    node = typed_section("optimizer", "optimizer", OmegaConf.create({"name": "torch.optim:SGD", "lr": -1.0}))
    with pytest.raises(ConfigError, match=r"optimizer \(torch.optim:SGD\): Invalid learning rate: -1.0"):
        _optimizer({"name": "torch.optim:SGD", "lr": -1.0}, _model())
    assert node.lr == -1.0


def test_a_library_optimizer_without_the_library_is_refused_with_the_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # what an uninstalled module imports as
    with pytest.raises(ConfigError, match=r"optimizer lion needs the pytorch_optimizer library: pip install"):
        _optimizer({"name": "lion"}, _model())
