"""Tests of PPO's advantage estimation, its fused loss and its sampling.

The first test works on hand-made tensors; the second collects from real CartPole environments
whose time limit (5 steps) truncates episodes in the middle of the rollout and checks every
advantage against a plain per-environment recursion. Then the categorical loss's hand-written
backward pass is checked against autograd on the plain expressions, and its fallback (plain autograd:
``task.fused_loss=false``, or the fused node made unusable) against it; and sampled actions against
the policy's probabilities.
"""

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from ml.core.state import State
from ml.examples.classic_control import ActorCriticMLP, ActorCriticMLPConfig, ClassicControlTask
from ml.tasks import ppo
from ml.tasks.ppo import PPOTaskConfig, _categorical_losses, _CategoricalPPOLoss, compute_gae
from ml.trainers.rl import (
    ReinforcementLearningTrainer,
    ReinforcementLearningTrainerConfig,
    _Rollout,
    env_seeds,
)

gymnasium = pytest.importorskip("gymnasium")


def test_gae_bootstraps_truncation_and_not_termination() -> None:
    gamma, lam = 0.9, 0.5
    rewards = torch.tensor([[1.0], [1.0], [1.0], [1.0]])
    values = torch.tensor([[0.5], [0.4], [0.3], [0.2]])
    # Step 1 is truncated (its final state is worth 2.0); step 3 terminates.
    next_values = torch.tensor([[0.4], [2.0], [0.2], [7.0]])
    terminated = torch.tensor([[False], [False], [False], [True]])
    truncated = torch.tensor([[False], [True], [False], [False]])
    adv = compute_gae(rewards, values, next_values, terminated, truncated, gamma, lam)
    a3 = 1.0 - 0.2  # terminated: no bootstrap from 7.0
    a2 = 1.0 + gamma * 0.2 - 0.3 + gamma * lam * a3
    a1 = 1.0 + gamma * 2.0 - 0.4  # truncated: bootstrap from the final state, no flow from step 2
    a0 = 1.0 + gamma * 0.4 - 0.5 + gamma * lam * a1
    torch.testing.assert_close(adv.squeeze(1), torch.tensor([a0, a1, a2, a3]))


def test_rollout_with_an_episode_truncated_mid_rollout(tmp_path: Path) -> None:
    config = PPOTaskConfig(
        name="classic_control", env_id="CartPole-v1", env_kwargs={"max_episode_steps": 5},
        num_envs=2, num_env_steps=8, minibatch_size=16, gamma=0.9, gae_lambda=0.8,
    )  # fmt: skip
    task = ClassicControlTask(config)
    torch.manual_seed(0)
    model = ActorCriticMLP(ActorCriticMLPConfig(name="m", observation_size=4, action_size=2))
    rollout = _Rollout(task, "sync", 2)
    task.on_environments_ready(rollout.envs.single_observation_space, rollout.envs.single_action_space)
    try:
        trainer_config = OmegaConf.merge(
            OmegaConf.structured(ReinforcementLearningTrainerConfig), {"name": "rl", "exp_dir": str(tmp_path)}
        )
        trainer = ReinforcementLearningTrainer(trainer_config)  # type: ignore[arg-type]
        model.to(trainer.device)  # as the trainer's set-up places it (a GPU where there is one)
        rollout.reset(env_seeds(0, 0, 2), trainer.device)
        trajectory, finished = trainer._collect(rollout, task, model)
        dataset = task.build_rl_dataset(model, trajectory, State.init_state())
    finally:
        rollout.close()

    truncated, terminated = trajectory["truncated"], trajectory["terminated"]
    # A random policy rarely drops the pole within 5 steps: both episodes end by the time limit
    # at step 4, in the middle of the 8-step rollout.
    assert truncated[4].all() and not terminated[:5].any()
    assert [length for _, length in finished] == [5, 5]
    final = trajectory["final_observations"]
    assert final[4].abs().sum() > 0 and not torch.equal(final[4], trajectory["observations"][5])
    with torch.no_grad():
        v_final = model(final[4])[1]
        v_next = model(trajectory["next_observations"])[1]
    values, rewards = trajectory["values"], trajectory["rewards"]
    expected = torch.zeros_like(values)
    for env in range(2):
        last = 0.0
        for t in reversed(range(8)):
            if terminated[t, env]:
                next_value, carry = 0.0, 0.0
            elif truncated[t, env]:
                next_value, carry = float(v_final[env]), 0.0
            else:
                next_value = float(values[t + 1, env]) if t < 7 else float(v_next[env])
                carry = last
            last = float(rewards[t, env]) + 0.9 * next_value - float(values[t, env]) + 0.9 * 0.8 * carry
            expected[t, env] = last
    torch.testing.assert_close(dataset["advantages"], expected.reshape(-1))
    torch.testing.assert_close(dataset["returns"], (expected + values).reshape(-1))


