"""The packaged RL configs' schedules: what decays over the run ends with it, however long it is."""

import math

import pytest

from ml.core.compose import build_objects, compose_config
from ml.core.state import State

pytest.importorskip("gymnasium")


def test_cartpole_s_clip_range_and_learning_rate_reach_0_at_the_same_iteration() -> None:
    """The clip range followed a fixed 100,000 environment steps while the learning rate followed
    task.max_samples: with 200,000 PPO stopped clipping halfway through the run."""
    max_samples = 200_000  # twice the packaged config's
    objects = build_objects(compose_config(["cartpole"], [f"task.max_samples={max_samples}"]))
    task, schedule = objects.task, objects.lr_scheduler
    per_iteration = task.config.num_envs * task.config.num_env_steps
    iterations = math.ceil(max_samples / per_iteration)

    # Iteration k (from 1) updates with k - 1 steps done and its own rollout's samples counted.
    def scales(k: int) -> tuple[float, float]:
        return (
            schedule.get_lr_scale(State(num_steps=k - 1)),
            task.clip_range(State(num_steps=k - 1, num_samples=k * per_iteration)),
        )

    lr, clip = scales(iterations)
    assert lr == 0 and clip == 0
    lr, clip = scales(iterations - 1)
    assert lr > 0 and clip > 0
    lr, clip = scales(iterations // 2)
    assert lr == pytest.approx(0.5, abs=0.01) and clip == pytest.approx(0.1, abs=0.002)


@pytest.mark.parametrize(("max_steps", "iterations"), [(100, 100), (1000, 391)])
def test_cartpole_s_clip_range_and_learning_rate_end_together_when_max_steps_is_set(
    max_steps: int, iterations: int
) -> None:
    """The learning rate followed task.max_steps, the clip range task.max_samples: with 100 of the
    packaged 391 iterations the run ended clipping at 0.15; with 1000 (max_samples ends the run at
    391) the learning rate did not reach 0."""
    objects = build_objects(compose_config(["cartpole"], [f"task.max_steps={max_steps}"]))
    task, schedule = objects.task, objects.lr_scheduler
    per_iteration = task.config.num_envs * task.config.num_env_steps

    def scales(k: int) -> tuple[float, float]:
        return (
            schedule.get_lr_scale(State(num_steps=k - 1)),
            task.clip_range(State(num_steps=k - 1, num_samples=k * per_iteration)),
        )

    assert scales(iterations) == (0, 0)
    lr, clip = scales(iterations - 1)
    assert lr > 0 and clip > 0
