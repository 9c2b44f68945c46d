"""An environment whose episodes never end (no time limit), with CartPole's observation and action
spaces: ``task.env_id=endless_env:Endless-v0``, this folder on ``PYTHONPATH``.

An episode's 300th step leaves a file ``eval.<pid>`` in the folder ``$ENDLESS_MARKS`` names: only an
evaluation's episodes get that far in the tests (training steps each environment 32 times an
iteration, for a few iterations). Past 200,000 steps it raises: a test that waits for an evaluation
to be stopped fails instead of hanging.
"""

import os
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np


class Endless(gymnasium.Env):
    observation_space = gymnasium.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
    action_space = gymnasium.spaces.Discrete(2)

    def __init__(self, render_mode: str | None = None) -> None:
        self.render_mode = render_mode

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
        return np.zeros(4, dtype=np.float32), 1.0, False, False, {}


gymnasium.register("Endless-v0", entry_point=Endless)
