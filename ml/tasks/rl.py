"""Defines :class:`ReinforcementLearningTask`: environments, acting, and turning experience into samples.

A reinforcement-learning task says which gymnasium environment to train in (:meth:`get_environment`:
any registered id, or override it to build your own class), how the model acts
(:meth:`get_actions`), how collected trajectories become training samples
(:meth:`build_rl_dataset`), and the loss (:meth:`run_model`, :meth:`compute_loss`, as in the
supervised task). ``ml.trainers.rl`` runs the environments, the rollouts and the updates.

Exact resume needs the environments' own state. :meth:`get_env_state` / :meth:`set_env_state`
save and restore it as tensors and plain data (never pickled objects); the defaults ask
:meth:`get_single_env_state` / :meth:`set_single_env_state` for each environment of a synchronous
vector environment, and return None (resume resets the environments) when those are not
implemented. gymnasium is imported only when an environment is made, so importing this module stays
cheap.
"""

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import nn

from ml.core.compose import ConfigError
from ml.core.config import conf_field
from ml.core.state import State
from ml.tasks.base import BaseTask, BaseTaskConfig

if TYPE_CHECKING:
    import gymnasium


@dataclass
class ReinforcementLearningTaskConfig(BaseTaskConfig):
    """Limits: ``max_steps`` counts iterations (rollout + update), ``max_samples`` environment steps."""

    seed: int = conf_field(1337, help="Seed of the run's generators and of each environment's")
    env_id: str = conf_field("CartPole-v1", help="A registered gymnasium environment id")
    env_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Arguments of gymnasium.make"})
    num_envs: int = conf_field(8, help="Environments stepped together")
    num_env_steps: int = conf_field(
        32, help="Steps each environment takes per iteration (transitions = num_envs * num_env_steps)"
    )
    num_update_epochs: int = conf_field(10, help="Passes over each iteration's samples")
    minibatch_size: int = conf_field(64, help="Samples per gradient step")


def environment_name(env: Any) -> str:
    """What an environment is, in words: its registered id, else its class's name."""
    spec = getattr(env, "spec", None)
    if spec is not None and getattr(spec, "id", None):
        return str(spec.id)
    return type(getattr(env, "unwrapped", env)).__name__


def _sample_action(space: Any, info: Any) -> Any:
    """A random action of ``space``, among those ``info["action_mask"]`` allows when it has one."""
    mask = info.get("action_mask") if isinstance(info, dict) else None
    if mask is None:
        return space.sample()
    if isinstance(mask, np.ndarray):  # gymnasium's Discrete and MultiBinary take int8 masks
        mask = mask.astype(np.int8)
    return space.sample(mask=mask)


RLTaskConfigT = TypeVar("RLTaskConfigT", bound=ReinforcementLearningTaskConfig)


