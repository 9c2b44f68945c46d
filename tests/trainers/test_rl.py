"""Tests of the rl trainer's pieces: seeds, the KL early stop, its vector environment, the resume warning,
NaN/inf, the rolling episode statistics, and bad input (one line, nothing on disk).

Gradient clipping is ``ml.utils.grad_norm``'s (tests/utils/test_grad_norm.py)."""

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    EpisodeWindow,
    ReinforcementLearningTrainer,
    ReinforcementLearningTrainerConfig,
    SyncEnvs,
    _Rollout,
    env_seeds,
)
from tests.same import assert_same

gymnasium = pytest.importorskip("gymnasium")

from tests.e2e.endless_env import Endless  # noqa: E402 (it needs gymnasium)


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


# -- NaN/inf, the last evaluation, the episode statistics of a job, refused settings


class _NonFiniteLossAt(ClassicControlTask):
    """A task whose loss is NaN in every minibatch of one iteration (a user's bug, or a blow-up)."""

    bad_iteration = 2

    def __init__(self, config: PPOTaskConfig) -> None:
        super().__init__(config)
        self.weights: list[dict[str, torch.Tensor]] = []  # after each iteration's update

    def on_step_end(self, state, loss_dict, model, optim, lr_sched) -> None:  # type: ignore[no-untyped-def]
        super().on_step_end(state, loss_dict, model, optim, lr_sched)
        self.weights.append({k: v.clone() for k, v in model.state_dict().items()})
        self.weights[-1]["adam_step"] = optim.state[next(iter(model.parameters()))]["step"].clone()

    def compute_loss(self, model, batch, state, output):  # type: ignore[no-untyped-def]
        losses = super().compute_loss(model, batch, state, output)
        if state.num_steps + 1 == self.bad_iteration:
            losses["policy_loss"] = losses["policy_loss"] * float("nan")
        return losses


def _train(
    tmp_path: Path,
    task: ClassicControlTask,
    trainer_overrides: dict | None = None,
    exp: str = "run",
    write_every: int = 1,
    model: nn.Module | None = None,
) -> ReinforcementLearningTrainer:
    """Trains ``task`` with a small actor-critic in a fresh trainer on ``tmp_path / exp`` (jsonl logs)."""
    from ml.loggers.jsonl import JsonlLogger, JsonlLoggerConfig

    torch.manual_seed(0)
    if model is None:
        model = ActorCriticMLP(ActorCriticMLPConfig(name="m", observation_size=4, action_size=2))
    trainer_config = OmegaConf.merge(
        OmegaConf.structured(ReinforcementLearningTrainerConfig),
        {
            "name": "rl",
            "exp_dir": str(tmp_path / exp),
            "eval_every_n_iterations": None,
            "num_eval_episodes": 2,
            "progress_bar": False,
            "checkpoint": {"save_every_n_steps": 1},
            **(trainer_overrides or {}),
        },
    )
    trainer = ReinforcementLearningTrainer(trainer_config)  # type: ignore[arg-type]
    trainer.add_logger(JsonlLogger(JsonlLoggerConfig(name="jsonl", write_every_n_steps=write_every)))
    trainer.train(
        model,
        task,
        AdamOptimizer(AdamConfig(name="adam")),
        ConstantLRScheduler(ConstantConfig(name="constant")),
    )
    return trainer


def _small_task(
    cls: type[ClassicControlTask] = ClassicControlTask, **overrides: object
) -> ClassicControlTask:
    config = PPOTaskConfig(
        name="classic_control", env_id="CartPole-v1", num_envs=2, num_env_steps=16,
        minibatch_size=16, num_update_epochs=2, max_steps=3,
    )  # fmt: skip
    for key, value in overrides.items():
        setattr(config, key, value)
    return cls(config)


def _ckpt(exp_dir: Path, step: int) -> dict:
    return torch.load(exp_dir / "checkpoints" / f"ckpt.{step}.pt", weights_only=True)


# target_kl set: the task reads its early-stop flag per minibatch, and the loss's check rides along;
# unset: the loss is checked on the device and read once per update.
@pytest.mark.parametrize("target_kl", [None, 1e9], ids=["checked-on-device", "read-with-the-kl-flag"])
def test_a_nan_loss_stops_the_run_naming_the_iteration_before_any_checkpoint_holds_it(
    tmp_path: Path, target_kl: float | None
) -> None:
    from ml.errors import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"at iteration 2, in minibatch 1 of its update.*loss nan"):
        _train(tmp_path, _small_task(_NonFiniteLossAt, target_kl=target_kl))
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt.*.pt"))
    assert saved == ["ckpt.1.pt"]  # iteration 2's never written
    assert all(torch.isfinite(t).all() for t in _ckpt(tmp_path / "run", 1)["model"].values())


