"""Tests of PPO's advantage estimation: bootstrapping at truncation, none at termination.

The first test works on hand-made tensors; the second collects from real CartPole environments
whose time limit (5 steps) truncates episodes in the middle of the rollout and checks every
advantage against a plain per-environment recursion.
"""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ml.core.state import State
from ml.examples.classic_control import ActorCriticMLP, ActorCriticMLPConfig, ClassicControlTask
from ml.tasks.ppo import PPOTaskConfig, compute_gae
from ml.trainers.rl import (
    ReinforcementLearningTrainer,
    ReinforcementLearningTrainerConfig,
    _Rollout,
    env_seeds,
)

pytest.importorskip("gymnasium")


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
