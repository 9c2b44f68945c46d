"""Defines the reinforcement-learning examples: an actor-critic MLP and PPO on classic control.

``actor_critic_mlp`` (model) has separate policy and value networks, orthogonally initialised as in
Stable-Baselines3. ``classic_control`` (task) is :class:`~ml.tasks.ppo.PPOTask` plus the environment
state hook that makes resume exact for gymnasium's classic-control environments (CartPole,
Pendulum, Acrobot, MountainCar): the physics state, the steps the time limit has counted and the
environment's generator state, saved as tensors and JSON strings. The packaged configs
``cartpole`` and ``pendulum`` use them (``ml train cartpole``).
"""

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ml.core.config import MISSING, conf_field
from ml.core.registry import register_model, register_task
from ml.models.base import BaseModel, BaseModelConfig
from ml.tasks.ppo import PPOTask, PPOTaskConfig

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
_FUNCTIONS = {"tanh": torch.tanh, "relu": torch.relu}


@dataclass
class ActorCriticMLPConfig(BaseModelConfig):
    observation_size: int = conf_field(MISSING, help="Size of the (flat) observation")
    action_size: int = conf_field(MISSING, help="Number of discrete actions, or size of a continuous action")
    continuous: bool = conf_field(False, help="Gaussian policy over a continuous action (with log_std)")
    hidden: int = conf_field(64, help="Width of the hidden layers")
    num_layers: int = conf_field(2, help="Hidden layers of each network")
    activation: str = conf_field("tanh", help="tanh or relu")
    log_std_init: float = conf_field(0.0, help="Initial log standard deviation of a continuous policy")


def _mlp(sizes: list[int], activation: type[nn.Module], out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        linear = nn.Linear(a, b)
        last = i == len(sizes) - 2
        nn.init.orthogonal_(linear.weight, out_gain if last else math.sqrt(2))
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if not last:
            layers.append(activation())
    return nn.Sequential(*layers)


@register_model("actor_critic_mlp")
class ActorCriticMLP(BaseModel[ActorCriticMLPConfig]):
    """Observations to ``(policy output, value)``: logits or Gaussian means, and a state value."""

    def __init__(self, config: ActorCriticMLPConfig) -> None:
        super().__init__(config)
        if config.activation not in _ACTIVATIONS:
            raise ValueError(
                f"model.activation must be one of {sorted(_ACTIVATIONS)}, got {config.activation!r}"
            )
        act = _ACTIVATIONS[config.activation]
        hidden = [config.hidden] * config.num_layers
        self.policy = _mlp([config.observation_size, *hidden, config.action_size], act, 0.01)
        self.value = _mlp([config.observation_size, *hidden, 1], act, 1.0)
        if config.continuous:
            self.log_std = nn.Parameter(torch.full((config.action_size,), float(config.log_std_init)))
        self._activation = _FUNCTIONS[config.activation]

    def forward(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        observations = observations.flatten(1)
        return self._run(self.policy, observations), self._run(self.value, observations).squeeze(-1)

    def _run(self, mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """``mlp(x)`` as plain functional calls (a 64-unit layer costs less than a module call does).

        The layers' own forward hooks are not called; the parameters are the layers'.
        """
        layers: list[Any] = list(mlp._modules.values())  # linear, activation, ..., linear (see _mlp)
        for linear in layers[:-1:2]:
            x = self._activation(F.linear(x, linear.weight, linear.bias))
        return F.linear(x, layers[-1].weight, layers[-1].bias)


def _time_limit(env: Any) -> Any:
    from gymnasium.wrappers import TimeLimit

    while env is not None:
        if isinstance(env, TimeLimit):
            return env
        env = getattr(env, "env", None)
    return None


@register_task("classic_control")
class ClassicControlTask(PPOTask[PPOTaskConfig]):
    """PPO on a gymnasium classic-control environment, with exact resume of the environments."""

    def get_single_env_state(self, env: Any) -> dict[str, Any] | None:
        inner = env.unwrapped
        if getattr(inner, "state", None) is None:
            return None
        limit = _time_limit(env)
        extra = {
            key: getattr(inner, key) for key in ("steps_beyond_terminated", "last_u") if hasattr(inner, key)
        }
        return {
            # In its own dtype: Acrobot resets in float32 and steps in float64, MountainCarContinuous
            # the other way round; either cast would change the next step's numbers.
            "physics": torch.as_tensor(np.array(inner.state)),
            "elapsed_steps": None if limit is None else int(limit._elapsed_steps),
            "np_random": json.dumps(inner.np_random.bit_generator.state),
            "extra": json.dumps({k: None if v is None else float(v) for k, v in extra.items()}),
        }

    def set_single_env_state(self, env: Any, state: dict[str, Any]) -> None:
        inner = env.unwrapped
        inner.state = state["physics"].cpu().numpy().copy()  # as it was saved, dtype included
        limit = _time_limit(env)
        if limit is not None and state["elapsed_steps"] is not None:
            limit._elapsed_steps = int(state["elapsed_steps"])
        inner.np_random.bit_generator.state = json.loads(state["np_random"])
        for key, value in json.loads(state["extra"]).items():
            if key == "steps_beyond_terminated" and value is not None:
                value = int(value)
            setattr(inner, key, value)
