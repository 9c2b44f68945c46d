"""Tests of the classic-control task's environment state hook: a restored environment steps on exactly
as the one it was saved from, for each of gymnasium's classic-control environments."""

import numpy as np
import pytest

from ml.examples.classic_control import ClassicControlTask
from ml.tasks.ppo import PPOTaskConfig

gymnasium = pytest.importorskip("gymnasium")


# Acrobot resets its physics in float32 and steps in float64; MountainCarContinuous the other way round.
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "Acrobot-v1", "MountainCarContinuous-v0"])
def test_a_restored_environment_steps_on_exactly_as_the_saved_one(env_id: str) -> None:
    task = ClassicControlTask(PPOTaskConfig(name="classic_control", env_id=env_id))
    saved_from, restored = gymnasium.make(env_id), gymnasium.make(env_id)
    saved_from.reset(seed=1)
    saved_from.action_space.seed(2)
    actions = [saved_from.action_space.sample() for _ in range(25)]
    for action in actions[:5]:
        saved_from.step(action)
    state = task.get_single_env_state(saved_from)
    assert state is not None
    restored.reset(seed=123)  # as the trainer resumes: a reset with other seeds, then the saved state
    task.set_single_env_state(restored, state)
    for action in actions[5:]:
        expected, got = saved_from.step(action), restored.step(action)
        np.testing.assert_array_equal(got[0], expected[0])
        assert got[1:4] == expected[1:4]
        if expected[2] or expected[3]:  # the episode ended (CartPole's pole fell)
            break
    saved_from.close()
    restored.close()
