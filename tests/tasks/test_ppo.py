"""Tests of PPO's advantage estimation, its fused loss and its sampling.

The first test works on hand-made tensors; the second collects from real CartPole environments
whose time limit (5 steps) truncates episodes in the middle of the rollout and checks every
advantage against a plain per-environment recursion. Then the categorical loss's hand-written
backward pass is checked against autograd on the plain expressions, and sampled actions against
the policy's probabilities.
"""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ml.core.state import State
from ml.examples.classic_control import ActorCriticMLP, ActorCriticMLPConfig, ClassicControlTask
from ml.tasks.ppo import PPOTaskConfig, _CategoricalPPOLoss, compute_gae
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
        num_envs=2, num_env_steps=8, gamma=0.9, gae_lambda=0.8,
    )  # fmt: skip
    task = ClassicControlTask(config)
    torch.manual_seed(0)
    model = ActorCriticMLP(ActorCriticMLPConfig(name="m", observation_size=4, action_size=2))
    rollout = _Rollout(task, "sync", 2)
    task.on_environments_ready(rollout.envs.single_observation_space, rollout.envs.single_action_space)
    try:
        rollout.reset(env_seeds(0, 0, 2))
        trainer_config = OmegaConf.merge(
            OmegaConf.structured(ReinforcementLearningTrainerConfig), {"name": "rl", "exp_dir": str(tmp_path)}
        )
        trainer = ReinforcementLearningTrainer(trainer_config)  # type: ignore[arg-type]
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
