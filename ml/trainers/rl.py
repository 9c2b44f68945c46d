"""Defines :class:`ReinforcementLearningTrainer` (``rl``): rollouts in gymnasium environments, then updates.

Each iteration (one trainer step): collect ``task.num_env_steps`` steps from each of
``task.num_envs`` environments with batched inference under ``torch.inference_mode``; let the task
build the dataset (for PPO: GAE advantages and returns); run ``task.num_update_epochs`` passes of
minibatch updates; log; evaluate the deterministic policy every ``eval_every_n_iterations``;
checkpoint; check for a stop. ``state.num_steps`` counts iterations, ``state.num_samples``
environment steps.

Vector semantics are explicit: gymnasium's ``SAME_STEP`` autoreset, so an episode's final
observation arrives in the step that ends it (and a truncated episode is bootstrapped from its
value), and every environment is seeded from ``(task.seed, rank, env index)``. Environments run in
this process (``vectorization=sync``: :class:`SyncEnvs`, a lean equivalent of gymnasium's
``SyncVectorEnv``) or in subprocess workers (``async``). Native vectorised environments
(``gymnasium.make_vec``) are not used: CartPole's supports only ``NEXT_STEP`` autoreset and one
seed for all its copies, which would give up both of the above.

Speed, for small models on a CPU, where per-operation overhead outweighs arithmetic: a rollout runs
under one ``inference_mode`` and keeps what the environments return in NumPy arrays until its
end; an update drops gradients by setting them to None, clips them with one ``foreach`` norm, and
steps a fused Adam through its kernel directly (:class:`ml.optimizers.fast.FusedAdamStep`); a
minibatch that holds the whole rollout is not shuffled, as its gradient does not depend on the order.

NaN/inf (``trainer.non_finite_loss``, as in ``sl``): each minibatch's loss, and its gradient norm
where clipping measures it, is checked on the device, an update that has one is skipped there, and
the update's record is read once when it ends (a task with an early stop, such as PPO's KL limit,
has its flag read per minibatch anyway: the loss's check is read with it). ``stop`` then stops,
naming the iteration and minibatch; ``skip`` counts the skipped updates (``trainer/skipped_steps``).
No checkpoint is saved with weights that are not finite. A skipped minibatch's losses and the task's
statistics of it stay out of the iteration's logged means.

``rl/episode_return`` and ``rl/episode_length`` are means over the last 100 episodes the job
finished (:class:`EpisodeWindow`, as Stable-Baselines3's ``ep_rew_mean``), logged at every write.

Resume is exact at iteration boundaries: besides model, optimizer, schedule, counters and every
global generator, the checkpoint holds the observations the next rollout starts from, the running
episode returns and lengths, the window of finished episodes the logged means are over
(:class:`EpisodeWindow`), and the environments' own state through the task's
``get_env_state`` hook (physics, time-limit step counts, generator states), all as tensors and
plain data. An environment without that hook is reset on resume, and the trainer says so.
"""

import contextlib
import functools
import importlib.util
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

from ml.core.config import conf_field
from ml.core.registry import register_trainer
from ml.core.state import State
from ml.errors import ConfigError, NonFiniteLossError
from ml.lr_schedulers.base import BaseLRScheduler, SchedulerAdapter
from ml.models.base import BaseModel, eval_mode
from ml.optimizers.base import BaseOptimizer
from ml.optimizers.fast import FusedAdamStep, step_skipping, use_fast_optimizer
from ml.tasks.rl import ReinforcementLearningTask, environment_name
from ml.trainers.base import BaseTrainer, Session, TrainerConfig, check_interval, check_trainer_config
from ml.trainers.parallel import expects_every_gradient, require_every_gradient, wrap_model
from ml.utils.checkpoint import unwrap_model
from ml.utils.distributed import (
    all_gather_object,
    all_max,
    control_group,
    get_rank,
    get_world_size,
    is_master,
    mean_over_ranks,
)
from ml.utils.grad_norm import clip_grad_norm_
from ml.utils.malloc import tune_malloc
from ml.utils.nonfinite import NonFiniteRecord, NonFiniteStep, all_finite, float_buffers
from ml.utils.progress import TrainingBar, expected_total
from ml.utils.seeding import deterministic_algorithms

logger = logging.getLogger(__name__)

VECTORIZATIONS = ("sync", "async")


@dataclass
class ReinforcementLearningTrainerConfig(TrainerConfig):
    vectorization: str = conf_field("sync", help="`sync` (in this process) or `async` (subprocess workers)")
    num_threads: int | None = conf_field(
        1, help="torch CPU threads (1 suits small MLPs beside environment work; null: leave torch's)"
    )
    clip_grad_norm: float | None = conf_field(0.5, help="Clip the gradient norm to this value")
    eval_every_n_iterations: int | None = conf_field(10, help="Evaluate the deterministic policy every N")
    num_eval_episodes: int = conf_field(10, help="Episodes per evaluation (run side by side)")
    eval_at_end: bool = conf_field(True, help="Evaluate once more when training ends")
    record_video: bool = conf_field(
        False, help="Record one evaluation episode per evaluation (needs moviepy)"
    )
    non_finite_loss: str = conf_field(
        "stop", help="On a NaN/inf loss or gradient: `stop` with an error, or `skip` that minibatch's update"
    )
    deterministic: bool = conf_field(False, help="Use only deterministic kernels (bit-exact resume)")


def env_seeds(seed: int, rank: int, count: int, stream: int = 0) -> list[int]:
    """Independent seeds for ``count`` environments from ``(seed, rank, stream, env index)``."""
    return [
        int(np.random.SeedSequence(seed, spawn_key=(rank, stream, i)).generate_state(1)[0])
        for i in range(count)
    ]


