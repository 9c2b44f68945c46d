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
this process (``vectorization=sync``) or in subprocess workers (``async``). Native vectorised
environments (``gymnasium.make_vec``) are not used: CartPole's supports only ``NEXT_STEP``
autoreset and one seed for all its copies, which would give up both of the above.

Resume is exact at iteration boundaries: besides model, optimizer, schedule, counters and every
global generator, the checkpoint holds the observations the next rollout starts from, the running
episode returns and lengths, and the environments' own state through the task's
``get_env_state`` hook (physics, time-limit step counts, generator states), all as tensors and
plain data. An environment without that hook is reset on resume, and the trainer says so.
"""

import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

from ml.core.compose import ConfigError
from ml.core.config import conf_field
from ml.core.registry import register_trainer
from ml.core.state import State
from ml.lr_schedulers.base import BaseLRScheduler, SchedulerAdapter
from ml.models.base import BaseModel
from ml.optimizers.base import BaseOptimizer
from ml.tasks.rl import ReinforcementLearningTask
from ml.trainers.base import BaseTrainer
from ml.trainers.common import TrainerConfig, check_common_config, check_task, run_session
from ml.trainers.parallel import wrap_model
from ml.utils.distributed import all_gather_object, all_max, get_rank, get_world_size, mean_over_ranks

logger = logging.getLogger(__name__)

VECTORIZATIONS = ("sync", "async")


@dataclass
class ReinforcementLearningTrainerConfig(TrainerConfig):
    vectorization: str = conf_field("sync", help="`sync` (in this process) or `async` (subprocess workers)")
    num_threads: int | None = conf_field(
        1, help="torch CPU threads (1 suits small MLPs beside environment work; null: leave torch's)"
    )
    clip_grad_norm: float | None = conf_field(0.5, help="Clip the gradient norm to this value")
    fast_optimizer: bool = conf_field(
        True, help="Use the optimizer's fused (else multi-tensor) step: much faster for small models on CPU"
    )
    eval_every_n_iterations: int | None = conf_field(10, help="Evaluate the deterministic policy every N")
    num_eval_episodes: int = conf_field(10, help="Episodes per evaluation (run side by side)")
    eval_at_end: bool = conf_field(True, help="Evaluate once more when training ends")
    record_video: bool = conf_field(
        False, help="Record one evaluation episode per evaluation (needs moviepy)"
    )


def env_seeds(seed: int, rank: int, count: int, stream: int = 0) -> list[int]:
    """Independent seeds for ``count`` environments from ``(seed, rank, stream, env index)``."""
    return [
        int(np.random.SeedSequence(seed, spawn_key=(rank, stream, i)).generate_state(1)[0])
        for i in range(count)
    ]


def _use_fast_optimizer(optim: Optimizer) -> None:
    """Switches torch's optimizers from their per-tensor loop (the CPU default) to the fused kernel.

    A 64-64 MLP's update is dominated by per-operation overhead, so one fused step per parameter
    group instead of a dozen small operations per tensor saves a large share of each gradient step.
    """
    for group in optim.param_groups:
        floats = all(p.dtype in (torch.float32, torch.float64) for p in group["params"])
        if "fused" in group and floats and isinstance(optim, (torch.optim.Adam, torch.optim.AdamW)):
            group["fused"], group["foreach"] = True, False
        elif "foreach" in group:
            group["foreach"] = True


class _Rollout:
    """The environments of one run and where they stand: observations, running episode totals."""

    def __init__(self, task: ReinforcementLearningTask, vectorization: str, count: int) -> None:
        import gymnasium
        from gymnasium.vector import AutoresetMode

        task.get_environment().close()  # a bad id or argument fails here, in this process, clearly
        fns = [task.get_environment for _ in range(count)]
        kwargs: dict[str, Any] = {"autoreset_mode": AutoresetMode.SAME_STEP}
        if vectorization == "async":
            self.envs: Any = gymnasium.vector.AsyncVectorEnv(fns, **kwargs)
        else:
            self.envs = gymnasium.vector.SyncVectorEnv(fns, **kwargs)
        self.count = count
        self.num_episodes = 0
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


class ReinforcementLearningTrainer(
    BaseTrainer[ReinforcementLearningTrainerConfig, BaseModel, ReinforcementLearningTask]
):
    """Trains a model on a :class:`ReinforcementLearningTask`.

    Attributes:
        final_metrics: The latest evaluation metrics (``rl/eval_return``, ``rl/eval_length``).
    """

    def __init__(self, config: ReinforcementLearningTrainerConfig) -> None:
        super().__init__(config)
        check_common_config(config)
        if config.vectorization not in VECTORIZATIONS:
            raise ConfigError(
                f"trainer.vectorization must be one of {VECTORIZATIONS}, got {config.vectorization!r}"
            )
        if config.num_threads is not None and config.num_threads < 1:
            raise ConfigError(f"trainer.num_threads must be positive, got {config.num_threads}")
        if config.num_eval_episodes < 1:
            raise ConfigError(f"trainer.num_eval_episodes must be positive, got {config.num_eval_episodes}")
        if config.use_double_weight_precision:
            raise ConfigError("trainer.use_double_weight_precision is not supported by the rl trainer")
        self.final_metrics: dict[str, float] = {}
        self._rollout: _Rollout | None = None
        self._eval_envs: Any = None
        self._task: ReinforcementLearningTask | None = None
        self._saved_rl: dict[str, Any] | None = None
        self._train_time_s = 0.0
        self._warned: set[str] = set()
        self._last_eval_step = -1
        self._rank_rollouts: list[Any] | None = None

    # -- checkpoint extras: where the environments stand

    def _rollout_state(self) -> dict[str, Any] | None:
        rollout, task = self._rollout, self._task
        if rollout is None or task is None:
            return None
        return {
            "observations": rollout.observations.cpu().clone(),
            "num_episodes": rollout.num_episodes,
            "episode_returns": torch.from_numpy(rollout.episode_returns.copy()),
            "episode_lengths": torch.from_numpy(rollout.episode_lengths.copy()),
            "env_state": task.get_env_state(rollout.envs),
        }

    def gather_checkpoint_parts(self, model: BaseModel, optims: Any) -> tuple[Any, Any]:
        """Also gathers every rank's environments (each rank runs its own) for rank 0 to save."""
        self._rank_rollouts = all_gather_object(self._rollout_state()) if self._distributed else None
        return super().gather_checkpoint_parts(model, optims)

    def update_state_dict(self, state_dict: dict) -> None:
        rollout_state = self._rollout_state()
        if rollout_state is None:
            return
        state_dict["rl"] = rollout_state  # rank 0's, the whole state of a single-process run
        if self._rank_rollouts is not None:
            state_dict["rl_ranks"] = self._rank_rollouts

    def load_state_dict(self, state_dict: dict) -> None:
        """Takes this rank's environment state; with another number of ranks, rank 0's goes on alone."""
        ranks, rank = state_dict.get("rl_ranks"), get_rank()
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
        seed, rank, device = task.config.seed, get_rank(), self._device
        saved, self._saved_rl = self._saved_rl, None
        if saved is not None:
            rollout.num_episodes = int(saved.get("num_episodes", 0))
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
                task.config.env_id,
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
        array = actions.detach().cpu().numpy()
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
        """Steps every environment ``num_env_steps`` times; returns the trajectory and finished episodes."""
        model.eval()
        device = self._device
        columns: dict[str, list[torch.Tensor]] = {}
        finished: list[tuple[float, int]] = []
        obs = rollout.observations
        final_obs_template = torch.zeros_like(obs)
        for _ in range(task.config.num_env_steps):
            actions, extras = self._act(task, model, obs, optimal=False)
            next_obs, rewards, terminated, truncated, infos = rollout.envs.step(
                self._env_actions(task, actions, rollout.count)
            )
            done = terminated | truncated
            final_obs = final_obs_template
            rollout.episode_returns += rewards
            rollout.episode_lengths += 1
            if done.any():
                final_obs = final_obs_template.clone()
                for i in np.flatnonzero(done):
                    final_obs[i] = torch.as_tensor(infos["final_obs"][i], dtype=torch.float32, device=device)
                    finished.append((float(rollout.episode_returns[i]), int(rollout.episode_lengths[i])))
                rollout.num_episodes += int(done.sum())
                rollout.episode_returns[done] = 0
                rollout.episode_lengths[done] = 0
            step = {
                "observations": obs,
                "actions": actions,
                "rewards": torch.as_tensor(rewards, dtype=torch.float32, device=device),
                "terminated": torch.as_tensor(terminated, device=device),
                "truncated": torch.as_tensor(truncated, device=device),
                "final_observations": final_obs,
                **extras,
            }
            for key, value in step.items():
                columns.setdefault(key, []).append(value)
            obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
        rollout.observations = obs
        trajectory = {key: torch.stack(values) for key, values in columns.items()}
        trajectory["next_observations"] = obs
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
        """``num_update_epochs`` passes of minibatch gradient steps; returns the mean losses."""
        model.train()
        size = next(iter(dataset.values())).shape[0]
        batch_size = min(task.config.minibatch_size, size)
        epochs, clip_norm = task.config.num_update_epochs, self.config.clip_grad_norm
        totals: dict[str, torch.Tensor] = {}
        count = 0
        params = [p for p in model.parameters() if p.requires_grad]
        for _ in range(epochs):
            order = torch.randperm(size).to(self._device)
            for start in range(0, size, batch_size):
                idx = order[start : start + batch_size]
                batch = {key: value[idx] for key, value in dataset.items()}
                output = task.run_model(model, batch, state)
                loss_dict = task.compute_loss(model, batch, state, output)
                stop = task.should_stop_update()  # e.g. the KL limit: this minibatch is not applied either
                if self._distributed:  # all ranks stop together, or the next all-reduce would hang
                    stop = all_max([float(stop)])[0] > 0
                if stop:
                    return {name: total / max(count, 1) for name, total in totals.items()}
                loss = torch.stack([v.sum() for v in loss_dict.values()]).sum()
                optim.zero_grad(set_to_none=True)
                loss.backward()
                if clip_norm is not None:
                    nn.utils.clip_grad_norm_(params, clip_norm, foreach=True)
                optim.step()
                for name, value in loss_dict.items():
                    totals[name] = totals[name] + value.detach() if name in totals else value.detach()
                count += 1
        return {name: total / count for name, total in totals.items()}

    # -- evaluation

    def evaluate(self, task: ReinforcementLearningTask, model: nn.Module, state: State) -> dict[str, float]:
        """Runs ``num_eval_episodes`` episodes side by side with the deterministic policy; logs the means.

        The evaluation environments are seeded from ``(seed, rank, evaluation number)`` and the
        policy draws no random numbers, so evaluating changes nothing about training. The metrics
        are written at once, as a ``valid`` record of the current iteration.
        """
        import gymnasium
        from gymnasium.vector import AutoresetMode

        count = self.config.num_eval_episodes
        state.set_phase("valid")
        if self._eval_envs is None:
            fns = [task.get_environment for _ in range(count)]
            self._eval_envs = gymnasium.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)
        envs = self._eval_envs
        obs, _ = envs.reset(
            seed=env_seeds(task.config.seed, get_rank(), count, stream=2**20 + state.num_steps)
        )
        returns = np.zeros(count)
        lengths = np.zeros(count, dtype=np.int64)
        running = np.ones(count, dtype=bool)
        model.eval()
        while running.any():
            observations = torch.as_tensor(obs, dtype=torch.float32, device=self._device)
            actions, _ = self._act(task, model, observations, optimal=True)
            obs, rewards, terminated, truncated, _ = envs.step(self._env_actions(task, actions, count))
            returns += rewards * running
            lengths += running
            running &= ~(terminated | truncated)
        metrics = {"rl/eval_return": float(returns.mean()), "rl/eval_length": float(lengths.mean())}
        metrics = mean_over_ranks(metrics)  # each rank ran its own episodes
        task.logger.log_scalar("eval_return", metrics["rl/eval_return"], namespace="rl")
        task.logger.log_scalar("eval_length", metrics["rl/eval_length"], namespace="rl")
        if self.config.record_video:
            self._record_video(task, model, state)
        self.write_logs(task, model, state)  # type: ignore[arg-type]
        state.set_phase("train")
        self.final_metrics.update(metrics)
        self._last_eval_step = state.num_steps
        return metrics

    def _record_video(self, task: ReinforcementLearningTask, model: nn.Module, state: State) -> None:
        """Records one deterministic episode with gymnasium's ``RecordVideo`` (needs moviepy)."""
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
            while not done:
                observations = torch.as_tensor(obs, dtype=torch.float32, device=self._device)[None]
                actions, _ = self._act(task, model, observations, optimal=True)
                obs, _, terminated, truncated, _ = env.step(self._env_actions(task, actions, 1)[0])
                done = terminated or truncated
        finally:
            env.close()

    def _should_evaluate(self, state: State) -> bool:
        every = self.config.eval_every_n_iterations
        return bool(every) and state.num_steps % every == 0  # type: ignore[operator]

    # -- the loop

    def train(
        self,
        model: BaseModel,
        task: ReinforcementLearningTask,
        optimizer: BaseOptimizer,
        lr_scheduler: BaseLRScheduler,
    ) -> None:
        """Runs iterations until the task's limits are met or a signal asks it to stop."""
        check_task(self, task, ReinforcementLearningTask)
        threads = torch.get_num_threads()
        with self.install_signal_handlers():
            # Set up: threads, model, optimizer, environments. Nothing here writes to disk, so a
            # bad environment id or a model that does not fit the environment stops the run untouched.
            if self.config.num_threads is not None:
                torch.set_num_threads(self.config.num_threads)
            self.setup_distributed()
            if self._distributed and self.config.parallel != "ddp":
                raise ConfigError("the rl trainer supports trainer.parallel=ddp only")
            model.to(device=self._device, dtype=self._weight_precision)
            task.to(self._device)
            # Every rank collects its own experience with the plain model; gradient steps go
            # through DDP, which averages the gradients over the ranks.
            learner = wrap_model(model, self._device, "ddp") if self._distributed else model
            optim = optimizer.get(model)
            if self.config.fast_optimizer:
                _use_fast_optimizer(optim)
            lr_sched = lr_scheduler.get(optim)
            self._task = task
            rollout = _Rollout(task, self.config.vectorization, task.config.num_envs)
            self._rollout = rollout
            try:
                envs = rollout.envs
                task.on_environments_ready(envs.single_observation_space, envs.single_action_space)
                self._check_model_fits(task, model, envs)
                run_session(
                    self,
                    task,
                    model,
                    optim,
                    lr_sched,
                    seed=task.config.seed,
                    loop=lambda state: self._loop(state, rollout, task, model, learner, optim, lr_sched),
                    finish=lambda state: self._finish(state, task, model, optim, lr_sched),
                )
            finally:
                rollout.close()
                if self._eval_envs is not None:
                    self._eval_envs.close()
                torch.set_num_threads(threads)

    def _check_model_fits(self, task: ReinforcementLearningTask, model: nn.Module, envs: Any) -> None:
        """Acts once (deterministically, drawing no random numbers) on a sample observation."""
        sample = np.stack([envs.single_observation_space.sample() for _ in range(envs.num_envs)])
        observations = torch.as_tensor(sample, dtype=torch.float32, device=self._device)
        try:
            actions, _ = self._act(task, model, observations, optimal=True)
        except RuntimeError as e:  # e.g. a layer sized for another observation space
            raise ConfigError(
                f"model {type(model).__name__} cannot act on {task.config.env_id} observations of shape "
                f"{tuple(observations.shape[1:])}: {str(e).splitlines()[0]}"
            ) from e
        self._env_actions(task, actions, envs.num_envs)

    def _loop(
        self,
        state: State,
        rollout: _Rollout,
        task: ReinforcementLearningTask,
        model: BaseModel,
        learner: nn.Module,
        optim: Optimizer,
        lr_sched: SchedulerAdapter,
    ) -> None:
        self._start_environments(rollout, task, state)
        self._last_eval_step = -1
        first_samples, self._train_time_s = state.num_samples, 0.0
        while not task.is_training_over(state) and self.stop_signal is None:
            started = time.perf_counter()
            self.on_step_start(state, task, model, optim, lr_sched)
            trajectory, finished = self._collect(rollout, task, model)
            state.num_samples += rollout.count * task.config.num_env_steps * get_world_size()
            dataset = task.build_rl_dataset(model, trajectory, state)
            lr_sched.step(state)
            loss_dict = self._update(state, dataset, task, learner, optim)
            state.num_steps += 1
            self._train_time_s += time.perf_counter() - started
            self.on_step_end(state, loss_dict, task, model, optim, lr_sched)
            self._log_iteration(state, task, loss_dict, finished, lr_sched, state.num_samples - first_samples)
            self.write_logs(task, model, state)
            if self._should_evaluate(state):
                self.evaluate(task, model, state)
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
        if finished:
            task.logger.log_scalar("episode_return", float(np.mean([r for r, _ in finished])), namespace="rl")
            task.logger.log_scalar("episode_length", float(np.mean([n for _, n in finished])), namespace="rl")
        train_time = self._train_time_s
        task.logger.log_scalar("env_steps", state.num_samples, namespace="rl")
        task.logger.log_scalar("episodes", self._rollout.num_episodes if self._rollout else 0, namespace="rl")
        task.logger.log_scalar("env_steps_per_s", samples / max(train_time, 1e-9), namespace="rl")
        self.logger.log_scalar("lr", lr_sched.lr)

    def _finish(
        self,
        state: State,
        task: ReinforcementLearningTask,
        model: BaseModel,
        optim: Optimizer,
        lr_sched: SchedulerAdapter,
    ) -> None:
        """The end of a completed run: a last evaluation, then the final checkpoint."""
        if self.config.eval_at_end and self._last_eval_step != state.num_steps:
            self.evaluate(task, model, state)
        if self._last_ckpt_step != state.num_steps:
            self.save_checkpoint(state, task, model, optim, lr_sched)


register_trainer("rl", ReinforcementLearningTrainerConfig)(ReinforcementLearningTrainer)
