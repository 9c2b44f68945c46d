"""Trains ``ml train pendulum`` (PPO, Gaussian policy) and reports how the evaluation return improves.

Pendulum-v1's return starts near -1200 for an untrained policy; the target is a mean evaluation
return (10 deterministic episodes) better than -400 within 200,000 environment steps. Prints, per
seed: the first and final evaluation return, the best, the environment steps at which the return
first passed -400, env steps/s and wall time. Run it with ``python bench/rl_pendulum.py``.
"""

import argparse

from ml_runs import evaluations, train_example

TARGET = -400.0


def run(seed: int, steps: int, overrides: list[str]) -> dict[str, float]:
    records = train_example("pendulum", seed, steps, overrides)
    evals = evaluations(records)
    for s, ret in evals:
        print(f"#   seed {seed} {int(s):>7,} env steps: eval return {ret:8.1f}", flush=True)
    speeds = [r["metrics"]["rl/env_steps_per_s"] for r in records if "rl/env_steps_per_s" in r["metrics"]]
    return {
        "first": evals[0][1],
        "final": evals[-1][1],
        "best": max(ret for _, ret in evals),
        "reached": next((s for s, ret in evals if ret > TARGET), float("nan")),
        "steps_per_s": speeds[-1],
        "wall_s": records[-1]["elapsed_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for ml train")
    args = parser.parse_args()
    rows = [(seed, run(seed, args.steps, args.overrides)) for seed in args.seeds]
    columns = ("first eval", "final eval", "best", "steps to -400", "env steps/s", "wall s")
    header = f"{'seed':>4} " + " ".join(f"{c:>13}" for c in columns)
    print(header)
    print("-" * len(header))
    for seed, r in rows:
        reached = "never" if r["reached"] != r["reached"] else f"{int(r['reached']):,}"
        print(
            f"{seed:>4} {r['first']:>13.1f} {r['final']:>13.1f} {r['best']:>13.1f} {reached:>13} "
            f"{r['steps_per_s']:>13,.0f} {r['wall_s']:>13.1f}"
        )


if __name__ == "__main__":
    main()