@pytest.mark.parametrize("target_kl", [None, 1e9], ids=["checked-on-device", "read-with-the-kl-flag"])
def test_non_finite_loss_skip_drops_those_updates_and_counts_them(
    tmp_path: Path, target_kl: float | None
) -> None:
    task = _small_task(_NonFiniteLossAt, target_kl=target_kl)
    trainer = _train(tmp_path, task, {"non_finite_loss": "skip"})
    first, second, third = task.weights  # type: ignore[attr-defined]
    # Iteration 2's four minibatches (2 epochs of 32 samples in 16s) were all skipped: nothing moved.
    assert trainer.num_skipped_steps == 4 and _ckpt(tmp_path / "run", 3)["skipped_steps"] == 4
    records = (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    train = [json.loads(r)["metrics"] for r in records if '"train"' in r]
    assert [m.get("trainer/skipped_steps") for m in train] == [None, 4, 4]  # every write from the skip on
    # The skipped minibatches' losses and statistics stay out of the logged means (they made
    # rl/policy_loss NaN): iteration 2 applied none, so it logs none; the others log finite values.
    assert "rl/policy_loss" not in train[1] and "rl/approx_kl" not in train[1]
    assert all("rl/policy_loss" in m and "rl/approx_kl" in m for m in (train[0], train[2]))
    assert not [(k, v) for m in train for k, v in m.items() if not np.isfinite(float(v))]
    assert_same(second, first, "iteration 2")
    assert third["adam_step"] == first["adam_step"] + 4 and not torch.equal(
        third["policy.0.weight"], first["policy.0.weight"]
    )
    assert all(torch.isfinite(t).all() for t in third.values())


class _BadMinibatches2And4(ClassicControlTask):
    """Iteration 2's minibatch 2 has a NaN loss (found on the host, with the KL flag) and its
    minibatch 4 an infinite gradient with a finite loss (found on the device)."""

    def __init__(self, config: PPOTaskConfig) -> None:
        super().__init__(config)
        self.skipped: list[list[int]] = []
        self.minibatch = 0
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []

    def compute_loss(self, model, batch, state, output):  # type: ignore[no-untyped-def]
        losses = super().compute_loss(model, batch, state, output)
        if state.num_steps + 1 == 2:
            self.minibatch += 1
            if self.minibatch == 2:
                losses["policy_loss"] = losses["policy_loss"] * float("nan")
            if self.minibatch == 4:
                self.hooks.append(next(iter(model.parameters())).register_hook(lambda g: g * float("inf")))
        return losses

    def on_minibatches_skipped(self, numbers: list[int]) -> None:
        self.skipped.append(list(numbers))
        super().on_minibatches_skipped(numbers)

    def on_step_end(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().on_step_end(*args, **kwargs)
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


def test_the_minibatches_named_skipped_are_the_bad_ones(tmp_path: Path) -> None:
    """The device's record numbered its rows as if every minibatch wrote one, but one found bad on
    the host writes none: minibatch 3 (applied) was dropped from the logged means instead of 4."""
    task = _small_task(_BadMinibatches2And4, target_kl=1e9)
    trainer = _train(tmp_path, task, {"non_finite_loss": "skip"})
    assert task.skipped == [[2, 4]] and trainer.num_skipped_steps == 2


def test_weights_that_are_no_longer_finite_are_never_saved(tmp_path: Path) -> None:
    """A learning rate that overflows the weights with finite losses and gradients (no clipping)."""
    from ml.errors import NonFiniteLossError

    class Overflows(ClassicControlTask):
        def on_step_end(self, state, loss_dict, model, optim, lr_sched) -> None:  # type: ignore[no-untyped-def]
            super().on_step_end(state, loss_dict, model, optim, lr_sched)
            if state.num_steps == 2:
                with torch.no_grad():
                    model.value[0].weight.fill_(float("inf"))  # as an update the checks cannot see

    with pytest.raises(
        NonFiniteLossError, match="at iteration 2: the weights themselves are no longer finite"
    ):
        _train(tmp_path, _small_task(Overflows), {"non_finite_loss": "skip", "clip_grad_norm": None})
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt.*.pt")) == ["ckpt.1.pt"]


class _NormalizedActorCritic(ActorCriticMLP):
    """An actor-critic with an observation normalizer's buffer (running statistics, as RL keeps them)."""

    def __init__(self, config: ActorCriticMLPConfig) -> None:
        super().__init__(config)
        self.register_buffer("obs_mean", torch.zeros(config.observation_size))


def test_a_buffer_put_in_place_of_another_is_checked_as_it_is(tmp_path: Path) -> None:
    """A normalizer that assigns its buffer anew (``self.obs_mean = new``) instead of writing into
    it: the buffers found at the first update were checked, and a NaN mean was saved."""
    from ml.errors import NonFiniteLossError

    class NewMean(ClassicControlTask):
        def on_step_end(self, state, loss_dict, model, optim, lr_sched) -> None:  # type: ignore[no-untyped-def]
            super().on_step_end(state, loss_dict, model, optim, lr_sched)
            model.obs_mean = torch.full_like(model.obs_mean, float("nan") if state.num_steps == 2 else 0.5)

    model = _NormalizedActorCritic(ActorCriticMLPConfig(name="m", observation_size=4, action_size=2))
    with pytest.raises(
        NonFiniteLossError, match="at iteration 2: the weights themselves are no longer finite"
    ):
        _train(
            tmp_path, _small_task(NewMean), {"non_finite_loss": "skip", "clip_grad_norm": None}, model=model
        )
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt.*.pt")) == ["ckpt.1.pt"]
    assert _ckpt(tmp_path / "run", 1)["model"]["obs_mean"].tolist() == [0.5] * 4  # the new one, saved


class _SeesDeterminism(ClassicControlTask):
    seen: list[bool]

    def compute_loss(self, model, batch, state, output):  # type: ignore[no-untyped-def]
        self.seen = [*getattr(self, "seen", []), torch.are_deterministic_algorithms_enabled()]
        return super().compute_loss(model, batch, state, output)


def test_deterministic_kernels_hold_during_training_only(tmp_path: Path) -> None:
    """``trainer.deterministic`` was refused by the rl trainer (an unknown key)."""
    assert not torch.are_deterministic_algorithms_enabled()
    task = _small_task(_SeesDeterminism)
    _train(tmp_path, task, {"deterministic": True})
    assert task.seen and all(task.seen)
    assert not torch.are_deterministic_algorithms_enabled()


def test_continuing_a_finished_run_does_not_evaluate_it_again(tmp_path: Path) -> None:
    """The final evaluation comes after the loop saved the last iteration: the checkpoint is saved
    again to record it, so the continued run (nothing left to train) logs no second evaluation."""
    from ml.loggers.jsonl import read_metrics

    _train(tmp_path, _small_task(max_steps=2))
    again = _train(tmp_path, _small_task(max_steps=2))
    valid = [r["step"] for r in read_metrics(tmp_path / "run" / "logs") if r.get("phase") == "valid"]
    assert valid == [2]
    assert again.final_metrics == {}


_RANK_1 = """
import sys, torch.distributed as dist
from ml.trainers.rl import EpisodeWindow
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=1, world_size=2)
window = EpisodeWindow(size=4)
window.add([(100.0, 100)])  # one long episode
first = window.stats()
window.add([])  # none ended here this time
print([first, window.stats()])
dist.destroy_process_group()
"""


def test_episode_statistics_are_over_every_rank_s_episodes(tmp_path: Path) -> None:
    """Two real gloo processes (rank 0 this one): the mean return is over the job's 4 episodes (40),
    not the mean of the ranks' means (60), and every rank counts the job's 4 episodes (not 2). The
    window (4 episodes here) is the job's, in rank order, alike on both: the next iteration's
    episode pushes out rank 0's oldest, and the mean is 50 on both ranks, though rank 1 had none."""
    import datetime
    import subprocess
    import sys

    store = str(tmp_path / "store")
    rank_1 = subprocess.Popen(
        [sys.executable, "-c", _RANK_1, store], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # A rank 1 that died would leave this one waiting: not longer than 60 s.
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=0, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        window = EpisodeWindow(size=4)
        window.add([(10.0, 10), (20.0, 20), (30.0, 30)])  # three short episodes
        first = window.stats()
        window.add([(50.0, 50)])
        on_rank_0 = [first, window.stats()]
    finally:
        dist.destroy_process_group()
        out, err = rank_1.communicate(timeout=60)
    assert rank_1.returncode == 0, err
    expected = [
        {"rl/episodes": 4.0, "rl/episode_return": 40.0, "rl/episode_length": 40.0},
        {"rl/episodes": 5.0, "rl/episode_return": 50.0, "rl/episode_length": 50.0},  # 20, 30, 100, 50
    ]
    assert on_rank_0 == expected and eval(out) == expected
    alone = EpisodeWindow()
    alone.add([])
    assert alone.stats() == {"rl/episodes": 0.0}  # one process, no episode ended yet: no mean


def _trainer(tmp_path: Path) -> ReinforcementLearningTrainer:
    trainer_config = OmegaConf.merge(
        OmegaConf.structured(ReinforcementLearningTrainerConfig), {"name": "rl", "exp_dir": str(tmp_path)}
    )
    return ReinforcementLearningTrainer(trainer_config)  # type: ignore[arg-type]


def test_the_episode_count_goes_on_from_a_job_s_checkpoint_with_fewer_processes(tmp_path: Path) -> None:
    """A 2-process job's checkpoint resumed by 1 process (--allow-config-change): the count is the
    job's (203), not rank 0's own (102): it went backwards, rank 1's episodes dropped."""
    job = EpisodeWindow()
    job.episodes = 203  # rank 0 finished 102 of them, rank 1 101
    job.returns.extend([5.0, 7.0])
    job.lengths.extend([5, 7])
    rank_state = {"observations": torch.zeros(2, 4), "env_state": None}
    saved = {"rl": {**rank_state, **job.state_dict()}, "rl_ranks": [rank_state, rank_state]}
    trainer = _trainer(tmp_path)
    trainer.load_state_dict(torch.load(_saved(tmp_path, saved), weights_only=True))
    trainer._episodes.add([(9.0, 9)])  # the resumed run's first episode
    assert trainer._episodes.stats() == {
        "rl/episodes": 204.0, "rl/episode_return": 7.0, "rl/episode_length": 7.0,
    }  # fmt: skip


def _saved(tmp_path: Path, state: dict) -> Path:
    """``state`` through a real save (as a checkpoint holds it: weights_only loadable)."""
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_a_checkpoint_without_the_episode_window_says_the_means_start_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Saved before the window was: its count goes on from the ranks' own counts, and the jump in
    the logged means is said once."""
    old = {"observations": torch.zeros(2, 4), "env_state": None}
    saved = {
        "rl": {**old, "num_episodes": 102},
        "rl_ranks": [{**old, "num_episodes": 102}, {**old, "num_episodes": 101}],
    }
    trainer = _trainer(tmp_path)
    trainer.load_state_dict(torch.load(_saved(tmp_path, saved), weights_only=True))
    warnings = [r.getMessage() for r in caplog.records if "window of finished episodes" in r.getMessage()]
    assert len(warnings) == 1 and "start over" in warnings[0]
    assert trainer._episodes.stats() == {"rl/episodes": 203.0}
    caplog.clear()
    trainer.load_state_dict({"rl": {**old, **EpisodeWindow().state_dict()}})  # a checkpoint of today's
    assert "window of finished episodes" not in caplog.text


def test_observations_that_are_not_one_array_are_refused(tmp_path: Path) -> None:
    from ml.errors import ConfigError

    task = ClassicControlTask(PPOTaskConfig(name="classic_control", env_id="Blackjack-v1", num_envs=3))
    with pytest.raises(ConfigError, match=r"task\.env_id: .*Blackjack-v1's are Tuple\("):
        _Rollout(task, "sync", 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eval_every_n_iterations": -1}, "trainer.eval_every_n_iterations must be positive (or null"),
        ({"eval_every_n_iterations": 0}, "trainer.eval_every_n_iterations must be positive (or null"),
        ({"non_finite_loss": "ignore"}, "trainer.non_finite_loss must be 'stop' or 'skip', got 'ignore'"),
        # clip_grad_norm_ multiplies the gradients by max_norm / norm: a negative one ascends, 0 zeroes
        ({"clip_grad_norm": -0.5}, "trainer.clip_grad_norm must be positive, got -0.5"),
        ({"clip_grad_norm": 0.0}, "trainer.clip_grad_norm must be positive, got 0.0"),
    ],
)
def test_nonsensical_trainer_settings_are_refused(tmp_path: Path, overrides: dict, message: str) -> None:
    from ml.errors import ConfigError

    trainer_config = OmegaConf.merge(
        OmegaConf.structured(ReinforcementLearningTrainerConfig),
        {"name": "rl", "exp_dir": str(tmp_path / "run"), **overrides},
    )
    with pytest.raises(ConfigError) as caught:
        ReinforcementLearningTrainer(trainer_config)  # type: ignore[arg-type]
    assert message in str(caught.value)
    assert not (tmp_path / "run").exists()


# -- the rolling episode statistics


class _ShortEpisodes(gymnasium.Env):
    """Episodes of 1, 2, 3, 1, ... steps, rewarded 0.5 * the step's number (a return unlike the
    length); records each episode as it ends: (a clock over every step of every instance, return, length)."""

    observation_space = gymnasium.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
    action_space = gymnasium.spaces.Discrete(2)
    clock = iter(range(10**9))

    def __init__(self) -> None:
        self.ended: list[tuple[int, float, int]] = []
        self.steps, self.total = 0, 0.0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.steps, self.total = 0, 0.0
        return np.zeros(4, dtype=np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.steps += 1
        self.total += 0.5 * self.steps
        done = self.steps >= 1 + len(self.ended) % 3
        now = next(self.clock)
        if done:
            self.ended.append((now, self.total, self.steps))
        return np.zeros(4, dtype=np.float32), 0.5 * self.steps, done, False, {}


class _ShortEpisodesTask(ClassicControlTask):
    def __init__(self, config: PPOTaskConfig) -> None:
        super().__init__(config)
        self.made: list[_ShortEpisodes] = []  # the probe first, then the training environments

    def get_environment(self, render_mode: str | None = None) -> gymnasium.Env:
        self.made.append(_ShortEpisodes())
        return self.made[-1]


def test_episode_return_is_the_mean_of_the_last_100_episodes_at_every_write(tmp_path: Path) -> None:
    """As Stable-Baselines3's ep_rew_mean: the episodes of the iterations that are not written count
    too (the mean was over the written iteration's episodes alone)."""
    from ml.loggers.jsonl import read_metrics

    task = _small_task(_ShortEpisodesTask, max_steps=9)  # 2 envs x 16 steps: ~16 episodes an iteration
    _train(tmp_path, task, write_every=3)
    training = task.made[1:3]  # type: ignore[attr-defined]
    ended = sorted(e for env in training for e in env.ended)  # in the order the rollout saw them
    records = [r for r in read_metrics(tmp_path / "run" / "logs") if r.get("phase") == "train"]
    assert [r["step"] for r in records] == [1, 4, 7, 9]  # iterations 2, 3, 5, 6 and 8 not written
    for record in records:
        metrics = record["metrics"]
        count = int(metrics["rl/episodes"])
        window = ended[:count][-100:]
        assert metrics["rl/episode_return"] == pytest.approx(np.mean([r for _, r, _ in window]), rel=1e-12)
        assert metrics["rl/episode_length"] == pytest.approx(np.mean([n for _, _, n in window]), rel=1e-12)
    assert int(records[-1]["metrics"]["rl/episodes"]) > 100  # the window is full, and rolls
    saved = _ckpt(tmp_path / "run", 9)["rl"]
    assert saved["window_returns"].tolist() == [r for _, r, _ in ended[:count][-100:]]


# -- bad input: one line naming the key to change, exit 2, no run folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["cartpole", "trainer.clip_grad_norm=-0.5"],
            "ml: error: trainer.clip_grad_norm must be positive, got -0.5",
        ),
        (
            ["pendulum", "task.max_samples=512", "task.env_kwargs.g=abc"],
            "ml: error: task.env_kwargs: Pendulum-v1 with {'g': 'abc'} fails at its first step: TypeError: "
            "unsupported operand",
        ),
        (
            ["cartpole", "task.env_id=nosuchmodule:Foo-v0"],
            "ml: error: task.env_id: cannot make environment 'nosuchmodule:Foo-v0': No module named "
            "'nosuchmodule'",
        ),
        (
            ["cartpole", "task.env_kwargs.max_episode_steps=true"],
            "task.env_kwargs.max_episode_steps must be a positive integer, got True",
        ),
        (
            ["cartpole", "model.action_size=3"],
            "ml: error: model.action_size: the model gives 3 action logits, but the environment has 2 "
            "actions: set model.action_size=2",
        ),
        (["pendulum", "model.continuous=false"], "has none): set model.continuous=true"),
        # log_std went unused (and a DDP job failed at iteration 2 on the unused parameter)
        (
            ["cartpole", "model.continuous=true"],
            "ml: error: model.continuous: the environment's actions are discrete (Discrete(2)), but "
            "ActorCriticMLP has a `log_std` parameter for continuous ones: set model.continuous=false",
        ),
    ],
    ids=[
        "negative-clip",
        "env-kwarg-breaks-step",
        "no-such-module",
        "bool-episode-steps",
        "logits",
        "log-std",
        "log-std-for-discrete-actions",
    ],
)
def test_bad_input_is_one_line_naming_the_key_and_leaves_no_run(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ml.cli import main as ml_main

    monkeypatch.setenv("RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("ML_EXP_NAME", raising=False)
    assert ml_main(["train", *args, "trainer.progress_bar=false"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ml: error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not list((tmp_path / "runs").glob("*/run_*"))


# -- the environment probe: only for the user's env_kwargs, and with the environment's action mask


class _Masked(gymnasium.Env):
    """Three actions; action 2 is illegal in every state (``info["action_mask"]`` says so) and refused,
    as an environment with action masking may; ``crash`` makes its step fail (an argument that breaks
    only when it runs)."""

    observation_space = gymnasium.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
    action_space = gymnasium.spaces.Discrete(3)
    mask = np.array([1, 1, 0], dtype=np.int8)

    def __init__(self, crash: str = "", render_mode: str | None = None) -> None:
        self.crash, self.steps = crash, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.steps = 0
        return np.zeros(4, dtype=np.float32), {"action_mask": self.mask.copy()}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if action == 2:
            raise ValueError("action 2 is masked in this state")
        if self.crash:
            {}[self.crash]  # a KeyError: an error type the probe did not expect
        self.steps += 1
        return (
            np.zeros(4, dtype=np.float32),
            float(action),
            self.steps >= 5,
            False,
            {"action_mask": self.mask.copy()},
        )


gymnasium.register("MlTestMasked-v0", entry_point=_Masked, max_episode_steps=50)


class _MaskedMLP(ActorCriticMLP):
    """Gives action 2 a -inf logit: PPO never picks it."""

    def forward(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, values = super().forward(observations)
        return logits + torch.tensor([0.0, 0.0, float("-inf")]), values


def test_a_masked_environment_trains_with_an_entropy_bonus(tmp_path: Path) -> None:
    """It was refused by the probe (its sampled action 2 raised), and with task.ent_coef > 0 the
    masked logit made every loss NaN."""
    from ml.loggers.jsonl import read_metrics

    task = _small_task(env_id="MlTestMasked-v0", ent_coef=0.01, max_steps=2)
    torch.manual_seed(0)
    model = _MaskedMLP(ActorCriticMLPConfig(name="m", observation_size=4, action_size=3))
    _train(tmp_path, task, model=model)
    records = [r["metrics"] for r in read_metrics(tmp_path / "run" / "logs") if r.get("phase") == "train"]
    assert len(records) == 2
    for metrics in records:
        assert 0 < metrics["rl/entropy"] <= np.log(2) + 1e-6  # over the two possible actions
        assert all(np.isfinite(float(v)) for v in metrics.values())


@pytest.mark.parametrize(
    ("env_kwargs", "refused"),
    [
        ({}, None),  # no arguments of the user's: nothing to probe
        ({"max_episode_steps": 20}, None),  # the step samples among the allowed actions
        ({"crash": "missing"}, "fails at its first step: KeyError: 'missing'"),
    ],
    ids=["no-kwargs", "masked-step", "kwarg-breaks-step"],
)
def test_the_probe_steps_only_for_env_kwargs_with_the_action_mask_and_refuses_any_error(
    env_kwargs: dict, refused: str | None
) -> None:
    from ml.errors import ConfigError

    task = _small_task(env_id="MlTestMasked-v0", env_kwargs=env_kwargs)
    if refused is None:
        _Rollout(task, "sync", 2).close()
        return
    with pytest.raises(ConfigError) as caught:
        _Rollout(task, "sync", 2)
    assert str(caught.value) == f"task.env_kwargs: MlTestMasked-v0 with {env_kwargs} {refused}"


def test_without_env_kwargs_an_environment_s_own_bug_is_the_training_failure_it_is(tmp_path: Path) -> None:
    """Not a one-line refusal blaming arguments the user did not give: the environment's traceback."""

    class Crashes(ClassicControlTask):
        def get_environment(self, render_mode: str | None = None) -> gymnasium.Env:
            return _Masked(crash="missing")

    model = _MaskedMLP(ActorCriticMLPConfig(name="m", observation_size=4, action_size=3))
    with pytest.raises(KeyError, match="missing"):
        _train(tmp_path, _small_task(Crashes), model=model)
    assert not list((tmp_path / "run" / "checkpoints").glob("ckpt.*.pt"))


class _SignalsInEvaluation(Endless):
    """A user's environment without a time limit (tests/e2e/endless_env.py): an episode never ends
    (until ``ends_after`` steps, once the user bounds it). The 200th step of an episode sends this
    process a SIGTERM: only an evaluation's episode gets that far (training takes 16 steps an
    iteration); one that goes on past the 300th fails (no folder for its mark)."""

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.t == 199:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().step(action)


class _EndlessTask(ClassicControlTask):
    ends_after: int | None = None

    def get_environment(self, render_mode: str | None = None) -> gymnasium.Env:
        return _SignalsInEvaluation(ends_after=self.ends_after)

    def get_env_state(self, envs: object) -> None:
        return None


def test_a_stop_signal_abandons_an_evaluation_that_would_never_end_and_the_next_session_does_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An evaluation's episodes run to their end: in an environment without a time limit the run
    could not be stopped, not even to be preempted. The signal abandons it (nothing is logged); the
    continued run evaluates that iteration before it trains on, once."""
    from ml.loggers.jsonl import read_metrics

    def valid_steps() -> list[int]:
        return [r["step"] for r in read_metrics(tmp_path / "run" / "logs") if r.get("phase") == "valid"]

    every = {
        "eval_every_n_iterations": 1,
        "checkpoint": {"save_every_n_steps": 1, "only_save_most_recent": False},
    }
    stopped = _train(tmp_path, _small_task(_EndlessTask, max_steps=2), every)
    assert stopped.stop_signal == signal.SIGTERM
    assert valid_steps() == []
    assert _ckpt(tmp_path / "run", 1)["last_eval_step"] == -1

    monkeypatch.setattr(_EndlessTask, "ends_after", 5)  # the user bounds the episodes, and continues
    _train(tmp_path, _small_task(_EndlessTask, max_steps=2), every)
    assert valid_steps() == [1, 2]
    saved_again = _ckpt(tmp_path / "run", 1)  # once it was done, with the environments where they stand
    assert saved_again["last_eval_step"] == 1 and saved_again["abandoned_eval_step"] is None
    assert saved_again["rl"]["observations"].shape == (2, 4)


def test_a_finished_run_continued_with_another_evaluation_cadence_evaluates_nothing(tmp_path: Path) -> None:
    """Only an evaluation a stop signal abandoned is done again: not one the new cadence would have
    asked for at the step the run ended (it evaluated again and saved its checkpoint anew)."""
    from ml.loggers.jsonl import read_metrics

    settings = {"eval_every_n_iterations": 3, "eval_at_end": False}
    _train(tmp_path, _small_task(max_steps=2), settings)
    again = _train(tmp_path, _small_task(max_steps=2), {**settings, "eval_every_n_iterations": 2})
    assert [r for r in read_metrics(tmp_path / "run" / "logs") if r.get("phase") == "valid"] == []
    assert again.finished


def test_with_early_stopping_every_evaluated_iteration_is_written_first(tmp_path: Path) -> None:
    """As in sl: the evaluation may end the run, and the iteration it ends at is written (here the
    logger writes every 100 iterations otherwise)."""
    from ml.loggers.jsonl import read_metrics

    settings = {
        "eval_every_n_iterations": 2,
        "early_stopping": {"monitor": "rl/eval_return", "patience": 1, "min_delta": 1e9},
    }
    trainer = _train(tmp_path, _small_task(max_steps=8), settings, write_every=100)
    assert trainer.stop_reason is not None  # stopped at the second evaluation
    records = list(read_metrics(tmp_path / "run" / "logs"))
    valid = [r["step"] for r in records if r.get("phase") == "valid"]
    train = {r["step"] for r in records if r.get("phase") == "train"}
    assert valid == [2, 4]
    assert set(valid) <= train