def _total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of the named losses (each summed first, if not a scalar)."""
    total: torch.Tensor | None = None
    for value in losses.values():
        term = value if value.dim() == 0 else value.sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("compute_loss returned no losses")
    return total


def _mean_losses(
    recorded: list[tuple[int, dict[str, torch.Tensor]]], skipped: set[int]
) -> dict[str, torch.Tensor]:
    """Each named loss's mean over the minibatches ``(number, losses)`` not ``skipped``."""
    values: dict[str, list[torch.Tensor]] = {}
    for number, losses in recorded:
        if number not in skipped:
            for name, value in losses.items():
                values.setdefault(name, []).append(value)
    return {name: torch.stack(kept).mean(0) for name, kept in values.items()}


EPISODE_WINDOW = 100  # finished episodes the logged return and length average over (as SB3's ep_rew_mean)


class EpisodeWindow:
    """The job's last :data:`EPISODE_WINDOW` finished episodes, and how many it has finished.

    ``rl/episode_return`` and ``rl/episode_length`` are the means over the window, logged at every
    write once an episode has ended: Stable-Baselines3's ``ep_rew_mean`` and ``ep_len_mean``. Every
    episode enters the window whether or not its iteration is written, and a mean does not swing
    with the few episodes that happened to end in one iteration. In a job each rank adds every
    rank's episodes, in rank order (one all-gather per iteration), so the window is the job's, the
    same on every rank. Checkpoints hold it (:meth:`state_dict`): a resumed run logs the same means.

    Attributes:
        returns: The window's returns, oldest first.
        lengths: The window's lengths, oldest first.
        episodes: Episodes every rank has finished so far (``rl/episodes``).
    """

    def __init__(self, size: int = EPISODE_WINDOW) -> None:
        self.returns: deque[float] = deque(maxlen=size)
        self.lengths: deque[int] = deque(maxlen=size)
        self.episodes = 0

    def add(self, finished: list[tuple[float, int]]) -> None:
        """Adds the episodes that ended in this iteration on every rank, and counts them.

        The count is the job's, kept here and saved with the window: a run resumed with another
        number of processes goes on counting from it (a sum of the ranks' own counts lost those of
        the ranks that were gone).

        Args:
            finished: This rank's, as ``(return, length)`` in the order they ended.
        """
        for rank_finished in all_gather_object(finished):
            for episode_return, length in rank_finished:
                self.returns.append(episode_return)
                self.lengths.append(length)
            self.episodes += len(rank_finished)

    def mean_return(self) -> float | None:
        return sum(self.returns) / len(self.returns) if self.returns else None

    def stats(self) -> dict[str, float]:
        """``rl/episodes``, and the window's means once an episode has ended."""
        stats = {"rl/episodes": float(self.episodes)}
        if self.returns:
            count = len(self.returns)
            stats |= {
                "rl/episode_return": sum(self.returns) / count,
                "rl/episode_length": sum(self.lengths) / count,
            }
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "window_returns": torch.tensor(list(self.returns), dtype=torch.float64),
            "window_lengths": torch.tensor(list(self.lengths), dtype=torch.int64),
            "window_episodes": self.episodes,
        }

    def load_state_dict(self, state: dict[str, Any], episodes_before: int = 0) -> None:
        """Restores :meth:`state_dict`'s window and count.

        A checkpoint saved before the window was has none: the window starts empty, which is said
        once (the logged means jump to the episodes the resumed run finishes), and the count goes on
        from ``episodes_before``, what such a checkpoint held instead.
        """
        self.returns.clear()
        self.lengths.clear()
        if "window_returns" not in state:
            self.episodes = episodes_before
            if get_rank() == 0:  # the window is the job's: one line for it
                logger.warning(
                    "The checkpoint holds no window of finished episodes (it was saved by an older "
                    "version): rl/episode_return and rl/episode_length start over from the episodes "
                    "the resumed run finishes"
                )
            return
        self.returns.extend(float(r) for r in state["window_returns"].tolist())
        self.lengths.extend(int(n) for n in state["window_lengths"].tolist())
        self.episodes = int(state["window_episodes"])


class SyncEnvs:
    """Environments stepped one after another in this process, with gymnasium's ``SAME_STEP`` autoreset.

    The part of ``gymnasium.vector.SyncVectorEnv`` the trainer uses, with less work per step: each
    environment gets its row of the action array, observations are stacked into a new array (no
    copy of a shared buffer), and the infos hold only ``final_obs``, keyed by the index of each
    environment whose episode ended (gymnasium's per-environment infos are not merged). As in
    gymnasium's, an environment whose episode ended is reset at once, without a seed, and its first
    observation is returned.

    Attributes:
        envs: The environments (the task's environment state hooks read and restore them).
    """

    def __init__(self, fns: list[Any]) -> None:
        self.envs = [fn() for fn in fns]
        self.num_envs = len(self.envs)
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self._rewards = np.zeros(self.num_envs, dtype=np.float64)
        self._terminated = np.zeros(self.num_envs, dtype=np.bool_)
        self._truncated = np.zeros(self.num_envs, dtype=np.bool_)
        self._obs: list[Any] = [None] * self.num_envs

    def reset(self, seed: Sequence[int | None] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        seeds = seed if seed is not None else [None] * self.num_envs
        self._obs = [env.reset(seed=s)[0] for env, s in zip(self.envs, seeds, strict=True)]
        return np.stack(self._obs), {}

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Steps every environment; ``infos["final_obs"][i]`` is where environment ``i``'s episode ended."""
        obs, rewards, terminated, truncated = self._obs, self._rewards, self._terminated, self._truncated
        final: dict[int, Any] = {}
        for i, env in enumerate(self.envs):
            o, rewards[i], term, trunc, _ = env.step(actions[i])
            terminated[i], truncated[i] = term, trunc
            if term or trunc:
                final[i] = o
                o, _ = env.reset()
            obs[i] = o
        infos = {"final_obs": final} if final else {}
        return np.stack(obs), rewards.copy(), terminated.copy(), truncated.copy(), infos

    def close(self) -> None:
        for env in self.envs:
            env.close()


def make_sync_envs(fns: list[Any]) -> Any:
    """:class:`SyncEnvs` for environments with ``Box`` observations; gymnasium's ``SyncVectorEnv`` otherwise.

    Both autoreset in the step that ends an episode (``SAME_STEP``) and put its last observation in
    ``infos["final_obs"][i]``.
    """
    import gymnasium
    from gymnasium import spaces
    from gymnasium.vector import AutoresetMode

    envs = SyncEnvs(fns)
    if isinstance(envs.single_observation_space, spaces.Box) and isinstance(
        envs.single_action_space, (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)
    ):
        return envs
    envs.close()
    return gymnasium.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)


