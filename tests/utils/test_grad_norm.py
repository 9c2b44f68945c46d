"""ml.utils.grad_norm: torch's gradient norm and clipping, the same numbers, and the fallback without
torch's private ``foreach`` kernels (made missing with ``monkeypatch.delattr``, made to fail, or made to
compute something else): torch's public functions, one tensor at a time, with a warning logged once."""

import itertools
import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from ml.utils import grad_norm
from ml.utils.grad_norm import clip_grad_norm_, total_norm


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The module as in a new process (the kernels not checked yet); its warnings captured."""
    monkeypatch.setattr(grad_norm, "_usable", None)
    caplog.set_level(logging.WARNING, logger=grad_norm.__name__)
    return caplog


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == grad_norm.__name__]


def _mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _backward(model: nn.Module, seed: int = 0) -> list[nn.Parameter]:
    """The model's parameters, with the gradients of a loss on a random batch."""
    gen = torch.Generator().manual_seed(seed)
    first = next(model.parameters())
    x = torch.randn(32, first.shape[1], generator=gen)
    model.zero_grad(set_to_none=True)
    (model(x).square().mean() * 10).backward()
    return list(model.parameters())


@pytest.mark.parametrize("sizes", [(8, 16, 3), (64, 256, 256, 10)])
def test_total_norm_is_torch_s(sizes: tuple[int, ...], fresh: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    grads = [p.grad for p in _backward(_mlp(*sizes)) if p.grad is not None]
    assert torch.equal(total_norm(grads), nn.utils.get_total_norm(grads))
    assert total_norm([]).item() == 0.0
    mixed = [grads[0].double(), *grads[1:]]  # not one dtype: torch's function does it
    assert torch.equal(total_norm(mixed), nn.utils.get_total_norm(mixed))
    assert not _warnings(fresh)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping, and not (the gradients multiplied by 1)
def test_clip_grad_norm_is_torch_s(max_norm: float, fresh: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    models = [_mlp(8, 16, 16, 3), _mlp(8, 16, 16, 3)]
    models[1].load_state_dict(models[0].state_dict())
    params = [_backward(m) for m in models]
    params[0][1].grad = params[1][1].grad = None  # a parameter without a gradient is left out
    norms = [
        clip_grad_norm_(params[0], max_norm),
        nn.utils.clip_grad_norm_(params[1], max_norm, foreach=True),
    ]
    assert torch.equal(norms[0], norms[1])
    assert (norms[0] > max_norm) == (max_norm == 0.5)
    for a, b in zip(*params, strict=True):
        assert (a.grad is None) == (b.grad is None)
        assert a.grad is None or torch.equal(a.grad, b.grad)
    assert clip_grad_norm_([nn.Parameter(torch.ones(2))], 1.0).item() == 0.0  # no gradients: 0
    assert not _warnings(fresh)


def _train_step(clip: Callable[[list[nn.Parameter]], Any]) -> tuple[nn.Module, Any]:
    """One step of a small MLP, its gradients clipped by ``clip``: the model after, and the norm."""
    torch.manual_seed(0)
    model = _mlp(8, 32, 32, 3)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    params = _backward(model)
    norm = clip(params)
    optim.step()
    return model, norm


def _check_fallback(caplog: pytest.LogCaptureFixture, reason: str) -> None:
    """After the kernels went missing or wrong: the public functions' numbers, one warning, no crash."""
    grads = [p.grad for p in _backward(_mlp(8, 32, 32, 3)) if p.grad is not None]
    assert torch.equal(total_norm(grads), nn.utils.get_total_norm(grads, foreach=False))
    assert total_norm(grads).item() == pytest.approx(torch.cat([g.flatten() for g in grads]).norm().item())
    model, norm = _train_step(lambda ps: clip_grad_norm_(ps, 0.5))
    expected, expected_norm = _train_step(lambda ps: nn.utils.clip_grad_norm_(ps, 0.5, foreach=False))
    assert torch.equal(norm, expected_norm) and norm > 0.5  # clipped
    for a, b in zip(model.parameters(), expected.parameters(), strict=True):
        assert torch.equal(a, b)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and reason in warnings[0], warnings


@pytest.mark.parametrize("name", ["_foreach_norm", "_foreach_mul_"])
def test_without_a_foreach_kernel_the_public_functions_step(
    name: str, fresh: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(torch, name)
    _check_fallback(fresh, f"torch.{name}")


@pytest.mark.parametrize("name", ["_foreach_norm", "_foreach_mul_"])
def test_a_foreach_kernel_that_fails_leaves_it_to_the_public_functions(
    name: str, fresh: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A torch whose kernel takes other arguments (its own callers changed to match)."""

    def changed(*args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{name}() missing 1 required positional argument: 'dtype'")

    monkeypatch.setattr(torch, name, changed)
    _check_fallback(fresh, "TypeError")


def test_a_foreach_norm_that_computes_another_norm_is_not_used(
    fresh: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that takes the call but means something else by it (here: the 1-norm) fails the check."""
    monkeypatch.setattr(torch, "_foreach_norm", lambda tensors, *args: [t.abs().sum() for t in tensors])
    _check_fallback(fresh, "unexpected results")


def test_a_kernel_that_fails_after_the_check_changes_no_gradient_twice(
    fresh: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the check on first use, the multiply raises: the public functions finish, once."""
    assert grad_norm._kernels_usable()

    def changed(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("_foreach_mul_() takes 1 positional argument")

    monkeypatch.setattr(torch, "_foreach_mul_", changed)
    model, norm = _train_step(lambda ps: clip_grad_norm_(ps, 0.5))
    assert grad_norm._usable is False
    monkeypatch.undo()
    expected, expected_norm = _train_step(lambda ps: nn.utils.clip_grad_norm_(ps, 0.5, foreach=True))
    assert torch.equal(norm, expected_norm)
    for a, b in zip(model.parameters(), expected.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(_warnings(fresh)) == 1
