"""ml.optimizers.fast: the fused Adam on the CPU, called directly, and what gets fused.

Then the fallbacks: with each private torch name the module uses made missing (``monkeypatch.delattr``)
or made to fail or misbehave, the optimizer still steps, through torch's public ``step``, with the
numbers torch's own Adam gives, and says so once in the log.
"""

import copy
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ml.lr_schedulers.builtin import ConstantConfig, ConstantLRScheduler
from ml.optimizers import fast
from ml.optimizers.builtin import AdamConfig, AdamOptimizer, weight_decay_param_groups
from ml.optimizers.fast import FusedAdamStep, step_skipping, use_fast_optimizer
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


def _train(exp_dir: Path, fast: bool, fused: bool | None = None) -> dict[str, torch.Tensor]:
    """Three steps of the sl trainer; ``fused``: whether its Adam ends up fused (default: ``fast``)."""
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
    assert all(bool(g.get("fused")) == (fast if fused is None else fused) for g in groups), groups
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# On the CPU only (ML_DEVICE=cpu): there the trainer's fast path is this module's direct call of
# the fused kernel (FusedAdamStep), and both runs compute the same forward and backward passes bit
# for bit, so the weights differ by the optimizer's float32 rounding alone. On a GPU the fused step
# is torch's own, and the comparison with torch's AdamW(fused=True) lives in tests/test_cuda.py.
@pytest.mark.cpu
def test_the_sl_trainer_steps_the_fused_adam_and_matches_the_multi_tensor_one(tmp_path: Path) -> None:
    fused = _train(tmp_path / "fused", fast=True)
    plain = _train(tmp_path / "plain", fast=False)
    # The same update in another order: float32 rounding apart (~2e-9 after 3 steps here). Adam
    # magnifies such differences where gradients are near 0, so later steps drift apart further. The
    # first layer's bias is left out: BatchNorm follows it, so its gradient is 0 but for rounding,
    # which Adam scales up to whole steps of any sign (it differed by 2.6e-3 on one machine).
    assert fused.keys() == plain.keys()
    for name in sorted(fused.keys() - {"net.0.bias"}):
        difference = (fused[name] - plain[name]).abs().max().item()
        assert difference <= 1e-7, (name, difference)


# -- fallbacks: the private names made missing, failing or wrong


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The module as in a new process (its checks not made, no warning given); its warnings captured."""
    monkeypatch.setattr(fast, "_direct_ok", None)
    monkeypatch.setattr(fast, "_warned", set())
    caplog.set_level(logging.WARNING, logger=fast.__name__)
    return caplog


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == fast.__name__]


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two parameter groups (decayed or not), as the trainers' optimizers have them."""
    return weight_decay_param_groups(model, 0.01)


