"""Tests of the rl trainer's pieces: seeds, the KL early stop, its vector environment, the resume warning.

Gradient clipping is ``ml.utils.grad_norm``'s (tests/utils/test_grad_norm.py)."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from ml.core.state import State
from ml.examples.classic_control import ActorCriticMLP, ActorCriticMLPConfig, ClassicControlTask
from ml.lr_schedulers.builtin import ConstantConfig, ConstantLRScheduler
from ml.optimizers.builtin import AdamConfig, AdamOptimizer
from ml.tasks.ppo import PPOTaskConfig
from ml.trainers.rl import (
    ReinforcementLearningTrainer,
    ReinforcementLearningTrainerConfig,
    SyncEnvs,
    _Rollout,
    env_seeds,
)

gymnasium = pytest.importorskip("gymnasium")


def test_every_environment_of_every_rank_gets_its_own_seed() -> None:
    seeds = [s for rank in range(3) for stream in range(2) for s in env_seeds(7, rank, 4, stream=stream)]
    assert len(set(seeds)) == len(seeds) == 24
    assert env_seeds(7, 0, 4) == env_seeds(7, 0, 4)  # and the same ones every time
    assert env_seeds(7, 0, 4) != env_seeds(8, 0, 4)


def _update_steps(
    tmp_path: Path, target_kl: float | None, wrap: Callable[[nn.Module], nn.Module] | None = None
) -> int:
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
    model.to(trainer.device)  # as the trainer's set-up places it (a GPU where there is one)
    try:
        rollout.reset(env_seeds(0, 0, 2), trainer.device)
        trajectory, _ = trainer._collect(rollout, task, model)
        dataset = task.build_rl_dataset(model, trajectory, State.init_state())
    finally:
        rollout.close()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer._update(State.init_state(), dataset, task, model if wrap is None else wrap(model), optim)
    return int(optim.state[next(iter(model.parameters()))]["step"])


def test_the_kl_early_stop_does_not_apply_the_minibatch_that_crossed_the_limit(tmp_path: Path) -> None:
    assert _update_steps(tmp_path, None) == 4 * (128 // 16)  # every minibatch of every epoch
    # The first minibatch has no divergence yet; the second crosses any positive limit and is skipped.
    assert _update_steps(tmp_path, 1e-12) == 1


def test_sync_envs_step_as_gymnasium_s_sync_vector_env() -> None:
    """Same observations, rewards, ends and final observations as SAME_STEP SyncVectorEnv."""
    from gymnasium.vector import AutoresetMode

    fns = [lambda: gymnasium.make("CartPole-v1", max_episode_steps=15)] * 3
    ours = SyncEnvs(fns)
    theirs = gymnasium.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)
    seeds: list[int | None] = [*env_seeds(0, 0, 3)]
    obs, _ = ours.reset(seed=seeds)
    expected, _ = theirs.reset(seed=seeds)
    np.testing.assert_array_equal(obs, expected)
    rng = np.random.default_rng(0)
    ends = 0
    for _ in range(60):
        actions = rng.integers(0, 2, size=3)
        got, want = ours.step(actions), theirs.step(actions)
        for a, b in zip(got[:4], want[:4], strict=True):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
        done = np.flatnonzero(got[2] | got[3])
        ends += len(done)
        for i in done:
            np.testing.assert_array_equal(got[4]["final_obs"][i], want[4]["final_obs"][i])
    assert ends > 3  # episodes ended by falling and by the time limit
    ours.close()
    theirs.close()


class Corridor(gymnasium.Env):
    """A user's own environment (not registered with gymnasium): walk right to the end."""

    observation_space = gymnasium.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
    action_space = gymnasium.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(4, dtype=np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros(4, dtype=np.float32), 1.0, bool(action), False, {}


class CorridorTask(ClassicControlTask):
    def get_environment(self, render_mode: str | None = None) -> gymnasium.Env:
        return Corridor()

    def get_env_state(self, envs: object) -> None:
        return None  # no state hook for it: resuming resets the environments


def test_the_resume_warning_names_the_user_s_own_environment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not the task's default env_id (CartPole-v1), which this task never makes."""
    task = CorridorTask(PPOTaskConfig(name="corridor", num_envs=2))
    trainer_config = OmegaConf.merge(
        OmegaConf.structured(ReinforcementLearningTrainerConfig), {"name": "rl", "exp_dir": str(tmp_path)}
    )
    trainer = ReinforcementLearningTrainer(trainer_config)  # type: ignore[arg-type]
    rollout = _Rollout(task, "sync", 2)
    try:
        saved = {
            "env_state": None,
            "observations": torch.zeros(2, 4),
            "num_episodes": 3,
            "episode_returns": torch.zeros(2),
            "episode_lengths": torch.zeros(2),
        }
        trainer._saved_rl = saved
        trainer._start_environments(rollout, task, State(num_steps=5))
    finally:
        rollout.close()
    assert "usable state of the Corridor environments" in caplog.text
    assert "CartPole" not in caplog.text
    assert task.config.env_id == "CartPole-v1"  # the default the old warning named


class _FreezesItsValueHead(ClassicControlTask):
    """Keeps the value network in eval mode (as a user freezes a part), and records the modes of the
    model's forward passes: (acting or evaluating, model, value network)."""

    def __init__(self, config: PPOTaskConfig) -> None:
        super().__init__(config)
        self.seen_modes: list[tuple[bool, bool, bool]] = []

    def on_training_start(self, state, model, optim, lr_sched) -> None:  # type: ignore[no-untyped-def]
        model.value.eval()
        model.register_forward_pre_hook(
            lambda module, args: self.seen_modes.append(
                (
                    torch.is_inference_mode_enabled() or not torch.is_grad_enabled(),
                    module.training,
                    module.value.training,
                )
            )
        )


def test_acting_and_evaluating_leave_a_frozen_submodule_frozen_for_the_updates(tmp_path: Path) -> None:
    config = PPOTaskConfig(
        name="classic_control", env_id="CartPole-v1", num_envs=2, num_env_steps=16,
        minibatch_size=16, num_update_epochs=1, max_steps=2,
    )  # fmt: skip
    task = _FreezesItsValueHead(config)
    model = ActorCriticMLP(ActorCriticMLPConfig(name="m", observation_size=4, action_size=2))
    trainer_config = OmegaConf.merge(
        OmegaConf.structured(ReinforcementLearningTrainerConfig),
        {"name": "rl", "exp_dir": str(tmp_path), "eval_every_n_iterations": 1, "num_eval_episodes": 2},
    )
    trainer = ReinforcementLearningTrainer(trainer_config)  # type: ignore[arg-type]
    trainer.train(
        model,
        task,
        AdamOptimizer(AdamConfig(name="adam")),
        ConstantLRScheduler(ConstantConfig(name="constant")),
    )
    acting = {modes[1:] for modes in task.seen_modes if modes[0]}
    updating = {modes[1:] for modes in task.seen_modes if not modes[0]}
    assert acting == {(False, False)}
    assert updating == {(True, False)}
    assert model.training and not model.value.training


def test_an_update_of_a_ddp_model_a_hook_left_in_eval_mode_trains_in_train_mode(tmp_path: Path) -> None:
    """The trainer updates through the DDP wrapper; a hook's ``model.eval()`` reaches the model inside
    it, whose flag is the one to check (DDP's own stays on)."""
    modes: list[bool] = []

    def forgotten_in_eval_mode(model: nn.Module) -> nn.Module:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        model.eval()  # as a hook would, on the model it is given
        model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
        return ddp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert _update_steps(tmp_path, None, wrap=forgotten_in_eval_mode) > 0
    finally:
        dist.destroy_process_group()
    assert modes and all(modes)