def _reference_loss(
    logits: torch.Tensor,
    values: torch.Tensor,
    actions: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's losses written plainly, for autograd to differentiate (as Stable-Baselines3 writes them)."""
    log_p = torch.log_softmax(logits, -1)
    ratio = (log_p.gather(-1, actions[:, None]).squeeze(-1) - old_log_probs).exp()
    adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    policy_loss = -torch.min(adv * ratio, adv * ratio.clamp(1 - clip, 1 + clip)).mean()
    value_loss = torch.nn.functional.mse_loss(returns, values)
    entropy = -(log_p.exp() * log_p).sum(-1).mean()
    return policy_loss, value_loss, entropy


@pytest.mark.parametrize(("num_actions", "batch", "ent_coef"), [(2, 256, 0.0), (2, 64, 0.01), (5, 33, 0.1)])
def test_the_categorical_loss_has_autograd_s_gradients(num_actions: int, batch: int, ent_coef: float) -> None:
    """The hand-written backward of the fused loss gives the gradients of the plain expressions."""
    gen = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, num_actions, dtype=torch.float64, generator=gen, requires_grad=True)
    values = torch.randn(batch, dtype=torch.float64, generator=gen, requires_grad=True)
    actions = torch.randint(0, num_actions, (batch,), generator=gen)
    # Old log-probabilities of a nearby policy: some ratios inside the clip range, many outside.
    old_logits = logits.detach() + 0.5 * torch.randn(batch, num_actions, dtype=torch.float64, generator=gen)
    old_log_probs = torch.log_softmax(old_logits, -1).gather(-1, actions[:, None]).squeeze(-1)
    advantages = torch.randn(batch, dtype=torch.float64, generator=gen)
    returns = torch.randn(batch, dtype=torch.float64, generator=gen)
    inputs = (logits, values, actions, old_log_probs, advantages, returns, 0.2)

    policy, value, entropy, _, log_ratio, _ = _CategoricalPPOLoss.apply(*inputs, True, 0.5, True)
    clipped = ((log_ratio.exp() - 1).abs() > 0.2).double().mean()
    assert 0.1 < clipped < 0.9
    expected = _reference_loss(*inputs)
    for got, want in zip((policy, value / 0.5, entropy), expected, strict=True):
        torch.testing.assert_close(got, want)
    fused = torch.autograd.grad(policy + value - ent_coef * entropy, (logits, values))
    plain_loss = expected[0] + 0.5 * expected[1] - ent_coef * expected[2]
    plain = torch.autograd.grad(plain_loss, (logits, values), retain_graph=True)
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want)
    # Without the entropy in the loss it is not computed; the other gradients stay the same.
    policy, value, entropy, *_ = _CategoricalPPOLoss.apply(*inputs, True, 0.5, False)
    assert entropy.isnan()
    fused = torch.autograd.grad(policy + value, (logits, values))
    plain = torch.autograd.grad(expected[0] + 0.5 * expected[1], (logits, values))
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want)


