"""Tests for :mod:`ml.optimizers.builtin`: the decay / no-decay grouping and the three optimizers."""

import io
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ml.core.registry import build, lookup, registered_names
from ml.optimizers.builtin import (
    AdamConfig,
    AdamOptimizer,
    AdamWConfig,
    AdamWOptimizer,
    SGDConfig,
    SGDOptimizer,
    weight_decay_param_groups,
)


class _Net(nn.Module):
    """Embedding -> Linear -> LayerNorm -> BatchNorm -> tied head, plus a custom and a frozen param."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.linear = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: one parameter, two owners
        self.scale = nn.Parameter(torch.ones(()))  # owned by a custom module: rule 4
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.frozen(self.linear(self.embed(tokens)))
        return self.head(self.bn(self.norm(x)) * self.scale)


def _ids(params: Any) -> list[int]:
    return [id(p) for p in params]


def _groups_by_decay(groups: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    decay = [id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    no_decay = [id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    return decay, no_decay


def test_builtins_are_registered() -> None:
    assert {"adam", "adamw", "sgd"} <= set(registered_names("optimizer"))
    assert lookup("optimizer", "adamw") == (AdamWOptimizer, AdamWConfig)


def test_biases_and_norm_params_are_not_decayed() -> None:
    net = _Net()
    groups = weight_decay_param_groups(net, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay, no_decay = _groups_by_decay(groups)
    # Within a group, parameters keep the order of `net.parameters()` (the net's own `scale` first).
    assert decay == _ids([net.scale, net.embed.weight, net.linear.weight])
    assert no_decay == _ids([net.linear.bias, net.norm.weight, net.norm.bias, net.bn.weight, net.bn.bias])


def test_each_trainable_param_appears_exactly_once() -> None:
    net = _Net()
    decay, no_decay = _groups_by_decay(weight_decay_param_groups(net, weight_decay=0.1))
    grouped = decay + no_decay
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in net.parameters() if p.requires_grad}
    assert grouped.count(id(net.head.weight)) == 1  # the tied weight
    assert not {id(p) for p in net.frozen.parameters()} & set(grouped)


def test_default_decay_false_leaves_custom_params_undecayed() -> None:
    net = _Net()
    decay, no_decay = _groups_by_decay(weight_decay_param_groups(net, 0.1, default_decay=False))
    assert decay == _ids([net.embed.weight, net.linear.weight])
    assert no_decay[0] == id(net.scale)


def test_a_param_shared_with_a_norm_layer_is_not_decayed() -> None:
    linear = nn.Linear(4, 4, bias=False)
    norm = nn.LayerNorm(4)
    norm.weight = nn.Parameter(torch.ones(4))
    model = nn.Sequential(linear, norm, nn.Linear(4, 4, bias=False))
    model[2].weight = linear.weight
    custom = nn.Module()
    custom.gain = norm.weight
    model.append(custom)
    decay, no_decay = _groups_by_decay(weight_decay_param_groups(model, 0.1))
    assert decay == [id(linear.weight)]
    assert no_decay == [id(norm.weight), id(norm.bias)]


def test_recurrent_attention_and_conv_params() -> None:
    model = nn.ModuleDict(
        {"lstm": nn.LSTM(4, 4), "attn": nn.MultiheadAttention(4, 2), "conv": nn.Conv1d(4, 4, 3)}
    )
    groups = weight_decay_param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = (sorted(names[i] for i in ids) for ids in _groups_by_decay(groups))
    assert decay == sorted(
        [
            "lstm.weight_ih_l0",
            "lstm.weight_hh_l0",
            "attn.in_proj_weight",
            "attn.out_proj.weight",
            "conv.weight",
        ]
    )
    assert no_decay == sorted(
        ["lstm.bias_ih_l0", "lstm.bias_hh_l0", "attn.in_proj_bias", "attn.out_proj.bias", "conv.bias"]
    )


def test_empty_groups_are_left_out() -> None:
    groups = weight_decay_param_groups(nn.Linear(3, 3, bias=False), 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
    groups = weight_decay_param_groups(nn.LayerNorm(3), 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


def test_without_decay_there_is_one_group_in_model_order() -> None:
    # Each group costs the optimizer a pass per step; without decay the split would change nothing.
    net = _Net()
    groups = weight_decay_param_groups(net, 0.0)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert _ids(groups[0]["params"]) == _ids(p for p in net.parameters() if p.requires_grad)


def _train(net: _Net, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        net(torch.randint(0, 10, (20,), generator=generator)).square().mean().backward()
        optimizer.step()


def test_a_state_saved_with_two_groups_without_decay_resumes_in_one() -> None:
    # Checkpoints written before one group was made without decay: decayed parameters first.
    torch.manual_seed(0)
    old_net = _Net()
    split = weight_decay_param_groups(old_net, 1.0)
    old = torch.optim.Adam([{**group, "weight_decay": 0.0} for group in split], lr=1e-2)
    _train(old_net, old, 3, seed=1)
    file = io.BytesIO()
    torch.save(old.state_dict(), file)  # as a checkpoint holds it (loaded, it shares no tensor)
    file.seek(0)
    saved = torch.load(file, weights_only=True)

    new_net = _Net()
    new_net.load_state_dict(old_net.state_dict())
    new = AdamOptimizer(AdamConfig(lr=1e-2)).get(new_net)
    new.load_state_dict(saved)
    assert len(new.param_groups) == 1
    olds = dict(old_net.named_parameters())
    for name, param in new_net.named_parameters():
        if param.requires_grad:
            assert torch.equal(new.state[param]["exp_avg"], old.state[olds[name]]["exp_avg"]), name

    _train(old_net, old, 2, seed=2)
    _train(new_net, new, 2, seed=2)
    for (name, a), b in zip(old_net.named_parameters(), new_net.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_two_group_state_split_otherwise_than_the_rule_now_would_is_refused() -> None:
    # Same total, other group sizes (here default_decay changed): merging would misplace the state.
    net = _Net()
    split = weight_decay_param_groups(net, 1.0, default_decay=True)
    old = torch.optim.Adam([{**group, "weight_decay": 0.0} for group in split])
    with pytest.raises(ValueError, match="different number of parameter groups"):
        AdamOptimizer(AdamConfig(default_decay=False)).get(net).load_state_dict(old.state_dict())


def test_a_state_with_other_groups_is_still_refused() -> None:
    net = _Net()
    decayed = AdamOptimizer(AdamConfig(weight_decay=0.1)).get(net)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        AdamOptimizer(AdamConfig()).get(net).load_state_dict(decayed.state_dict())


def test_a_model_without_trainable_params_raises() -> None:
    model = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        weight_decay_param_groups(model, 0.1)


@pytest.mark.parametrize(
    ("name", "torch_cls", "weight_decay"),
    [("adam", torch.optim.Adam, 0.0), ("adamw", torch.optim.AdamW, 1e-2), ("sgd", torch.optim.SGD, 0.0)],
)
def test_built_optimizer_takes_a_real_step(
    name: str, torch_cls: type[torch.optim.Optimizer], weight_decay: float
) -> None:
    torch.manual_seed(0)
    net = _Net()
    _, config_cls = lookup("optimizer", name)
    optimizer = build("optimizer", OmegaConf.structured(config_cls)).get(net)
    assert type(optimizer) is torch_cls
    assert optimizer.param_groups[0]["weight_decay"] == weight_decay
    assert optimizer.param_groups[-1]["weight_decay"] == 0.0

    trainable = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    loss = net(torch.randint(0, 10, (4, 5)).flatten()).square().mean()
    loss.backward()
    optimizer.step()
    after = dict(net.named_parameters())
    assert all(not torch.equal(after[n], before) for n, before in trainable.items())
    assert all(torch.equal(after[n], before) for n, before in frozen.items())


def test_weight_decay_reaches_only_the_decay_group() -> None:
    net = _Net()
    optimizer = SGDOptimizer(SGDConfig(lr=0.1, weight_decay=0.5)).get(net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)  # the only change left is the decay itself
    optimizer.step()
    after = dict(net.named_parameters())
    for name in ("embed.weight", "linear.weight", "scale"):
        assert torch.allclose(after[name], before[name] * (1 - 0.1 * 0.5))
    for name in ("linear.bias", "norm.weight", "norm.bias", "bn.weight", "bn.bias"):
        assert torch.equal(after[name], before[name])


def test_adam_configs_reach_torch() -> None:
    config = AdamConfig(lr=3e-4, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    optimizer = AdamOptimizer(config).get(nn.Linear(2, 2))
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        3e-4,
        (0.8, 0.95),
        1e-6,
        0.1,
    )
    assert AdamWConfig().weight_decay == 1e-2 and AdamConfig().weight_decay == 0.0


def test_sgd_nesterov_needs_momentum() -> None:
    with pytest.raises(ValueError, match=r"nesterov needs a positive optimizer\.momentum"):
        SGDOptimizer(SGDConfig(nesterov=True))
    optimizer = SGDOptimizer(SGDConfig(nesterov=True, momentum=0.9)).get(nn.Linear(2, 2))
    assert optimizer.param_groups[0]["nesterov"] is True


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AdamOptimizer(AdamConfig(beta1=1.0)), r"beta1 must be in \[0, 1\)"),
        (lambda: AdamWOptimizer(AdamWConfig(beta2=-0.1)), r"beta2 must be in \[0, 1\)"),
        (lambda: AdamOptimizer(AdamConfig(lr=-1.0)), r"lr must be non-negative"),
        (lambda: AdamWOptimizer(AdamWConfig(weight_decay=-1.0)), r"weight_decay must be non-negative"),
        (lambda: SGDOptimizer(SGDConfig(momentum=-0.5)), r"momentum must be non-negative"),
    ],
)
def test_out_of_range_fields_raise(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
