"""Trains ``ml train pendulum`` (PPO, Gaussian policy) and reports how the evaluation return improves.

Pendulum-v1's return starts near -1200 for an untrained policy; the target is a mean evaluation
return (10 deterministic episodes) better than -400 within 200,000 environment steps. Prints, per
seed: the first and final evaluation return, the best, the environment steps at which the return
first passed -400, env steps/s and wall time. Run it with ``python bench/rl_pendulum.py``.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET = -400.0


def run(seed: int, steps: int, overrides: list[str]) -> dict[str, float]:
    from ml.loggers.jsonl import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        logging_yaml = Path(tmp) / "log.yaml"
        logging_yaml.write_text("logger:\n  - {name: jsonl, write_every_n_steps: 1}\n")
        env = dict(os.environ, RUN_DIR=tmp)
        env.pop("ML_EXP_NAME", None)
        ml = Path(sys.executable).parent / "ml"
        cmd = [
            str(ml),
            "train",
            "pendulum",
            str(logging_yaml),
            f"task.seed={seed}",
            f"task.max_samples={steps}",
        ]
        subprocess.run(
            [*cmd, *overrides], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        records = list(read_metrics(Path(tmp) / "pendulum" / "run_0" / "logs"))
    evals, env_steps = [], 0.0
    for r in records:
        env_steps = r["metrics"].get("rl/env_steps", env_steps)
        if "rl/eval_return" in r["metrics"]:
            evals.append((env_steps, r["metrics"]["rl/eval_return"]))
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
