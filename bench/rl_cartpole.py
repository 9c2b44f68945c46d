"""Compares ``ml train cartpole`` (our PPO) with Stable-Baselines3 PPO on CartPole-v1, same hyperparameters.

Both use rl-zoo's tuned CartPole set: 8 environments, 32 steps each per rollout, 20 epochs of
minibatches of 256, gamma 0.98, GAE lambda 0.8, learning rate 1e-3 and clip range 0.2 both decaying
linearly over 100,000 environment steps, no entropy bonus, gradient norm clipped at 0.5, Adam with
eps 1e-5, separate 64-64 tanh policy and value networks. Each run trains for ``--steps`` environment
steps (schedules still span 100,000, as in rl-zoo) with one torch thread, and every 2,560 steps
evaluates the deterministic policy on 10 episodes run side by side (seeded alike for both). For each
seed the two libraries run one after the other, so that a busy machine slows both alike.

The table gives, per library and seed: env steps/s (training only: all the time from the start of
the training loop, logging and checkpoints included, less the evaluations; set-up and interpreter
start-up excluded, for both), wall time of the training run (evaluations included), the
environment steps after which the mean evaluation return first reached 475, and the final
evaluation return. The summary gives the median steps to 475 of each library and the ratio of
their mean and median env steps/s. ``bench/results/rl_cartpole.json`` gets the same.

Run it with ``python bench/rl_cartpole.py`` (needs ``pip install -e ".[bench]"``); the defaults
(3 seeds of 50,000 steps) take about 2 minutes on this 2-core machine, 3 when it is busy.
"""

import argparse
import time

import numpy as np
from common import median, table, write_results
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
    seeds: list[int | None] = [*env_seeds(seed, 0, NUM_EVAL, stream=2**20 + round_)]
    obs, _ = envs.reset(seed=seeds)
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
            self.started = 0.0
            self.done = False

        def _on_training_start(self) -> None:
            self.started = time.perf_counter()  # as ours: set-up (model, environments) not counted

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
    wall = time.perf_counter() - callback.started
    trained = model.num_timesteps - 8
    if not callback.evals or callback.evals[-1][0] != trained:
        callback.evals.append((trained, _eval_sb3(model, seed, trained // 256)))
    return {
        "steps_per_s": trained / (wall - callback.eval_time),
        "wall_s": wall,
        "reached": next((s for s, ret in callback.evals if ret >= TARGET), float("nan")),
        "final": callback.evals[-1][1],
    }


RUNS = {"ml": run_ours, "sb3": run_sb3}


def summarise(rows: list[dict]) -> dict[str, float]:
    """Median steps to 475 per library, mean and median env steps/s, and ml's speed over sb3's."""
    summary: dict[str, float] = {}
    for name in RUNS:
        mine = [r for r in rows if r["library"] == name]
        if not mine:
            continue
        reached = [r["steps_to_475"] for r in mine]
        # A run that never reached 475 counts as infinitely slow (it ranks last).
        summary[f"{name}_median_steps_to_475"] = median([float("inf") if x is None else x for x in reached])
        summary[f"{name}_mean_steps_per_s"] = float(np.mean([r["env_steps_per_s"] for r in mine]))
        summary[f"{name}_median_steps_per_s"] = median([r["env_steps_per_s"] for r in mine])
    if "ml_mean_steps_per_s" in summary and "sb3_mean_steps_per_s" in summary:
        summary["speed_ratio_of_means"] = summary["ml_mean_steps_per_s"] / summary["sb3_mean_steps_per_s"]
        summary["speed_ratio_of_medians"] = (
            summary["ml_median_steps_per_s"] / summary["sb3_median_steps_per_s"]
        )
        ratios = [
            ml["env_steps_per_s"] / sb3["env_steps_per_s"]
            for ml in rows
            for sb3 in rows
            if ml["library"] == "ml" and sb3["library"] == "sb3" and ml["seed"] == sb3["seed"]
        ]
        summary["speed_ratio_per_seed_median"] = median(ratios)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--steps",
        type=int,
        default=50_000,
        help="environment steps per run (default: 50,000, ~1 minute a seed)",
    )
    parser.add_argument("--only", choices=sorted(RUNS), help="run one library only")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        for name, fn in RUNS.items():  # interleaved: each seed runs both libraries back to back
            if args.only in (None, name):
                result = fn(seed, args.steps)
                reached = None if np.isnan(result["reached"]) else int(result["reached"])
                rows.append(
                    {
                        "library": name,
                        "seed": seed,
                        "env_steps_per_s": result["steps_per_s"],
                        "wall_s": result["wall_s"],
                        "steps_to_475": reached,
                        "final_return": result["final"],
                    }
                )
                print(f"# {name} seed {seed}: {rows[-1]}", flush=True)
    columns = ("library", "seed", "env steps/s", "wall s", "steps to 475", "final return")
    keys = ("library", "seed", "env_steps_per_s", "wall_s", "steps_to_475", "final_return")
    print()
    print(table(columns, [[r[k] if r[k] is not None else "never" for k in keys] for r in rows]))
    summary = summarise(rows)
    print()
    lines = []
    for name in RUNS:
        if f"{name}_mean_steps_per_s" in summary:
            steps_475 = summary[f"{name}_median_steps_to_475"]
            lines.append(
                [
                    name,
                    summary[f"{name}_mean_steps_per_s"],
                    summary[f"{name}_median_steps_per_s"],
                    "never" if steps_475 == float("inf") else int(steps_475),
                ]
            )
    print(table(("library", "mean env steps/s", "median env steps/s", "median steps to 475"), lines))
    if "speed_ratio_of_means" in summary:
        print(
            f"\nml / sb3 env steps/s: {summary['speed_ratio_of_means']:.2f}x (means), "
            f"{summary['speed_ratio_of_medians']:.2f}x (medians), "
            f"{summary['speed_ratio_per_seed_median']:.2f}x (median of per-seed ratios)"
        )
    write_results(
        "rl_cartpole",
        {
            "settings": {
                "seeds": args.seeds,
                "steps": args.steps,
                "schedule_env_steps": HORIZON,
                "eval_every_env_steps": EVAL_EVERY,
                "eval_episodes": NUM_EVAL,
                "target_return": TARGET,
                "torch_threads": 1,
            },
            "rows": rows,
            "summary": {k: (None if v == float("inf") else v) for k, v in summary.items()},
        },
        peers=("stable-baselines3", "gymnasium"),
    )


if __name__ == "__main__":
    main()