class ReinforcementLearningTask(BaseTask[RLTaskConfigT]):
    """A task that learns by acting in environments.

    Attributes:
        observation_space: The single environment's observation space (set by the trainer).
        action_space: The single environment's action space (set by the trainer).
    """

    def __init__(self, config: RLTaskConfigT) -> None:
        super().__init__(config)
        for key in ("num_envs", "num_env_steps", "num_update_epochs", "minibatch_size"):
            if getattr(config, key) < 1:
                raise ConfigError(f"task.{key} must be positive, got {getattr(config, key)}")
        rollout = config.num_envs * config.num_env_steps
        if config.minibatch_size > rollout:
            raise ConfigError(
                f"task.minibatch_size must be at most the rollout's {rollout} transitions "
                f"(task.num_envs * task.num_env_steps), got {config.minibatch_size}"
            )
        steps = config.env_kwargs.get("max_episode_steps")
        if isinstance(steps, bool):  # an int to Python: gymnasium's TimeLimit would take true as 1
            raise ConfigError(f"task.env_kwargs.max_episode_steps must be a positive integer, got {steps}")
        self.observation_space: Any = None
        self.action_space: Any = None

    # -- environments

    def get_environment(self, render_mode: str | None = None) -> "gymnasium.Env":
        """Makes one environment (``task.env_id`` with ``task.env_kwargs``).

        Raises:
            ConfigError: gymnasium does not know the id or cannot import the module it names, or the
                environment rejects the arguments (an argument it does not take, or a value it
                refuses with ValueError or AssertionError).
        """
        import gymnasium

        kwargs = dict(self.config.env_kwargs)
        try:
            return gymnasium.make(self.config.env_id, render_mode=render_mode, **kwargs)
        except (gymnasium.error.Error, ImportError) as e:  # `module:Env-v0` imports the module
            raise ConfigError(f"task.env_id: cannot make environment {self.config.env_id!r}: {e}") from e
        except (TypeError, ValueError, AssertionError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise self._refused(f"{self.config.env_id} refuses {kwargs or 'its defaults'}: {reason}") from e

    def check_environment(self, env: "gymnasium.Env") -> None:
        """With ``task.env_kwargs``: resets ``env`` (seed 0) and steps it once, before the run starts.

        An argument the environment takes when it is made may break it only when it runs (Pendulum's
        ``g=abc``); found here, it is bad input, refused before anything is on disk, rather than the
        first rollout's failure. Whatever the reset or the step raises is refused: the line names the
        environment, the arguments and the error's type and text, as it may as well be a bug in the
        environment itself (``--debug`` shows its traceback). Without arguments of the user's there
        is nothing to probe: an environment's own bug shows as the training failure it is.

        The step's action is sampled with the mask the reset's info gives as ``action_mask``
        (gymnasium's convention), so an environment that refuses illegal actions is not refused.

        Raises:
            ConfigError: The reset or the step raised.
        """
        kwargs = dict(self.config.env_kwargs)
        if not kwargs:
            return
        where = "reset"
        try:
            _, info = env.reset(seed=0)
            where = "step"
            env.action_space.seed(0)
            env.step(_sample_action(env.action_space, info))
        except Exception as e:  # anything: the arguments are what the user can change
            reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
            raise ConfigError(
                f"task.env_kwargs: {environment_name(env)} with {kwargs} fails at its first {where}: {reason}"
            ) from e

    def _refused(self, message: str) -> ConfigError:
        """The error for an environment that refuses its arguments: it names ``task.env_kwargs``, or
        without arguments of the user's, ``task.env_id``, the one thing left to change."""
        key = "task.env_kwargs" if self.config.env_kwargs else "task.env_id"
        return ConfigError(f"{key}: {message}")

    def on_environments_ready(self, observation_space: Any, action_space: Any) -> None:
        """Called by the trainer with the single environment's spaces before anything runs."""
        self.observation_space = observation_space
        self.action_space = action_space

    def check_model(self, model: nn.Module) -> None:
        """Called by the trainer before anything runs, after :meth:`on_environments_ready`: raise
        ``ConfigError`` for a model that cannot act in these environments. By default nothing (the
        trainer acts once on a sample observation anyway)."""
        del model

    def get_single_env_state(self, env: "gymnasium.Env") -> dict[str, Any] | None:
        """One environment's state as tensors and plain data, or None when it cannot be saved."""
        del env
        return None

    def set_single_env_state(self, env: "gymnasium.Env", state: dict[str, Any]) -> None:
        """Restores what :meth:`get_single_env_state` returned (the environment was just reset)."""
        raise NotImplementedError

    def get_env_state(self, envs: Any) -> list[dict[str, Any]] | None:
        """The vector environment's state, or None when it cannot be saved (e.g. subprocess workers)."""
        sub_envs = getattr(envs, "envs", None)
        if sub_envs is None:
            return None
        states = [self.get_single_env_state(env) for env in sub_envs]
        complete = [s for s in states if s is not None]
        return complete if len(complete) == len(states) else None

    def set_env_state(self, envs: Any, state: list[dict[str, Any]]) -> None:
        """Restores :meth:`get_env_state`'s result into freshly reset environments."""
        for env, env_state in zip(envs.envs, state, strict=True):
            self.set_single_env_state(env, env_state)

    # -- acting and learning

    @abstractmethod
    def get_actions(
        self, model: nn.Module, observations: torch.Tensor, optimal: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Chooses actions for a batch of observations (one per environment).

        Args:
            model: The model being trained.
            observations: ``(num_envs, *observation_shape)``.
            optimal: Act deterministically (evaluation) instead of sampling (exploration).

        Returns:
            The actions, ``(num_envs, *action_shape)``, and per-environment tensors the update
            needs later (e.g. log-probabilities and values), each with a leading ``num_envs`` dim.
        """

    @abstractmethod
    def build_rl_dataset(
        self, model: nn.Module, trajectory: dict[str, torch.Tensor], state: State
    ) -> dict[str, torch.Tensor]:
        """Turns one iteration's experience into training samples.

        Args:
            model: The model being trained (e.g. to value final observations).
            trajectory: ``(num_env_steps, num_envs, ...)`` tensors ``observations``, ``actions``,
                ``rewards``, ``terminated``, ``truncated``, ``final_observations`` (the observation
                an episode ended in, where it ended; zeros elsewhere), whatever :meth:`get_actions`
                returned, and ``next_observations`` ``(num_envs, ...)``, where the next rollout starts.
            state: The trainer state.

        Returns:
            Tensors with one leading sample dimension; the trainer draws minibatches from them.
        """

    def run_model(self, model: nn.Module, batch: dict[str, torch.Tensor], state: State) -> Any:
        """The forward pass on a minibatch; by default ``model(batch["observations"])``."""
        del state
        return model(batch["observations"])

    @abstractmethod
    def compute_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], state: State, output: Any
    ) -> dict[str, torch.Tensor]:
        """Returns named losses (summed for the backward pass, each logged)."""

    def update_stop_flag(self) -> torch.Tensor | None:
        """Whether to end this iteration's update early (e.g. PPO's KL limit), asked after each
        :meth:`compute_loss`: a tensor on the device, true or nonzero to stop (that minibatch is not
        applied either), or None (the default) for a task that never stops early.

        The trainer reads the flag on the host together with its own check of the minibatch's loss
        (one read per minibatch, which such a task needs anyway); without a flag it reads nothing
        per minibatch.
        """
        return None

    def on_minibatches_skipped(self, minibatches: list[int]) -> None:
        """Called at the end of an update whose minibatches ``minibatches`` (numbered from 1, in the
        order :meth:`compute_loss` saw them) were not applied, their values not being finite
        (``trainer.non_finite_loss=skip``): statistics kept per minibatch leave them out, as the
        trainer's logged losses do. By default nothing."""
        del minibatches
