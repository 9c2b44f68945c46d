"""Tests of the rl trainer's pieces: per-environment seeds and the KL early stop of the update."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ml.core.state import State
from ml.examples.classic_control import ActorCriticMLP, ActorCriticMLPConfig, ClassicControlTask
from ml.tasks.ppo import PPOTaskConfig
from ml.trainers.rl import (
    ReinforcementLearningTrainer,
    ReinforcementLearningTrainerConfig,
    _Rollout,
    env_seeds,
)

pytest.importorskip("gymnasium")


def test_every_environment_of_every_rank_gets_its_own_seed() -> None:
    seeds = [s for rank in range(3) for stream in range(2) for s in env_seeds(7, rank, 4, stream=stream)]
    assert len(set(seeds)) == len(seeds) == 24
    assert env_seeds(7, 0, 4) == env_seeds(7, 0, 4)  # and the same ones every time
    assert env_seeds(7, 0, 4) != env_seeds(8, 0, 4)


def _update_steps(tmp_path: Path, target_kl: float | None) -> int:
    config = PPOTaskConfig(
        name="classic_control", env_id="CartPole-v1", num_envs=2, num_env_steps=64,
        minibatch_size=16, num_update_epochs=4, target_kl=target_kl,
    )  # fmt: skip
    task = ClassicControlTask(config)
    torch.manual_seed(0)
    model = ActorCriticMLP(ActorCriticMLPConfig(name="m", observation_size=4, action_size=2))
    rollout = _Rollout(task, "sync", 2)
    task.on_environments_ready(rollout.envs.single_observation_space, rollout.envs.single_action_space)
    trainer_config = OmegaConf.merge(
        OmegaConf.structured(ReinforcementLearningTrainerConfig), {"name": "rl", "exp_dir": str(tmp_path)}
    )
    trainer = ReinforcementLearningTrainer(trainer_config)  # type: ignore[arg-type]
    try:
        rollout.reset(env_seeds(0, 0, 2))
        trajectory, _ = trainer._collect(rollout, task, model)
        dataset = task.build_rl_dataset(model, trajectory, State.init_state())
    finally:
        rollout.close()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer._update(State.init_state(), dataset, task, model, optim)
    return int(optim.state[next(iter(model.parameters()))]["step"])


def test_the_kl_early_stop_does_not_apply_the_minibatch_that_crossed_the_limit(tmp_path: Path) -> None:
    assert _update_steps(tmp_path, None) == 4 * (128 // 16)  # every minibatch of every epoch
    # The first minibatch has no divergence yet; the second crosses any positive limit and is skipped.
    assert _update_steps(tmp_path, 1e-12) == 1
