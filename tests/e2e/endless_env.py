"""Environments whose episodes never end (no time limit), with CartPole's observation and action
spaces, for ``task.env_id=endless_env:<id>`` with this folder on ``PYTHONPATH``:

* ``Endless-v0``: no episode ever ends;
* ``EndlessVideo-v0``: an episode ends after 5 steps, except the one recorded for a video
  (``render_mode="rgb_array"``), which never does.

An episode's 300th step leaves a file ``eval.<pid>`` in the folder ``$ENDLESS_MARKS`` names: only an
evaluation's (or a video's) episodes get that far in the tests (training steps each environment 32
times an iteration, for a few iterations). Past 200,000 steps it raises: a test that waits for an
episode to be stopped fails instead of hanging.
"""

import os
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np


class Endless(gymnasium.Env):
    observation_space = gymnasium.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
    action_space = gymnasium.spaces.Discrete(2)
    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, render_mode: str | None = None, ends_after: int | None = None) -> None:
        self.render_mode = render_mode
        self.ends_after = None if render_mode == "rgb_array" else ends_after

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(4, dtype=np.float32), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.t += 1
        if self.t == 300:
            (Path(os.environ["ENDLESS_MARKS"]) / f"eval.{os.getpid()}").touch()
        if self.t > 200_000:
            raise RuntimeError("an episode went on after the stop signal")
        ended = self.ends_after is not None and self.t >= self.ends_after
        return np.zeros(4, dtype=np.float32), 1.0, ended, False, {}

    def render(self) -> np.ndarray:
        return np.zeros((8, 8, 3), dtype=np.uint8)


gymnasium.register("Endless-v0", entry_point=Endless)
gymnasium.register("EndlessVideo-v0", entry_point=Endless, kwargs={"ends_after": 5})