def test_sampled_actions_follow_the_policy() -> None:
    """Inverse-CDF sampling draws each action with its probability (and never an impossible one)."""
    task = ClassicControlTask(PPOTaskConfig(name="classic_control"))
    task.on_environments_ready(None, gymnasium.spaces.Discrete(3))
    probs = torch.tensor([0.2, 0.0, 0.8])

    def model(obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return probs.log().expand(obs.shape[0], 3), torch.zeros(obs.shape[0])

    torch.manual_seed(0)
    actions, extras = task.get_actions(model, torch.zeros(20_000, 4), optimal=False)  # type: ignore[arg-type]
    counts = torch.bincount(actions, minlength=3).double() / actions.numel()
    assert counts[1] == 0
    torch.testing.assert_close(counts, probs.double(), atol=0.01, rtol=0)
    torch.testing.assert_close(extras["log_probs"], probs.log()[actions])
    optimal, _ = task.get_actions(model, torch.zeros(2, 4), optimal=True)  # type: ignore[arg-type]
    assert optimal.tolist() == [2, 2]


def _minibatch(gen: torch.Generator, size: int = 64) -> dict[str, torch.Tensor]:
    return {
        "observations": torch.randn(size, 4, generator=gen),
        "actions": torch.randint(0, 2, (size,), generator=gen),
        "log_probs": torch.log(torch.rand(size, generator=gen) * 0.5 + 0.25),
        "advantages": torch.randn(size, generator=gen),
        "returns": torch.randn(size, generator=gen),
    }


def _train(fused_loss: bool) -> tuple[ActorCriticMLP, list[type], list[float]]:
    """Six minibatch steps of PPO on CartPole's actor-critic (loss, backward, clip, Adam), from seed 0.

    Returns the model, the type of each step's policy-loss node and each step's total loss.
    """
    task = ClassicControlTask(PPOTaskConfig(name="classic_control", ent_coef=0.01, fused_loss=fused_loss))
    torch.manual_seed(0)
    model = ActorCriticMLP(ActorCriticMLPConfig(name="m", observation_size=4, action_size=2))
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    nodes: list[type] = []
    totals: list[float] = []
    for _ in range(6):
        batch = _minibatch(gen)
        losses = task.compute_loss(model, batch, State.init_state(), model(batch["observations"]))
        total = sum(losses.values(), torch.zeros(()))
        nodes.append(type(losses["policy_loss"].grad_fn))
        totals.append(total.item())
        optim.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optim.step()
    task.on_step_end(State.init_state(), {}, model, optim, None)  # the statistics, from either path
    return model, nodes, totals


def _assert_same_training(
    a: tuple[ActorCriticMLP, Any, list[float]], b: tuple[ActorCriticMLP, Any, list[float]]
) -> None:
    """The same losses and parameters, float32 rounding apart (the same expressions, in another order)."""
    assert a[2] == pytest.approx(b[2], rel=1e-5)
    for p, q in zip(a[0].parameters(), b[0].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_the_plain_autograd_loss_is_the_fused_one() -> None:
    """:func:`_categorical_losses` (the fallback): the fused node's outputs and gradients."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 3, dtype=torch.float64, generator=gen)
    values = torch.randn(40, dtype=torch.float64, generator=gen)
    actions = torch.randint(0, 3, (40,), generator=gen)
    old = torch.log_softmax(logits + torch.randn(40, 3, dtype=torch.float64, generator=gen), -1)
    rest: tuple[Any, ...] = (
        actions,
        old.gather(-1, actions[:, None]).squeeze(-1),
        torch.randn(40, dtype=torch.float64, generator=gen),
        torch.randn(40, dtype=torch.float64, generator=gen),
        0.2,
        True,
        0.5,
    )
    fns: list[Callable[..., Any]] = [_CategoricalPPOLoss.apply, _categorical_losses]
    for with_entropy in (True, False):
        results = []
        for fn in fns:
            inputs = logits.clone().requires_grad_(), values.clone().requires_grad_()
            out = fn(*inputs, *rest, with_entropy)
            loss = out[0] + out[1] - (0.1 * out[2] if with_entropy else 0)
            results.append((out, torch.autograd.grad(loss, inputs)))
        (fused_out, fused_grads), (plain_out, plain_grads) = results
        for a, b in zip(fused_out, plain_out, strict=True):
            torch.testing.assert_close(a, b, equal_nan=True)
        # Only the three losses carry gradients (the entropy's when it is computed), as from the node.
        assert [o.requires_grad for o in plain_out] == [True, True, with_entropy, False, False, False]
        for a, b in zip(fused_grads, plain_grads, strict=True):
            torch.testing.assert_close(a, b)


def test_fused_loss_false_trains_with_plain_autograd(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=ppo.__name__)
    fused, plain = _train(fused_loss=True), _train(fused_loss=False)
    assert {n.__name__ for n in fused[1]} == {"_CategoricalPPOLossBackward"}
    assert "_CategoricalPPOLossBackward" not in {n.__name__ for n in plain[1]}
    _assert_same_training(fused, plain)
    assert not [r for r in caplog.records if r.name == ppo.__name__]


def test_without_a_usable_fused_loss_ppo_trains_with_plain_autograd(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused node made unusable (an autograd API it calls made missing): the check on first use
    fails, a warning says so once, and the same training runs through plain autograd."""
    caplog.set_level(logging.WARNING, logger=ppo.__name__)
    expected = _train(fused_loss=True)
    monkeypatch.setattr(ppo, "_fused_ok", None)  # as in a new process
    monkeypatch.delattr(torch.autograd.function.FunctionCtx, "set_materialize_grads")
    with pytest.raises(AttributeError):  # the node itself cannot run now
        _CategoricalPPOLoss.apply(
            torch.zeros(2, 2, requires_grad=True), *torch.zeros(5, 2), 0.2, True, 0.5, False
        )
    fallback = _train(fused_loss=True)
    assert "_CategoricalPPOLossBackward" not in {n.__name__ for n in fallback[1]}
    _assert_same_training(fallback, expected)
    warnings = [r.getMessage() for r in caplog.records if r.name == ppo.__name__]
    assert len(warnings) == 1 and "set_materialize_grads" in warnings[0], warnings


def test_a_fused_loss_with_other_gradients_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node whose backward no longer gives autograd's gradients fails the check: never a wrong step."""
    expected = _train(fused_loss=True)
    backward = _CategoricalPPOLoss.backward

    def wrong(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        grad_logits, grad_values, *rest = backward(ctx, *grads)
        return (grad_logits, None if grad_values is None else 2 * grad_values, *rest)

    monkeypatch.setattr(ppo, "_fused_ok", None)
    monkeypatch.setattr(_CategoricalPPOLoss, "backward", staticmethod(wrong))
    fallback = _train(fused_loss=True)
    assert ppo._fused_ok is False
    _assert_same_training(fallback, expected)


# -- what PPO refuses: a policy that is not one, settings that mean nothing, spaces it cannot act in


@pytest.mark.parametrize("optimal", [False, True], ids=["sampled", "deterministic"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_policy_whose_probabilities_are_not_finite_stops_instead_of_choosing_action_0(
    optimal: bool, bad: float
) -> None:
    from ml.errors import NonFiniteLossError

    task = ClassicControlTask(PPOTaskConfig(name="classic_control"))
    task.on_environments_ready(None, gymnasium.spaces.Discrete(3))

    def model(obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.zeros(obs.shape[0], 3)
        logits[1, 2] = bad  # one environment's observation gives a logit that is not finite
        return logits, torch.zeros(obs.shape[0])

    with pytest.raises(NonFiniteLossError, match="policy's action probabilities are not finite"):
        task.get_actions(model, torch.zeros(4, 4), optimal=optimal)  # type: ignore[arg-type]


def test_a_gaussian_policy_whose_actions_are_not_finite_stops() -> None:
    from ml.errors import NonFiniteLossError

    task = ClassicControlTask(PPOTaskConfig(name="classic_control", env_id="Pendulum-v1"))
    task.on_environments_ready(None, gymnasium.spaces.Box(-2.0, 2.0, shape=(1,)))
    model = ActorCriticMLP(ActorCriticMLPConfig(name="m", observation_size=3, action_size=1, continuous=True))
    with torch.no_grad():
        model.policy[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="policy's actions are not finite"):
        task.get_actions(model, torch.ones(2, 3), optimal=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"gamma": 1.5}, "task.gamma must be in [0, 1], got 1.5"),
        ({"gamma": -1.0}, "task.gamma must be in [0, 1], got -1.0"),
        ({"gae_lambda": 2.0}, "task.gae_lambda must be in [0, 1], got 2.0"),
        ({"clip_coef": -0.2}, "task.clip_coef must be positive, got -0.2"),
        ({"vf_coef": -1.0}, "task.vf_coef must be at least 0, got -1.0"),
        ({"target_kl": -1.0}, "task.target_kl must be positive (or null"),
        ({"target_kl": 0.0}, "task.target_kl must be positive (or null"),
        ({"schedule_env_steps": -5}, "task.schedule_env_steps must be positive (or null"),
        ({"schedule_env_steps": 0, "clip_schedule": "linear"}, "task.schedule_env_steps must be positive"),
        ({"minibatch_size": 1}, "task.minibatch_size must be at least 2 to normalise advantages"),
        ({"minibatch_size": 100000}, "task.minibatch_size must be at most the rollout's 256 transitions"),
    ],
)
def test_nonsensical_settings_are_refused(overrides: dict, message: str) -> None:
    from ml.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        ClassicControlTask(PPOTaskConfig(name="classic_control", **overrides))
    assert message in str(caught.value)


def test_a_rollout_that_does_not_split_into_whole_minibatches_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=ppo.__name__)
    ClassicControlTask(PPOTaskConfig(name="classic_control", minibatch_size=1, normalize_advantages=False))
    ClassicControlTask(PPOTaskConfig(name="classic_control", minibatch_size=255))
    warnings = [r.getMessage() for r in caplog.records if r.name == ppo.__name__]
    assert len(warnings) == 1, warnings  # 1 divides 256
    assert "task.minibatch_size=255 does not divide the rollout's 256 transitions" in warnings[0]
    assert "a single sample: its advantage is not normalised" in warnings[0]


def test_discrete_actions_not_numbered_from_0_are_refused() -> None:
    from ml.errors import ConfigError

    task = ClassicControlTask(PPOTaskConfig(name="classic_control"))
    with pytest.raises(ConfigError, match=r"task\.env_id: .*CartPole-v1's are Discrete\(2, start=1\)"):
        task.on_environments_ready(None, gymnasium.spaces.Discrete(2, start=1))


def test_an_environment_argument_the_environment_refuses_names_task_env_kwargs() -> None:
    from ml.errors import ConfigError

    task = ClassicControlTask(PPOTaskConfig(name="classic_control", env_kwargs={"max_episode_steps": 0}))
    with pytest.raises(
        ConfigError, match=r"^task\.env_kwargs: CartPole-v1 refuses \{'max_episode_steps': 0\}"
    ):
        task.get_environment()


# -- masked actions (-inf logits): gymnasium's action_mask convention, as a model applies it


def test_impossible_actions_add_nothing_to_the_entropy_and_get_no_gradient() -> None:
    """A -inf logit made the entropy 0 * -inf = NaN, and with task.ent_coef > 0 every loss NaN."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(33, 3, dtype=torch.float64, generator=gen)
    masked = logits.clone()
    masked[:, 2] = float("-inf")  # action 2 is never allowed
    values, returns, advantages = torch.randn(3, 33, dtype=torch.float64, generator=gen)
    actions = torch.randint(0, 2, (33,), generator=gen)
    old_log_probs = torch.log_softmax(masked, -1).gather(-1, actions[:, None]).squeeze(-1) - 0.1
    rest = (actions, old_log_probs, advantages, returns, 0.2, True, 0.5, True)
    # The entropy over the two possible actions is that of the same logits without the third.
    legal = torch.log_softmax(logits[:, :2], -1)
    expected_entropy = -(legal.exp() * legal).sum(-1).mean()
    gradients = []
    for fn in (_CategoricalPPOLoss.apply, _categorical_losses):
        inputs = masked.clone().requires_grad_(), values.clone().requires_grad_()
        out = fn(*inputs, *rest)
        torch.testing.assert_close(out[2], expected_entropy)
        grads = torch.autograd.grad(out[0] + out[1] - 0.1 * out[2], inputs)
        assert all(g.isfinite().all() for g in grads)
        assert (grads[0][:, 2] == 0).all()
        gradients.append(grads)
    for fused, plain in zip(*gradients, strict=True):
        torch.testing.assert_close(fused, plain)


def test_the_entropy_of_possible_actions_is_the_same_float_as_before() -> None:
    """The fix for -inf changes no number for finite logits (float32, as training runs)."""
    log_p = torch.log_softmax(torch.randn(256, 5, generator=torch.Generator().manual_seed(1)) * 30, -1)
    assert torch.equal(ppo._categorical_entropy(log_p), -(log_p.exp() * log_p).sum(-1))


# -- refusal lines name keys the model has, else what it must give


class _PlainConfig:
    """A user's model config with no action_size or continuous setting."""


class _ThreeLogits(torch.nn.Module):
    config = _PlainConfig()

    def forward(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(observations.shape[0], 3), torch.zeros(observations.shape[0])


class _GaussianOfTwo(_ThreeLogits):
    def __init__(self) -> None:
        super().__init__()
        self.log_std = torch.nn.Parameter(torch.zeros(2))

    def forward(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(observations.shape[0], 2), torch.zeros(observations.shape[0])


def _ready(space: Any) -> ClassicControlTask:
    task = ClassicControlTask(PPOTaskConfig(name="classic_control"))
    task.on_environments_ready(None, space)
    return task


def _refusal(fn: Callable[[], Any]) -> str:
    from ml.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        fn()
    return str(caught.value)


def test_a_model_that_does_not_fit_the_actions_is_refused_naming_its_setting_or_what_it_must_give() -> None:
    discrete, box = gymnasium.spaces.Discrete(2), gymnasium.spaces.Box(-2.0, 2.0, shape=(1,))
    observations = torch.zeros(4, 3)
    mlp = ActorCriticMLP(ActorCriticMLPConfig(name="m", observation_size=3, action_size=2, continuous=True))
    # The packaged model has the settings: the line names the one to change.
    assert _refusal(lambda: _ready(discrete).check_model(mlp)) == (
        "model.continuous: the environment's actions are discrete (Discrete(2)), but ActorCriticMLP has "
        "a `log_std` parameter for continuous ones: set model.continuous=false"
    )
    assert _refusal(lambda: _ready(box).get_actions(mlp, observations, False)) == (
        "model.action_size: the model gives actions of shape (2,), but the environment's are (1,) "
        "(Box(-2.0, 2.0, (1,), float32)): set model.action_size=1"
    )
    # A model without them: what the model must give, no key it does not have.
    refused = _refusal(lambda: _ready(discrete).get_actions(_ThreeLogits(), observations, False))
    assert refused == (
        "the model gives 3 action logits, but the environment has 2 actions: the model must give 2 logits"
    )
    refused = _refusal(lambda: _ready(box).get_actions(_ThreeLogits(), observations, False))
    assert refused.startswith("the model gives actions of shape (3,)")
    assert refused.endswith("the model must give means of shape (1,)")
    refused = _refusal(lambda: _ready(discrete).check_model(_GaussianOfTwo()))
    assert refused.endswith("continuous ones: the model must not have a `log_std` parameter")
    refused = _refusal(lambda: _ready(gymnasium.spaces.Box(-1.0, 1.0, shape=(3,))).get_actions(
        _ThreeLogits(), observations, False
    ))  # fmt: skip
    assert refused.endswith("(3,)"), refused  # has no log_std: what it must have
    assert "model." not in refused
    _ready(discrete).check_model(
        ActorCriticMLP(ActorCriticMLPConfig(name="m", observation_size=3, action_size=2))
    )


def test_a_linear_clip_range_follows_the_run_s_length_whichever_limit_sets_it() -> None:
    """task.max_steps limited the lr's schedule but not the clip range's (max_samples)."""

    def horizon(**limits: int) -> float:
        task = ClassicControlTask(
            PPOTaskConfig(
                name="classic_control",
                num_envs=2,
                num_env_steps=8,
                minibatch_size=16,
                clip_schedule="linear",
                **limits,
            )
        )
        # The clip range at half of what each limit allows.
        return task.clip_range(State(num_samples=800))

    assert horizon(max_samples=1600) == pytest.approx(0.1)
    assert horizon(max_steps=100) == pytest.approx(0.1)  # 100 iterations of 16 steps
    assert horizon(max_steps=100, max_samples=100_000) == pytest.approx(0.1)  # max_steps ends it first
    assert horizon(max_steps=10_000, max_samples=1600) == pytest.approx(0.1)  # max_samples first
