"""Runs a packaged ``ml`` example in a subprocess and reads back its evaluations (for the RL benches)."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ml.loggers.jsonl import read_metrics


def train_example(
    example: str, seed: int, env_steps: int, overrides: list[str] | None = None
) -> list[dict[str, Any]]:
    """``ml train <example>`` for ``env_steps`` environment steps, logging every iteration; its records."""
    with tempfile.TemporaryDirectory() as tmp:
        logging_yaml = Path(tmp) / "log.yaml"
        logging_yaml.write_text("logger:\n  - {name: jsonl, write_every_n_steps: 1}\n")
        env = dict(os.environ, RUN_DIR=tmp)
        env.pop("ML_EXP_NAME", None)
        ml = Path(sys.executable).parent / "ml"
        cmd = [
            str(ml),
            "train",
            example,
            str(logging_yaml),
            f"task.seed={seed}",
            f"task.max_samples={env_steps}",
        ]
        subprocess.run(
            [*cmd, *(overrides or [])],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return list(read_metrics(Path(tmp) / example / "run_0" / "logs"))


def evaluations(records: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """``(env steps, mean evaluation return)`` of each evaluation, in order.

    The final evaluation has a record of its own, without ``rl/env_steps``: it counts at the last
    step seen.
    """
    evals, env_steps = [], 0.0
    for r in records:
        env_steps = r["metrics"].get("rl/env_steps", env_steps)
        if "rl/eval_return" in r["metrics"]:
            evals.append((env_steps, r["metrics"]["rl/eval_return"]))
    return evals
