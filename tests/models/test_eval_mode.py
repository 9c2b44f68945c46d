"""``eval_mode``: how every trainer evaluates a model without changing the modes its user chose."""

import pytest
from torch import nn

from ml.models.base import eval_mode


def _model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model[1].eval()  # a frozen batch norm
    return model


def _modes(model: nn.Module) -> list[bool]:
    return [module.training for module in model.modules()]


def test_every_module_evaluates_then_returns_to_its_own_mode() -> None:
    model = _model()
    before = _modes(model)
    with eval_mode(model):
        assert not any(_modes(model))
    assert _modes(model) == before == [True, True, False, True, True]


def test_the_modes_come_back_when_the_evaluation_fails() -> None:
    model = _model()
    before = _modes(model)
    with pytest.raises(RuntimeError, match="stopped"), eval_mode(model):
        raise RuntimeError("stopped")
    assert _modes(model) == before