def _steps(
    optimizer: type[torch.optim.Adam], fast_step: bool, updates: int = 3, fused: bool | None = None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``updates`` x 2 steps of ``_mlp()`` from seed 0: through :class:`FusedAdamStep` (made anew
    for each update, after :func:`use_fast_optimizer`) or through ``optim.step()`` with ``fused``."""
    torch.manual_seed(0)
    model = _mlp()
    optim = optimizer(_groups(model), lr=1e-2, eps=1e-5, fused=fused)
    if fast_step:
        use_fast_optimizer(optim)
    x = torch.randn(64, 4)
    for _ in range(updates):
        step: Callable[[], Any] = FusedAdamStep(optim) if fast_step else optim.step
        for _ in range(2):
            optim.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
            step()
    return model, optim


def _assert_same(a: nn.Module, b: nn.Module, exact: bool) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        if exact:
            assert torch.equal(p, q)
        else:  # the same update in another order: float32 rounding apart
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["_fused_adam_", "_fused_adamw_", "_foreach_add_", "_foreach_sub_"])
@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW])
def test_without_a_kernel_adam_steps_through_torch_unfused(
    name: str,
    optimizer: type[torch.optim.Adam],
    fresh: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A torch without one of the kernels: no fused groups, torch's own step, torch's own numbers."""
    monkeypatch.delattr(torch, name)
    model, optim = _steps(optimizer, fast_step=True)
    assert not any(g["fused"] for g in optim.param_groups)
    # Without torch._foreach_add_, torch's foreach step would fail too: its per-tensor loop steps.
    assert all(bool(g["foreach"]) == (name != "_foreach_add_") for g in optim.param_groups)
    reference, _ = _steps(optimizer, fast_step=False)  # torch's default on the CPU: the per-tensor loop
    _assert_same(model, reference, exact=False)
    warnings = _warnings(fresh)
    assert len(warnings) == 1 and f"torch.{name}" in warnings[0], warnings  # once, for all three updates


@pytest.mark.parametrize("name", ["_fused_adam_", "_foreach_add_"])
def test_a_fused_group_from_a_checkpoint_steps_unfused_without_the_kernel(
    name: str, fresh: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Groups already ``fused`` (a resumed run keeps its checkpoint's choice), in a torch without a kernel."""
    monkeypatch.delattr(torch, name)
    torch.manual_seed(0)
    model = _mlp()
    optim = torch.optim.Adam(_groups(model), lr=1e-2)
    optim.load_state_dict(
        {"state": {}, "param_groups": [{**g, "fused": True} for g in optim.state_dict()["param_groups"]]}
    )
    x = torch.randn(64, 4)
    for _ in range(3):
        optim.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        FusedAdamStep(optim)()
    assert not any(g["fused"] for g in optim.param_groups)
    torch.manual_seed(0)  # the reference: torch's default Adam on the CPU, the per-tensor loop
    ref = _mlp()
    ref_optim = torch.optim.Adam(_groups(ref), lr=1e-2)
    for _ in range(3):
        ref_optim.zero_grad(set_to_none=True)
        ref(x).square().sum().backward()
        ref_optim.step()
    _assert_same(model, ref, exact=False)
    assert len(_warnings(fresh)) == 1


def _failing_for_ml(kernel: Callable[..., Any], fail: Callable[[int], bool]) -> Callable[..., Any]:
    """``kernel``, except that its ``n``-th call from ``ml.optimizers.fast`` raises where ``fail(n)``:
    a torch whose kernel changed its arguments, with torch's own caller changed to match."""
    calls = [0]

    def call(*args: Any, **kwargs: Any) -> Any:
        if sys._getframe(1).f_globals.get("__name__") == fast.__name__:
            calls[0] += 1
            if fail(calls[0]):
                raise TypeError("_fused_adam_() got an unexpected keyword argument 'lr'")
        return kernel(*args, **kwargs)

    return call


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW])
def test_a_kernel_that_no_longer_takes_the_direct_call_leaves_the_step_to_torch(
    optimizer: type[torch.optim.Adam], fresh: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check on first use sees the call fail: torch's fused step from then on, bit for bit."""
    for name in ("_fused_adam_", "_fused_adamw_"):
        monkeypatch.setattr(torch, name, _failing_for_ml(getattr(torch, name), lambda n: True))
    model, optim = _steps(optimizer, fast_step=True)
    assert all(g["fused"] for g in optim.param_groups)  # torch's own fused step still works
    assert fast._direct_ok is False
    reference, _ = _steps(optimizer, fast_step=False, fused=True)
    _assert_same(model, reference, exact=True)
    warnings = _warnings(fresh)
    assert len(warnings) == 1 and "fails" in warnings[0], warnings


@pytest.mark.parametrize("failing_call", [1, 2, 3])
def test_a_direct_call_that_fails_mid_update_is_finished_by_torch(
    failing_call: int, fresh: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the check, a group's kernel call raises (the 1st group's or the 2nd's, of one update or a
    later one): the groups not yet updated step through torch, none twice, the step counts right."""
    monkeypatch.setattr(fast, "_direct_ok", True)  # the check passed
    monkeypatch.setattr(
        torch, "_fused_adam_", _failing_for_ml(torch._fused_adam_, lambda n: n == failing_call)
    )
    model, optim = _steps(torch.optim.Adam, fast_step=True)
    assert fast._direct_ok is False
    reference, ref_optim = _steps(torch.optim.Adam, fast_step=False, fused=True)
    _assert_same(model, reference, exact=True)
    state = [o.state_dict()["state"] for o in (optim, ref_optim)]
    for key, entry in state[1].items():
        for name, value in entry.items():
            assert torch.equal(state[0][key][name], value), (key, name)
    assert len(_warnings(fresh)) == 1


def test_a_kernel_with_other_arithmetic_is_not_called_directly(
    fresh: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that takes the call but computes something else (``eps`` inside the square root, say)
    fails the check against Adam's arithmetic: torch's step, never a wrong update."""
    kernel = torch._fused_adam_

    def other(*args: Any, eps: float, **kwargs: Any) -> Any:
        if sys._getframe(1).f_globals.get("__name__") == fast.__name__:
            eps = eps**0.5
        return kernel(*args, eps=eps, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", other)
    model, _ = _steps(torch.optim.Adam, fast_step=True)
    reference, _ = _steps(torch.optim.Adam, fast_step=False, fused=True)
    _assert_same(model, reference, exact=True)
    assert fast._direct_ok is False and "Adam gives" in _warnings(fresh)[0]


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        ("optim", "_optimizer_step_pre_hooks"),
        ("optim", "_optimizer_step_post_hooks"),
        ("module", "_global_optimizer_pre_hooks"),
        ("module", "_global_optimizer_post_hooks"),
    ],
)
def test_without_the_step_hook_dicts_adam_steps_through_torch(
    owner: str, name: str, fresh: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A torch that keeps its step hooks elsewhere: the direct call cannot tell whether a hook would
    be skipped, so torch steps. (Deleting the dict breaks torch's own hook runner too, so its step
    here is the undecorated one: as if torch's hooks lived under another name.)"""
    torch.manual_seed(0)
    model = _mlp()
    optim = torch.optim.Adam(_groups(model), lr=1e-2, eps=1e-5)
    use_fast_optimizer(optim)
    monkeypatch.delattr(optim if owner == "optim" else importlib.import_module("torch.optim.optimizer"), name)
    unhooked = type(optim).step.__wrapped__  # type: ignore[attr-defined]
    torch_steps = [0]

    def step() -> None:
        torch_steps[0] += 1
        unhooked(optim)

    monkeypatch.setattr(optim, "step", step)
    x = torch.randn(64, 4)
    for _ in range(3):
        fused_step = FusedAdamStep(optim)
        for _ in range(2):
            optim.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
            fused_step()
    monkeypatch.undo()
    assert torch_steps[0] == 6
    reference, _ = _steps(torch.optim.Adam, fast_step=False, fused=True)
    _assert_same(model, reference, exact=True)
    assert len(_warnings(fresh)) == 1 and "hooks" in _warnings(fresh)[0]


def test_the_sl_trainer_trains_without_the_fused_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torch._fused_adam_`` missing: the trainer's fast optimizer is torch's multi-tensor Adam, no crash."""
    plain = _train(tmp_path / "plain", fast=False)
    monkeypatch.setattr(fast, "_direct_ok", None)
    monkeypatch.delattr(torch, "_fused_adam_")
    fallback = _train(tmp_path / "fallback", fast=True, fused=False)
    assert fallback.keys() == plain.keys()
    for name, value in plain.items():
        assert torch.equal(fallback[name], value), name


@pytest.mark.parametrize("path", ["direct", "torch_fused", "without _foreach_sub_", "sgd"])
def test_a_step_flagged_non_finite_changes_nothing_and_the_others_step_as_usual(
    path: str, fresh: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``found_inf`` (the trainers' non-finite flag, decided on the device): 1.0 leaves the weights
    and the whole optimizer state as they were; 0.0 is the usual step, bit for bit."""
    if path == "without _foreach_sub_":  # the direct call is refused: torch's unfused step reads the flag
        monkeypatch.delattr(torch, "_foreach_sub_")

    def run(flags: list[float] | None) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = _mlp()
        optim: torch.optim.Optimizer = (
            torch.optim.SGD(_groups(model), lr=1e-2, momentum=0.9)
            if path == "sgd"
            else torch.optim.AdamW(_groups(model), lr=1e-2, eps=1e-5)
        )
        use_fast_optimizer(optim)
        x = torch.randn(64, 4)
        for i in range(5):
            optim.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
            if flags is None:
                step_skipping(optim, None)
                continue
            flag = torch.tensor(flags[i])
            if path == "torch_fused":
                step_skipping(optim, flag)
            else:
                FusedAdamStep(optim)(flag) if path != "sgd" else step_skipping(optim, flag)
        return model, optim

    skipped, optim = run([0.0, 0.0, 1.0, 0.0, 1.0])
    three, reference = run([0.0, 0.0, 0.0, 1.0, 1.0])  # the same 3 updates, skips at the end
    # The weights after steps 1, 2, 4 equal those after 1, 2, 3 (the same gradients: x is fixed,
    # and a skipped step changed nothing the next one reads).
    _assert_same(skipped, three, exact=True)
    for p, q in zip(optim.state.values(), reference.state.values(), strict=True):
        for key in p:
            assert torch.equal(torch.as_tensor(p[key]), torch.as_tensor(q[key])), key
    plain, _ = run(None)
    unflagged, _ = run([0.0] * 5)
    _assert_same(plain, unflagged, exact=True)


def test_a_group_added_later_is_stepped_by_the_direct_call() -> None:
    """Unfreezing a part (``add_param_group``) after the first steps: the direct call kept stepping
    the groups it had found, and the new one never changed."""
    torch.manual_seed(0)
    body, head = nn.Linear(4, 3), nn.Linear(3, 2)
    optim = torch.optim.AdamW(body.parameters(), lr=0.1)
    use_fast_optimizer(optim)
    step = FusedAdamStep(optim)
    x = torch.randn(8, 4)
    for _ in range(3):
        optim.zero_grad()
        head(body(x)).square().sum().backward()
        step()
    optim.add_param_group({"params": list(head.parameters())})
    assert optim.param_groups[1]["fused"]  # as a group of torch's AdamW(fused=True) would be
    before = head.weight.detach().clone()
    for _ in range(2):
        optim.zero_grad()
        head(body(x)).square().sum().backward()
        step()
    assert not torch.equal(head.weight, before)


def test_under_fp16_groups_no_longer_all_fused_step_through_torch_without_its_flag() -> None:
    """A resumed run steps as its checkpoint's optimizer did (unfused groups here), and a group may
    be added unfused: the gradient scaler handed them its found_inf flag, which they assert against."""
    from ml.utils.precision import MixedPrecision

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    unfused = torch.optim.AdamW(model.parameters(), lr=0.1)
    saved = copy.deepcopy(unfused.state_dict())
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    use_fast_optimizer(optim)
    precision = MixedPrecision("fp16", torch.device("cpu"))
    for restore in (False, True):
        if restore:
            optim.load_state_dict(saved)  # the checkpoint's groups: not fused
            assert not optim.param_groups[0]["fused"]
        before = model.weight.detach().clone()
        for _ in range(10):  # (the first steps overflow at the scaler's first scales, and are skipped)
            optim.zero_grad()
            with precision.autocast():
                loss = model(torch.randn(8, 4)).float().square().sum()
            precision.backward(loss)
            precision.step(optim)
        assert not torch.equal(model.weight, before)


def _unfreeze(optim: torch.optim.Optimizer, body: nn.Module, head: nn.Module, how: str) -> None:
    if how == "replace the list":
        optim.param_groups[0]["params"] = [*body.parameters(), *head.parameters()]
    elif how == "swap the group":
        optim.param_groups.pop()
        optim.add_param_group({"params": list(head.parameters())})
    elif how == "reset the state":
        optim.state.clear()
    elif how == "drop a parameter's state":
        del optim.state[body.bias]
    else:  # "replace a parameter in the list"
        optim.param_groups[0]["params"][1] = head.weight


@pytest.mark.parametrize(
    "how",
    [
        "replace the list",
        "swap the group",
        "reset the state",
        "drop a parameter's state",
        "replace a parameter in the list",
    ],
)
def test_the_direct_call_follows_groups_and_state_a_hook_changes(how: str) -> None:
    """The direct call kept stepping the lists and moments it first found: a head unfrozen by a
    hook never trained, and a reset state was not reset."""
    torch.manual_seed(0)
    body, head = nn.Linear(4, 3), nn.Linear(3, 2)
    twins = copy.deepcopy((body, head))
    direct = torch.optim.AdamW(body.parameters(), lr=0.1)
    use_fast_optimizer(direct)
    step = FusedAdamStep(direct)
    reference = torch.optim.AdamW(twins[0].parameters(), lr=0.1, fused=True)
    x = torch.randn(8, 4)
    for i in range(6):
        if i == 3:
            _unfreeze(direct, body, head, how)
            _unfreeze(reference, *twins, how)
        for optim, (b, h), take in ((direct, (body, head), step), (reference, twins, reference.step)):
            optim.zero_grad()
            h(b(x)).square().sum().backward()
            take()
    for mine, theirs in zip(
        [*body.parameters(), *head.parameters()],
        [*twins[0].parameters(), *twins[1].parameters()],
        strict=True,
    ):
        assert torch.equal(mine, theirs)


def test_a_subclass_of_adam_with_its_own_step_is_left_to_it() -> None:
    """Fused flags and the scaler's protocol belong to torch's own step: a subclass with its own
    step was told it takes found_inf, so under fp16 an overflowing step was applied, not skipped."""
    from ml.utils.precision import MixedPrecision

    class SignAdam(torch.optim.Adam):
        @torch.no_grad()
        def step(self, closure: Any = None) -> None:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad.sign(), alpha=-group["lr"])

    model = nn.Linear(4, 2)
    optim = SignAdam(model.parameters(), lr=0.1)
    use_fast_optimizer(optim)
    assert not optim.param_groups[0].get("fused")
    precision = MixedPrecision("fp16", torch.device("cpu"))
    before = model.weight.detach().clone()
    optim.zero_grad()
    with precision.autocast():
        loss = model(torch.full((8, 4), 1e4)).float().square().sum()  # overflows in fp16
    precision.backward(loss)
    precision.step(optim)
    assert torch.equal(model.weight, before)  # skipped, as for any optimizer torch's scaler knows
    # Built fused by the user, its step still ignores a found_inf flag: read on the host instead.
    assert not fast.skips_on_device(SignAdam(model.parameters(), lr=0.1, fused=True))


def test_clear_grads_unsets_the_optimizer_s_gradients_and_no_others() -> None:
    """What ``zero_grad(set_to_none=True)`` does, without torch's wrapper: every group's gradients
    go, and a parameter the optimizer does not step keeps its own."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    outside = nn.Parameter(torch.ones(2))
    optim = torch.optim.Adam(
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.1}], lr=1e-3
    )
    (model(torch.ones(5, 4)).sum() + outside.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())
    fast.clear_grads(optim)
    assert all(p.grad is None for p in model.parameters())
    assert outside.grad is not None and torch.equal(outside.grad, torch.ones(2))


class _CountingSGD(torch.optim.SGD):
    calls: list[bool]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.calls.append(set_to_none)
        super().zero_grad(set_to_none=set_to_none)


class _PassesOn:
    """A user's wrapper that passes every call on to the optimizer it holds."""

    def __init__(self, optim: torch.optim.Optimizer) -> None:
        self.optim = optim

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optim, name)


@pytest.mark.parametrize("whose", ["its class's", "the instance's", "behind a wrapper"])
def test_clear_grads_calls_an_optimizer_s_own_zero_grad(whose: str) -> None:
    """A ``zero_grad`` the user defined (to keep a buffer in step with the gradients, say) is called,
    as torch's would be: one of the class, one set on the instance, an optimizer's behind an
    object that passes calls on (which has no ``zero_grad`` of its own class to look up)."""
    calls: list[bool] = []
    model = nn.Linear(4, 2)
    optim: Any
    if whose == "its class's":
        optim = _CountingSGD(model.parameters(), lr=0.1)
        optim.calls = calls
    else:
        optim = torch.optim.SGD(model.parameters(), lr=0.1)
        own = optim.zero_grad

        def counting(set_to_none: bool = True) -> None:
            calls.append(set_to_none)
            own(set_to_none=set_to_none)

        optim.zero_grad = counting
        if whose == "behind a wrapper":
            optim = _PassesOn(optim)
    model(torch.ones(3, 4)).sum().backward()
    fast.clear_grads(optim)
    assert calls == [True]
    assert model.weight.grad is None