class _Rollout:
    """The environments of one run and where they stand: observations, running episode totals."""

    def __init__(self, task: ReinforcementLearningTask, vectorization: str, count: int) -> None:
        import gymnasium
        from gymnasium.vector import AutoresetMode

        # A bad id or argument fails here, in this process, clearly: when the environment is made, or
        # (an argument of task.env_kwargs that breaks only when it runs) at a reset and a step of the probe.
        probe = task.get_environment()
        try:
            _check_observations(probe, task)
            task.check_environment(probe)
        finally:
            probe.close()
        fns = [task.get_environment for _ in range(count)]
        if vectorization == "async":
            self.envs: Any = gymnasium.vector.AsyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)
        else:
            self.envs = make_sync_envs(fns)
        self.count = count
        self.observations = torch.empty(0)
        self.episode_returns = np.zeros(count, dtype=np.float64)
        self.episode_lengths = np.zeros(count, dtype=np.int64)

    def reset(self, seeds: list[int], device: torch.device | str = "cpu") -> None:
        obs, _ = self.envs.reset(seed=seeds)
        self.observations = torch.as_tensor(obs, dtype=torch.float32, device=device)
        self.episode_returns[:] = 0
        self.episode_lengths[:] = 0

    def close(self) -> None:
        self.envs.close()


def _check_observations(env: Any, task: ReinforcementLearningTask) -> None:
    """Refuses observations that are not one array (a ``Box``): the rollout stacks them into a
    float tensor, which a tuple or dict of observations would become transposed or not at all."""
    from gymnasium import spaces

    space = env.observation_space
    if not isinstance(space, spaces.Box):
        raise ConfigError(
            f"task.env_id: the rl trainer takes observations that are one array (a Box space); "
            f"{_env_name(env, task)}'s are {space} (flatten them, e.g. with gymnasium.wrappers."
            "FlattenObservation, in the task's get_environment)"
        )


def _env_name(envs: Any, task: ReinforcementLearningTask) -> str:
    """What the environments (or one environment) are, in words: their registered id, else the
    environment's class."""
    env = envs.envs[0] if hasattr(envs, "envs") else envs if hasattr(envs, "observation_space") else None
    if env is not None:
        return environment_name(env)
    return f"{type(task).__name__}'s"


@dataclass
class _Session(Session):
    """An RL session: the environments, and the model as the gradient steps run it."""

    rollout: _Rollout
    learner: nn.Module  # the model the updates run (DDP-wrapped in a job)


