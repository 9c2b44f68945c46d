"""Compares ``ml train cartpole`` (our PPO) with Stable-Baselines3 PPO on CartPole-v1, same hyperparameters.

Both use rl-zoo's tuned CartPole set: 8 environments, 32 steps each per rollout, 20 epochs of
minibatches of 256, gamma 0.98, GAE lambda 0.8, learning rate 1e-3 and clip range 0.2 both decaying
linearly over 100,000 environment steps, no entropy bonus, gradient norm clipped at 0.5, Adam with
eps 1e-5, separate 64-64 tanh policy and value networks. Each run trains for ``--steps`` environment
steps (schedules still span 100,000, as in rl-zoo) with one torch thread, and every 2,560 steps
evaluates the deterministic policy on 10 episodes run side by side (seeded alike for both).

The table gives, per library and seed: env steps/s (training only, evaluations excluded), wall time
of the training run (evaluations included, interpreter start-up excluded), the environment steps
after which the mean evaluation return first reached 475, and the final evaluation return.

Run it with ``python bench/rl_cartpole.py`` (needs ``pip install -e ".[bench]"``).
"""

import argparse
import time

import numpy as np
from ml_runs import evaluations, train_example

HORIZON = 100_000
EVAL_EVERY = 2_560  # 10 rollouts of 8 x 32 steps
NUM_EVAL = 10
TARGET = 475.0


def run_ours(seed: int, steps: int) -> dict[str, float]:
    """Trains with the ``ml`` command in a subprocess; reads its metrics.jsonl."""
    records = train_example("cartpole", seed, steps)
    evals = evaluations(records)
    last_train = [r for r in records if "rl/env_steps_per_s" in r["metrics"]][-1]
    return {
        "steps_per_s": last_train["metrics"]["rl/env_steps_per_s"],
        "wall_s": records[-1]["elapsed_s"],
        "reached": next((s for s, ret in evals if ret >= TARGET), float("nan")),
        "final": evals[-1][1],
    }


def _eval_sb3(model: object, seed: int, round_: int) -> float:
    import gymnasium
    from gymnasium.vector import AutoresetMode

    from ml.trainers.rl import env_seeds

    envs = gymnasium.vector.SyncVectorEnv(
        [lambda: gymnasium.make("CartPole-v1")] * NUM_EVAL, autoreset_mode=AutoresetMode.SAME_STEP
    )
    obs, _ = envs.reset(seed=env_seeds(seed, 0, NUM_EVAL, stream=2**20 + round_))
    returns, running = np.zeros(NUM_EVAL), np.ones(NUM_EVAL, dtype=bool)
    while running.any():
        actions, _ = model.predict(obs, deterministic=True)  # type: ignore[attr-defined]
        obs, rewards, terminated, truncated, _ = envs.step(actions)
        returns += rewards * running
        running &= ~(terminated | truncated)
    envs.close()
    return float(returns.mean())


def run_sb3(seed: int, steps: int) -> dict[str, float]:
    """Trains Stable-Baselines3 PPO in this process with one torch thread."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(1)

    class Evaluate(BaseCallback):
        """Evaluates after every 10th update (as ours does); stops after the update that passes ``steps``."""

        def __init__(self) -> None:
            super().__init__()
            self.evals: list[tuple[int, float]] = []
            self.eval_time = 0.0
            self.done = False

        def _on_rollout_start(self) -> None:
            if self.num_timesteps > 0 and self.num_timesteps % EVAL_EVERY == 0:
                started = time.perf_counter()
                self.evals.append(
                    (self.num_timesteps, _eval_sb3(self.model, seed, self.num_timesteps // 256))
                )
                self.eval_time += time.perf_counter() - started
            self.done = self.num_timesteps >= steps

        def _on_step(self) -> bool:
            return not self.done  # the step taken after the last update is discarded unused

    linear = lambda start: lambda progress: start * progress  # noqa: E731
    started = time.perf_counter()
    model = PPO(
        "MlpPolicy",
        make_vec_env("CartPole-v1", n_envs=8, seed=seed),
        n_steps=32,
        batch_size=256,
        n_epochs=20,
        gamma=0.98,
        gae_lambda=0.8,
        learning_rate=linear(1e-3),
        clip_range=linear(0.2),
        ent_coef=0.0,
        seed=seed,
        device="cpu",
        verbose=0,
    )
    callback = Evaluate()
    model.learn(total_timesteps=HORIZON, callback=callback)
    wall = time.perf_counter() - started
    trained = model.num_timesteps - 8
    if not callback.evals or callback.evals[-1][0] != trained:
        callback.evals.append((trained, _eval_sb3(model, seed, trained // 256)))
    return {
        "steps_per_s": (model.num_timesteps - 8) / (wall - callback.eval_time),
        "wall_s": wall,
        "reached": next((s for s, ret in callback.evals if ret >= TARGET), float("nan")),
        "final": callback.evals[-1][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=50_000, help="environment steps per run")
    parser.add_argument("--only", choices=["ml", "sb3"], help="run one library only")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        for name, fn in (("ml", run_ours), ("sb3", run_sb3)):
            if args.only in (None, name):
                result = fn(seed, args.steps)
                rows.append((name, seed, result))
                print(f"# {name} seed {seed}: {result}", flush=True)
    columns = ("env steps/s", "wall s", "steps to 475", "final return")
    header = f"{'library':<8} {'seed':>4} " + " ".join(f"{c:>13}" for c in columns)
    print(header)
    print("-" * len(header))
    for name, seed, r in rows:
        reached = "never" if np.isnan(r["reached"]) else f"{int(r['reached']):,}"
        print(
            f"{name:<8} {seed:>4} {r['steps_per_s']:>13,.0f} {r['wall_s']:>13.1f} {reached:>13} "
            f"{r['final']:>13.1f}"
        )
    for name in ("ml", "sb3"):
        speeds = [r["steps_per_s"] for n, _, r in rows if n == name]
        if speeds:
            print(f"{name}: mean {np.mean(speeds):,.0f} env steps/s")
    ours = [r["steps_per_s"] for n, _, r in rows if n == "ml"]
    theirs = [r["steps_per_s"] for n, _, r in rows if n == "sb3"]
    if ours and theirs:
        print(f"ml / sb3 env steps/s: {np.mean(ours) / np.mean(theirs):.2f}x")


if __name__ == "__main__":
    main()