class ReinforcementLearningTrainer(
    BaseTrainer[ReinforcementLearningTrainerConfig, BaseModel, ReinforcementLearningTask]
):
    """Trains a model on a :class:`ReinforcementLearningTask`.

    Attributes:
        final_metrics: The latest evaluation metrics (``rl/eval_return``, ``rl/eval_length``).
    """

    task_type = ReinforcementLearningTask

    def __init__(self, config: ReinforcementLearningTrainerConfig) -> None:
        super().__init__(config)
        check_trainer_config(config)
        if config.vectorization not in VECTORIZATIONS:
            raise ConfigError(
                f"trainer.vectorization must be one of {VECTORIZATIONS}, got {config.vectorization!r}"
            )
        if config.num_threads is not None and config.num_threads < 1:
            raise ConfigError(f"trainer.num_threads must be positive, got {config.num_threads}")
        if config.clip_grad_norm is not None and config.clip_grad_norm <= 0:  # would scale by <= 0: ascent
            raise ConfigError(f"trainer.clip_grad_norm must be positive, got {config.clip_grad_norm}")
        if config.num_eval_episodes < 1:
            raise ConfigError(f"trainer.num_eval_episodes must be positive, got {config.num_eval_episodes}")
        if config.use_double_weight_precision:
            raise ConfigError("trainer.use_double_weight_precision is not supported by the rl trainer")
        check_interval("trainer.eval_every_n_iterations", config.eval_every_n_iterations)
        if config.non_finite_loss not in ("stop", "skip"):
            raise ConfigError(
                f"trainer.non_finite_loss must be 'stop' or 'skip', got {config.non_finite_loss!r}"
            )
        self.final_metrics: dict[str, float] = {}
        self.num_skipped_steps = 0  # minibatch updates dropped for non-finite values (non_finite_loss=skip)
        self._skipped: set[int] = set()  # the current update's skipped minibatches, left out of its means
        self._non_finite: NonFiniteRecord | None = None  # this session's update minibatches, on the device
        self._found_on_host: list[NonFiniteStep] = []  # minibatches whose loss a stop flag's read found bad
        self._params: list[nn.Parameter] = []  # the trainable parameters the updates change
        # The model inside its wrappers: its floating buffers are checked with them, as they are at the
        # check (a normalizer may put a new tensor in a buffer's place instead of writing into it).
        self._inner: nn.Module | None = None
        self._every_gradient_unchecked = False  # DDP waits for every gradient: checked at the first update
        self._rollout: _Rollout | None = None
        self._eval_envs: Any = None
        self._task: ReinforcementLearningTask | None = None
        self._saved_rl: dict[str, Any] | None = None
        self._train_time_s = 0.0
        self._warned: set[str] = set()
        self._last_eval_step = -1
        self._abandoned_eval: int | None = None  # the iteration whose evaluation a stop signal abandoned
        self._rank_rollouts: list[Any] | None = None
        self._episodes = EpisodeWindow()  # the job's last finished episodes, for the logged means

    # -- checkpoint extras: where the environments stand

    def _rollout_state(self) -> dict[str, Any] | None:
        rollout, task = self._rollout, self._task
        if rollout is None or task is None:
            return None
        return {
            "observations": rollout.observations.cpu().clone(),
            "episode_returns": torch.from_numpy(rollout.episode_returns.copy()),
            "episode_lengths": torch.from_numpy(rollout.episode_lengths.copy()),
            "env_state": task.get_env_state(rollout.envs),
            **self._episodes.state_dict(),  # the job's, alike on every rank
        }

    def gather_checkpoint_parts(self, model: BaseModel, optims: Any) -> tuple[Any, Any]:
        """Also gathers every rank's environments (each rank runs its own) for rank 0 to save."""
        self._rank_rollouts = all_gather_object(self._rollout_state()) if self.distributed else None
        return super().gather_checkpoint_parts(model, optims)

    def update_state_dict(self, state_dict: dict) -> None:
        state_dict["last_eval_step"] = self._last_eval_step  # a continued finished run evaluates not again
        state_dict["abandoned_eval_step"] = self._abandoned_eval
        state_dict["skipped_steps"] = self.num_skipped_steps
        rollout_state = self._rollout_state()
        if rollout_state is None:
            return
        state_dict["rl"] = rollout_state  # rank 0's, the whole state of a single-process run
        if self._rank_rollouts is not None:
            state_dict["rl_ranks"] = self._rank_rollouts

    def load_state_dict(self, state_dict: dict) -> None:
        """Takes this rank's environment state; with another number of ranks, rank 0's goes on alone."""
        self._last_eval_step = int(state_dict.get("last_eval_step", -1))
        abandoned = state_dict.get("abandoned_eval_step")
        self._abandoned_eval = int(abandoned) if abandoned is not None else None
        self.num_skipped_steps = int(state_dict.get("skipped_steps", 0))
        ranks, rank = state_dict.get("rl_ranks"), get_rank()
        # Every rank's: the job's window. An older checkpoint has only the ranks' own episode counts.
        saved = state_dict.get("rl") or {}
        counts = [r.get("num_episodes", 0) for r in ranks] if ranks else [saved.get("num_episodes", 0)]
        self._episodes.load_state_dict(saved, episodes_before=sum(int(c) for c in counts))
        if ranks is not None and len(ranks) == get_world_size():
            self._saved_rl = ranks[rank]
        elif rank == 0:
            self._saved_rl = state_dict.get("rl")
        else:
            self._saved_rl = None
            logger.warning(
                "Rank %d: the checkpoint holds no environments for this rank: they start over", rank
            )

    def _start_environments(self, rollout: _Rollout, task: ReinforcementLearningTask, state: State) -> None:
        """Fresh run: seeded reset. Resumed run: the saved state, or a reset with new seeds (said once)."""
        seed, rank, device = task.config.seed, get_rank(), self.device
        saved, self._saved_rl = self._saved_rl, None
        if saved is None:
            rollout.reset(env_seeds(seed, rank, rollout.count), device)
            if state.num_steps > 0:
                logger.warning("The checkpoint holds no environment state: the environments start over")
            return
        env_state = saved["env_state"]
        fits = (
            env_state is not None
            and hasattr(rollout.envs, "envs")
            and len(env_state) == rollout.count
            and saved["observations"].shape[0] == rollout.count
        )
        if not fits:
            logger.warning(
                "The checkpoint holds no usable state of the %s environments (%s has no state hook for "
                "them, they run in subprocess workers, or task.num_envs changed): resuming resets them",
                _env_name(rollout.envs, task),
                type(task).__name__,
            )
            rollout.reset(env_seeds(seed, rank, rollout.count, stream=1 + state.num_steps), device)
            return
        rollout.reset(env_seeds(seed, rank, rollout.count), device)
        task.set_env_state(rollout.envs, saved["env_state"])
        rollout.observations = saved["observations"].to(device=device, dtype=torch.float32)
        rollout.episode_returns[:] = saved["episode_returns"].cpu().numpy()
        rollout.episode_lengths[:] = saved["episode_lengths"].cpu().numpy()

    # -- acting

    def _env_actions(self, task: ReinforcementLearningTask, actions: torch.Tensor, count: int) -> np.ndarray:
        """The actions as the environments take them; a wrong shape or value is the task's error."""
        from gymnasium import spaces

        space = task.action_space
        array = actions.cpu().numpy()
        expected = (count, *space.shape)
        if array.shape != expected:
            raise ConfigError(
                f"{type(task).__name__}.get_actions returned actions of shape {tuple(array.shape)} for "
                f"{count} environments with action space {space}; expected shape {expected}"
            )
        if isinstance(space, spaces.Discrete):
            if array.min() < space.start or array.max() >= space.start + space.n:
                raise ConfigError(f"{type(task).__name__}.get_actions returned actions outside {space}")
        elif isinstance(space, spaces.Box):
            array = np.clip(array, space.low, space.high)
        return array

    @torch.inference_mode()
    def _act(
        self, task: ReinforcementLearningTask, model: nn.Module, obs: torch.Tensor, optimal: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return task.get_actions(model, obs, optimal)

    def _collect(
        self, rollout: _Rollout, task: ReinforcementLearningTask, model: nn.Module
    ) -> tuple[dict[str, torch.Tensor], list[tuple[float, int]]]:
        """Steps every environment ``num_env_steps`` times; returns the trajectory and finished episodes.

        Acting runs under one ``torch.inference_mode`` for the whole rollout. What the environments
        return (rewards, ends of episodes, final observations) is written into NumPy arrays made for
        the rollout and becomes tensors once at its end; the model's outputs are stacked then too.
        The caller puts the model in eval mode.
        """
        device, count, num_steps = self.device, rollout.count, task.config.num_env_steps
        envs, returns, lengths = rollout.envs, rollout.episode_returns, rollout.episode_lengths
        rewards = np.zeros((num_steps, count), dtype=np.float32)
        terminated = np.zeros((num_steps, count), dtype=np.bool_)
        truncated = np.zeros((num_steps, count), dtype=np.bool_)
        obs = rollout.observations
        final_obs = np.zeros((num_steps, *obs.shape), dtype=np.float32)
        observations: list[torch.Tensor] = []
        actions_taken: list[torch.Tensor] = []
        extras: dict[str, list[torch.Tensor]] = {}
        finished: list[tuple[float, int]] = []
        with torch.inference_mode():
            for t in range(num_steps):
                actions, step_extras = task.get_actions(model, obs, False)
                next_obs, step_rewards, step_terminated, step_truncated, infos = envs.step(
                    self._env_actions(task, actions, count)
                )
                rewards[t], terminated[t], truncated[t] = step_rewards, step_terminated, step_truncated
                returns += step_rewards
                lengths += 1
                done = step_terminated | step_truncated
                if done.any():
                    for i in np.flatnonzero(done):
                        final_obs[t, i] = infos["final_obs"][i]
                        finished.append((float(returns[i]), int(lengths[i])))
                    returns[done] = 0
                    lengths[done] = 0
                observations.append(obs)
                actions_taken.append(actions)
                for key, value in step_extras.items():
                    extras.setdefault(key, []).append(value)
                obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
        rollout.observations = obs
        # Stacked outside inference mode: the update may keep these tensors for its backward pass.
        trajectory = {
            "observations": torch.stack(observations),
            "actions": torch.stack(actions_taken),
            "rewards": torch.from_numpy(rewards).to(device),
            "terminated": torch.from_numpy(terminated).to(device),
            "truncated": torch.from_numpy(truncated).to(device),
            "final_observations": torch.from_numpy(final_obs).to(device),
            **{key: torch.stack(values) for key, values in extras.items()},
            "next_observations": obs.clone(),
        }
        return trajectory, finished

    # -- learning

    def _update(
        self,
        state: State,
        dataset: dict[str, torch.Tensor],
        task: ReinforcementLearningTask,
        model: nn.Module,
        optim: Optimizer,
    ) -> dict[str, torch.Tensor]:
        """``num_update_epochs`` passes of minibatch gradient steps; returns the mean losses.

        Each epoch visits the samples in a new random order. When one minibatch holds them all,
        its gradient does not depend on the order, so it is not shuffled (nor copied). Gradients are
        dropped by setting them to None and clipped with one norm over all of them (as
        ``clip_grad_norm_`` does, without its per-call bookkeeping).

        NaN/inf (``trainer.non_finite_loss``): each minibatch's loss, and its gradient norm when
        clipping measures it, is checked on the device, where the optimizer skips an update that has
        one; the record is read once, at the end of the update (:meth:`_settle`). A task that stops
        updates early (:meth:`~ml.tasks.rl.ReinforcementLearningTask.update_stop_flag`) has its flag
        read per minibatch: the loss's check is read with it, and a bad minibatch is not even
        differentiated.
        """
        # A hook left the model in eval mode (a submodule alone is the user's choice). The flag is
        # the model's own: hooks and eval_mode see it, not a DDP wrapper around it.
        if not unwrap_model(model).training:
            model.train()
        # Inference tensors cannot be saved for the backward pass; plain ones pass through as they are.
        dataset = {key: value.clone() if value.is_inference() else value for key, value in dataset.items()}
        size = next(iter(dataset.values())).shape[0]
        batch_size = task.config.minibatch_size
        if batch_size > size and "small dataset" not in self._warned:
            self._warned.add("small dataset")
            logger.warning(
                "%s.build_rl_dataset gave %d samples, fewer than task.minibatch_size=%d: one "
                "minibatch holds them all",
                type(task).__name__,
                size,
                batch_size,
            )
        batch_size = min(batch_size, size)
        epochs, clip_norm = task.config.num_update_epochs, self.config.clip_grad_norm
        recorded: list[tuple[int, dict[str, torch.Tensor]]] = []  # (minibatch, its losses)
        self._skipped = set()
        if self._non_finite is None:  # the first update: the parameters it changes, and their record
            named = [(name, p) for name, p in unwrap_model(model).named_parameters() if p.requires_grad]
            self._params = [p for _, p in named]
            self._inner = unwrap_model(model)
            self._non_finite = NonFiniteRecord([name for name, _ in named], self.device)
        params, record = self._params, self._non_finite
        step = FusedAdamStep(optim) if self.config.fast_optimizer else functools.partial(step_skipping, optim)
        minibatch = 0
        for _ in range(epochs):
            if batch_size == size:
                batches: Any = (dataset,)
            else:
                order = torch.randperm(size).to(self.device)
                batches = (
                    {key: value[idx] for key, value in dataset.items()} for idx in order.split(batch_size)
                )
            for batch in batches:
                minibatch += 1
                output = task.run_model(model, batch, state)
                loss_dict = task.compute_loss(model, batch, state, output)
                loss = _total_loss(loss_dict)
                stop_flag = task.update_stop_flag()  # e.g. the KL limit: this minibatch is not applied either
                if stop_flag is not None:
                    stop, loss_bad = self._read_with_stop_flag(stop_flag, loss)
                    if stop:
                        break
                    if loss_bad:  # known on the host already: no backward pass for it
                        self._found_bad(state, NonFiniteStep(minibatch, loss.item(), None, None))
                        continue
                for p in params:
                    p.grad = None
                loss.backward()
                if self._every_gradient_unchecked:  # before the update, which DDP would not have averaged
                    self._every_gradient_unchecked = False
                    require_every_gradient(unwrap_model(model), f"iteration {state.num_steps + 1}")
                grad_norm = clip_grad_norm_(params, clip_norm) if clip_norm is not None else None
                if stop_flag is not None and grad_norm is None:  # the loss was checked; nothing else is
                    step(None)
                else:
                    if record.full:
                        self._settle(state)
                    found_inf = record.found_inf(loss, grad_norm)
                    if self.distributed:  # all ranks skip or stop together, or their weights would part
                        torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX)
                    record.record(minibatch, found_inf, loss, grad_norm)
                    step(found_inf)  # the update is dropped on the device if found_inf is 1
                recorded.append((minibatch, {name: value.detach() for name, value in loss_dict.items()}))
            else:
                continue
            break  # the task stopped the update
        self._settle(state)
        # A skipped minibatch's losses (NaN, or from a blown-up step) would make the logged means
        # NaN: they stay out of them, and out of the task's statistics.
        if self._skipped:
            task.on_minibatches_skipped(sorted(self._skipped))
        return _mean_losses(recorded, self._skipped)

    def _read_with_stop_flag(self, stop_flag: torch.Tensor, loss: torch.Tensor) -> tuple[bool, bool]:
        """The task's stop flag and whether the loss is not finite, read on the host at once (agreed
        by every rank: they stop, or skip, together)."""
        flags = torch.stack(
            [stop_flag.detach().float().reshape(()), loss.detach().isfinite().logical_not().float()]
        )
        if self.distributed:
            flags = flags.to("cpu", torch.float64)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=control_group())
        stop, loss_bad = flags.tolist()
        return bool(stop), bool(loss_bad)

    def _settle(self, state: State) -> None:
        """Reads which minibatches of this iteration's update had non-finite values (one host read, if
        any were checked on the device) and acts on them: ``non_finite_loss=stop`` stops,
        ``skip`` counts them (their updates were skipped)."""
        record = self._non_finite
        found = record.read() if record is not None and record.pending else []
        found = self._found_on_host + found
        self._found_on_host = []
        if found:
            self._act_on_non_finite(state, found)

    def _found_bad(self, state: State, bad: NonFiniteStep) -> None:
        """A minibatch found bad on the host: a stop now; a skip is counted with the update's others."""
        self._found_on_host.append(bad)
        if self.config.non_finite_loss == "stop":
            self._settle(state)

    def _act_on_non_finite(self, state: State, bad: list[NonFiniteStep]) -> None:
        bad = sorted(bad, key=lambda b: b.step)
        where = " on at least one rank" if self.distributed else ""
        first = bad[0]
        iteration = state.num_steps + 1  # the iteration being updated
        message = (
            f"non-finite values at iteration {iteration}{where}, in minibatch {first.step} of its update "
            f"({first.describe()})"
        )
        self._check_weights(message)  # skipping more updates cannot mend them
        if self.config.non_finite_loss == "stop":
            later = f"; {len(bad) - 1} later minibatch(es) too" if len(bad) > 1 else ""
            raise NonFiniteLossError(
                f"{message}{later}; set trainer.non_finite_loss=skip to skip such updates"
            )
        self.num_skipped_steps += len(bad)
        self._skipped.update(b.step for b in bad)
        logger.warning(
            "%s: skipped %d minibatch update(s) (%d so far)", message, len(bad), self.num_skipped_steps
        )

    def _check_weights(self, where: str) -> None:
        """Stops if the weights are not finite: an update that no check caught (a finite loss with a
        non-finite gradient, without gradient clipping; or a learning rate that overflows them)."""
        buffers = float_buffers(self._inner) if self._inner is not None else []
        if all_finite([*self._params, *buffers]):  # (DDP keeps every rank's alike)
            return
        raise NonFiniteLossError(
            f"{where}: the weights themselves are no longer finite (an update the checks did not catch: "
            "a non-finite gradient with a finite loss, without trainer.clip_grad_norm, or a learning "
            "rate that overflows them)"
        )

    def save_checkpoint(
        self,
        state: State,
        task: ReinforcementLearningTask,
        model: BaseModel,
        optims: Any = None,
        lr_scheds: Any = None,
    ) -> Path:
        """Never saves weights that are not finite (DDP keeps every rank's alike: all stop together)."""
        self._settle(state)
        self._check_weights(f"at iteration {state.num_steps}")
        return super().save_checkpoint(state, task, model, optims, lr_scheds)

    # -- evaluation

    def evaluate(
        self, task: ReinforcementLearningTask, model: nn.Module, state: State
    ) -> dict[str, float] | None:
        """Runs ``num_eval_episodes`` episodes side by side with the deterministic policy; logs the means.

        The evaluation environments are seeded from ``(seed, rank, evaluation number)`` and the
        policy draws no random numbers, so evaluating changes nothing about training. The metrics
        are written at once, as a ``valid`` record of the current iteration.

        Each episode runs to its end, which may be far off (an environment without a time limit
        may never end one): a stop signal abandons the evaluation at the next environment step
        (None is returned, nothing is logged), and the next session evaluates that iteration first.
        """
        with eval_mode(model):
            return self._evaluate(task, model, state)

    def _evaluate(
        self, task: ReinforcementLearningTask, model: nn.Module, state: State
    ) -> dict[str, float] | None:
        count = self.config.num_eval_episodes
        state.set_phase("valid")
        if self._eval_envs is None:
            self._eval_envs = make_sync_envs([task.get_environment for _ in range(count)])
        envs = self._eval_envs
        obs, _ = envs.reset(
            seed=env_seeds(task.config.seed, get_rank(), count, stream=2**20 + state.num_steps)
        )
        returns = np.zeros(count)
        lengths = np.zeros(count, dtype=np.int64)
        running = np.ones(count, dtype=bool)
        while self._episodes_go_on(running, state):
            if self.stop_signal is not None:  # abandoned: a partial evaluation is not reported
                task.logger.clear()
                state.set_phase("train")
                self._abandoned_eval = state.num_steps
                return None
            if not running.any():  # (another rank's go on)
                continue
            observations = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
            actions, _ = self._act(task, model, observations, optimal=True)
            obs, rewards, terminated, truncated, _ = envs.step(self._env_actions(task, actions, count))
            returns += rewards * running
            lengths += running
            running &= ~(terminated | truncated)
        metrics = {"rl/eval_return": float(returns.mean()), "rl/eval_length": float(lengths.mean())}
        metrics = mean_over_ranks(metrics)  # each rank ran its own episodes
        task.logger.log_scalar("eval_return", metrics["rl/eval_return"], namespace="rl")
        task.logger.log_scalar("eval_length", metrics["rl/eval_length"], namespace="rl")
        if self.config.record_video and is_master():  # one video, in the run folder rank 0 writes
            self._record_video(task, model, state)
        self.write_logs(task, model, state)  # type: ignore[arg-type]
        state.set_phase("train")
        self.final_metrics.update(metrics)
        self._last_eval_step = state.num_steps
        self._abandoned_eval = None
        return metrics

    def _episodes_go_on(self, running: np.ndarray, state: State) -> bool:
        """Whether an evaluation's episodes go on: this process's, or in a job any rank's. A job's
        ranks agree at each environment step (two small all-reduces on the CPU control group) on
        that and on a stop signal any of them received, so that they abandon it together."""
        if not self.distributed:
            return bool(running.any())
        self.sync_ranks(state, force=True)
        return all_max([float(running.any())])[0] > 0

    def _record_video(self, task: ReinforcementLearningTask, model: nn.Module, state: State) -> None:
        """Records one deterministic episode with gymnasium's ``RecordVideo`` (needs moviepy), on
        rank 0; a stop signal ends it, and the video then ends there too."""
        if importlib.util.find_spec("moviepy") is None:
            if "video" not in self._warned:
                logger.warning("trainer.record_video needs moviepy (pip install moviepy); not recording")
                self._warned.add("video")
            return
        from gymnasium.wrappers import RecordVideo

        env = RecordVideo(
            task.get_environment(render_mode="rgb_array"),
            video_folder=str(self.exp_dir / "videos"),
            name_prefix=f"eval-{state.num_steps}",
            episode_trigger=lambda _: True,
            disable_logger=True,
        )
        try:
            obs, _ = env.reset(seed=env_seeds(task.config.seed, get_rank(), 1, stream=2**21)[0])
            done = False
            while not done and not self.signal_received:  # (rank 0 alone: no collective to wait for)
                observations = torch.as_tensor(obs, dtype=torch.float32, device=self.device)[None]
                actions, _ = self._act(task, model, observations, optimal=True)
                obs, _, terminated, truncated, _ = env.step(self._env_actions(task, actions, 1)[0])
                done = terminated or truncated
        finally:
            env.close()

    def _should_evaluate(self, state: State) -> bool:
        every = self.config.eval_every_n_iterations
        return bool(every) and state.num_steps % every == 0  # type: ignore[operator]

    def _evaluation_left_undone(self, state: State) -> bool:
        """Whether a stop signal abandoned the evaluation of the iteration a session resumes at."""
        return self._abandoned_eval == state.num_steps

    def _evaluate_and_judge(self, state: State, s: _Session) -> bool:
        """An evaluation during training or at its end, judged for early stopping and the best
        checkpoints; False if a stop signal abandoned it."""
        metrics = self.evaluate(s.task, s.model, state)
        if metrics is None:
            return False
        self.judge_evaluation(state, metrics, s)
        return True

    # -- the session: set-up, loop, finish

    @contextlib.contextmanager
    def training_context(self) -> Iterator[None]:
        threads = torch.get_num_threads()
        try:
            with super().training_context(), deterministic_algorithms(self.config.deterministic):
                yield
        finally:
            torch.set_num_threads(threads)

    def set_up(
        self,
        model: BaseModel,
        task: ReinforcementLearningTask,
        optimizer: BaseOptimizer,
        lr_scheduler: BaseLRScheduler,
    ) -> _Session:
        """Threads, model, optimizer, environments; nothing is written to disk.

        A bad environment id or a model that does not fit the environment stops here.
        """
        if self.config.tune_malloc:
            tune_malloc()
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        self.setup_distributed()
        if self.distributed and self.config.parallel != "ddp":
            raise ConfigError("the rl trainer supports trainer.parallel=ddp only")
        model.to(device=self.device, dtype=self.weight_precision)
        task.to(self.device)
        # Every rank collects its own experience with the plain model; gradient steps go
        # through DDP, which averages the gradients over the ranks.
        learner = wrap_model(model, self.device, "ddp", ddp=self.config.ddp) if self.distributed else model
        self._every_gradient_unchecked = expects_every_gradient(learner)
        optim = optimizer.get(model)
        if self.config.fast_optimizer:
            use_fast_optimizer(optim)
        lr_sched = lr_scheduler.get(optim)
        self._task = task
        self.check_monitors(
            "rl/eval_", bool(self.config.eval_every_n_iterations), "set trainer.eval_every_n_iterations"
        )
        rollout = _Rollout(task, self.config.vectorization, task.config.num_envs)
        self._rollout = rollout
        session = _Session(
            model, task, optim, lr_sched, seed=task.config.seed, rollout=rollout, learner=learner
        )
        try:
            envs = rollout.envs
            task.on_environments_ready(envs.single_observation_space, envs.single_action_space)
            self._check_model_fits(task, model, envs)
        except BaseException:
            self.close(session)
            raise
        return session

    def close(self, s: Session) -> None:
        if isinstance(s, _Session):
            s.rollout.close()
        if self._eval_envs is not None:
            self._eval_envs.close()
            self._eval_envs = None

    def _check_model_fits(self, task: ReinforcementLearningTask, model: nn.Module, envs: Any) -> None:
        """Asks the task, then acts once (deterministically, drawing no random numbers) on a sample
        observation."""
        task.check_model(model)
        sample = np.stack([envs.single_observation_space.sample() for _ in range(envs.num_envs)])
        observations = torch.as_tensor(sample, dtype=torch.float32, device=self.device)
        try:
            actions, _ = self._act(task, model, observations, optimal=True)
        except RuntimeError as e:  # e.g. a layer sized for another observation space
            raise ConfigError(
                f"model {type(model).__name__} cannot act on {_env_name(envs, task)} observations of shape "
                f"{tuple(observations.shape[1:])}: {str(e).splitlines()[0]}"
            ) from e
        self._env_actions(task, actions, envs.num_envs)

    def loop(self, state: State, s: Session) -> None:
        with TrainingBar(state, enabled=self.config.progress_bar, unit="it") as bar:  # closed however it ends
            self._loop(state, s, bar)

    def _loop(self, state: State, s: Session, bar: TrainingBar) -> None:
        assert isinstance(s, _Session)
        task, model, optim, lr_sched, rollout = s.task, s.model, s.optim, s.lr_sched, s.rollout
        self._start_environments(rollout, task, state)
        if self._evaluation_left_undone(state):
            # Done first, then saved again to say so (with the environments just restored): a kill
            # after it does not evaluate it again.
            if not self._evaluate_and_judge(state, s):
                return
            self.save_checkpoint(state, task, model, optim, lr_sched)
        # rl/env_steps_per_s counts all the time since this loop started (logging and checkpoints
        # included) except the evaluations'.
        first_samples, started, eval_time = state.num_samples, time.perf_counter(), 0.0
        cfg, per_iteration = task.config, rollout.count * task.config.num_env_steps * get_world_size()
        bar.start(
            expected_total(
                state, max_steps=cfg.max_steps, max_samples=cfg.max_samples, samples_per_step=per_iteration
            )
        )
        while not self.training_over(state, task) and self.stop_signal is None:
            self.on_step_start(state, task, model, optim, lr_sched)
            # Acting and the dataset's values (returns, advantages) in eval mode; then every module
            # back in its own mode for the update (a submodule the user froze stays frozen).
            with eval_mode(model):
                trajectory, finished = self._collect(rollout, task, model)
                state.num_samples += rollout.count * task.config.num_env_steps * get_world_size()
                dataset = task.build_rl_dataset(model, trajectory, state)
            lr_sched.step(state)
            loss_dict = self._update(state, dataset, task, s.learner, optim)
            state.num_steps += 1
            self.on_step_end(state, loss_dict, task, model, optim, lr_sched)
            self._train_time_s = time.perf_counter() - started - eval_time
            self._log_iteration(state, task, loss_dict, finished, lr_sched, state.num_samples - first_samples)
            last = self.stop_signal is not None or task.is_training_over(state)
            # The last step is always written, and so is one whose evaluation may stop the run early.
            written = last or (self.early_stopping is not None and self._should_evaluate(state))
            self.write_logs(task, model, state, final=written)
            if last or state.num_steps >= bar.due:  # an int compare; values are read on a redraw only
                mean_return = self._episodes.mean_return()
                bar.update(None if mean_return is None else {"return": mean_return}, force=last)
            if self._should_evaluate(state):
                eval_started = time.perf_counter()
                self._evaluate_and_judge(state, s)
                eval_time += time.perf_counter() - eval_started
            if self.should_checkpoint(state):
                self.save_checkpoint(state, task, model, optim, lr_sched)

    def _log_iteration(
        self,
        state: State,
        task: ReinforcementLearningTask,
        loss_dict: dict[str, torch.Tensor],
        finished: list[tuple[float, int]],
        lr_sched: SchedulerAdapter,
        samples: int,
    ) -> None:
        for name, value in loss_dict.items():
            task.logger.log_scalar(name, value, namespace="rl")
        self._episodes.add(finished)
        for key, stat in self._episodes.stats().items():
            task.logger.log_scalar(key.removeprefix("rl/"), stat, namespace="rl")
        train_time = self._train_time_s
        task.logger.log_scalar("env_steps", state.num_samples, namespace="rl")
        task.logger.log_scalar("env_steps_per_s", samples / max(train_time, 1e-9), namespace="rl")
        self.logger.log_scalar("lr", lr_sched.lr)
        if self.num_skipped_steps:  # at every write from the first skip on
            self.logger.log_scalar("skipped_steps", self.num_skipped_steps)

    def evaluates_again(self, phase: str, state: State, s: Session) -> bool:
        """An evaluation a stop signal abandoned at this iteration (done first), and the final one,
        where the run ends at this step (:meth:`finish`); no test phase."""
        if phase != "valid":
            return False
        return self._evaluation_left_undone(state) or (
            self.config.eval_at_end and self.training_over(state, s.task)
        )

    def finish(self, state: State, s: Session) -> None:
        """The end of a completed run: a last evaluation, then the final checkpoint, which records it
        (saved again if the loop saved this iteration before), so that continuing a finished run
        evaluates nothing again."""
        if self.config.eval_at_end and self._last_eval_step != state.num_steps:
            assert isinstance(s, _Session)
            if self._evaluate_and_judge(state, s):  # (abandoned: the run is not finished)
                self.save_checkpoint(state, s.task, s.model, s.optim, s.lr_sched)
        super().finish(state, s)


register_trainer("rl", ReinforcementLearningTrainerConfig)(ReinforcementLearningTrainer)
