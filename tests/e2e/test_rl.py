"""End-to-end tests of the ``rl`` trainer: real ``ml train cartpole`` processes (forked from one that
imported torch where no signal reaches them, tests/forked_ml.py), signals and files.

A short CartPole run improves its return. A run stopped by SIGTERM (at an iteration boundary) and
continued from its ``config.yaml`` ends with exactly the tensors of a run that never stopped:
model, optimizer, generators and the environments' own state, and logs the same episode
statistics. A bad environment id, a model whose actions do not fit the environment and a setting
that means nothing each stop with one ``ml: error:`` line and exit code 2, leaving no run folder.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ml.loggers.jsonl import read_metrics
from tests.forked_ml import run_ml
from tests.same import assert_same

pytest.importorskip("gymnasium")

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 120
ITERATIONS = 30

LOGGING = """\
logger:
  - {name: jsonl, write_every_n_steps: 1}
"""


def _env(run_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ML_EXP_NAME", None)
    env["RUN_DIR"] = str(run_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(run_dir: Path, *args: str) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "stderr.txt").open("a") as err:
        return subprocess.Popen(
            [*ML, "train", *args], env=_env(run_dir), stdout=subprocess.DEVNULL, stderr=err
        )


def _train(run_dir: Path, *args: str, expected: int = 0) -> str:
    """``ml train ARGS`` to completion, forked from a process that imported torch
    (tests/forked_ml.py): for a run no signal reaches. Returns its stderr."""
    result = run_ml(["train", *args], _env(run_dir), timeout_s=TIMEOUT_S)
    assert result.returncode == expected, f"exit {result.returncode}\n{result.stderr}"
    return result.stderr


def _finish(proc: subprocess.Popen, run_dir: Path, expected: int = 0) -> str:
    try:
        code = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    stderr = (run_dir / "stderr.txt").read_text()
    assert code == expected, f"exit {code}\n{stderr}"
    return stderr


@pytest.fixture(scope="module")
def logging_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "logging.yaml"
    path.write_text(LOGGING)
    return path


def _metric(exp_dir: Path, name: str) -> list[float]:
    return [r["metrics"][name] for r in read_metrics(exp_dir / "logs") if name in r["metrics"]]


def test_short_cartpole_run_improves_the_return(tmp_path: Path, logging_yaml: Path) -> None:
    # As Stable-Baselines3's EvalCallback keeps best_model: the best checkpoint by evaluation return.
    monitor = "trainer.checkpoint.monitor=rl/eval_return"
    _train(tmp_path, "cartpole", str(logging_yaml), "task.max_samples=10240", monitor)
    exp_dir = tmp_path / "cartpole" / "run_0"
    returns = _metric(exp_dir, "rl/episode_return")
    evals = _metric(exp_dir, "rl/eval_return")
    assert returns[0] < 40  # a random policy balances the pole for about 20 steps
    assert sum(returns[-5:]) / 5 > 3 * returns[0]
    assert evals[-1] > 3 * returns[0]
    by_step = {
        r["step"]: r["metrics"]["rl/eval_return"]
        for r in read_metrics(exp_dir / "logs")
        if "rl/eval_return" in r["metrics"]
    }
    best_step = max(by_step, key=lambda step: (by_step[step], -step))  # the earliest of equals
    assert os.readlink(exp_dir / "checkpoints" / "best.pt") == f"ckpt.{best_step}.pt"
    best = torch.load(exp_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["score"] == {"metric": "rl/eval_return", "value": by_step[best_step]}
    speeds = _metric(exp_dir, "rl/env_steps_per_s")
    assert speeds[-1] > 0 and _metric(exp_dir, "rl/env_steps")[-1] == 10240


def _checkpoint(exp_dir: Path) -> dict[str, Any]:
    return torch.load(exp_dir / "checkpoints" / "ckpt.pt", weights_only=True)


def test_sigterm_at_an_iteration_boundary_then_resume_is_exact(tmp_path: Path, logging_yaml: Path) -> None:
    args = (
        "cartpole",
        str(logging_yaml),
        f"task.max_steps={ITERATIONS}",
        "task.env_kwargs.max_episode_steps=60",
    )
    reference = _start(tmp_path / "reference", *args)  # short episodes: many end mid-rollout
    stopped_dir = tmp_path / "stopped"
    proc = _start(stopped_dir, *args)
    exp_dir = stopped_dir / "cartpole" / "run_0"
    deadline = time.monotonic() + 60
    while not (exp_dir / "logs" / "metrics.jsonl").exists() or len(_metric(exp_dir, "rl/env_steps")) < 4:
        assert proc.poll() is None and time.monotonic() < deadline, (stopped_dir / "stderr.txt").read_text()
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _finish(proc, stopped_dir)
    stopped_at = int(os.readlink(exp_dir / "checkpoints" / "ckpt.pt")[5:-3])
    assert 4 <= stopped_at < ITERATIONS, stopped_at
    stopped = _checkpoint(exp_dir)
    assert stopped["rl"]["env_state"] is not None
    stderr = _finish(_start(stopped_dir, str(exp_dir / "config.yaml")), stopped_dir)
    assert "resuming resets them" not in stderr

    _finish(reference, tmp_path / "reference")
    expected = _checkpoint(tmp_path / "reference" / "cartpole" / "run_0")
    resumed = _checkpoint(exp_dir)
    assert os.readlink(exp_dir / "checkpoints" / "ckpt.pt") == f"ckpt.{ITERATIONS}.pt"
    for key in ("model", "optim", "lr", "rl", "rng", "task"):
        assert_same(resumed[key], expected[key], key)
    env_state = resumed["rl"]["env_state"]
    assert any(s["elapsed_steps"] > 0 for s in env_state)  # episodes in flight at the boundary
    steps = [r["step"] for r in read_metrics(exp_dir / "logs") if "rl/env_steps" in r["metrics"]]
    assert steps == list(range(1, ITERATIONS + 1))  # counters continue; no iteration logged twice
    # The episode statistics (a rolling window over the last 100 episodes) continue as they were.
    assert _episode_logs(exp_dir) == _episode_logs(tmp_path / "reference" / "cartpole" / "run_0")


def _episode_logs(exp_dir: Path) -> list[tuple[int, float, float, float]]:
    return [
        (
            r["step"],
            r["metrics"]["rl/episodes"],
            r["metrics"]["rl/episode_return"],
            r["metrics"]["rl/episode_length"],
        )
        for r in read_metrics(exp_dir / "logs")
        if "rl/episode_return" in r["metrics"]
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("cartpole", "task.env_id=NoSuchEnv-v0"), "NoSuchEnv"),
        (
            ("pendulum", "model.action_size=2"),
            "model.action_size: the model gives actions of shape (2,), but the environment's are (1,)",
        ),
        (("cartpole", "model.observation_size=5"), "cannot act on CartPole-v1 observations of shape (4,)"),
        (("cartpole", "task.gamma=1.5"), "task.gamma must be in [0, 1], got 1.5"),
    ],
    ids=["bad-env-id", "wrong-action-shape", "wrong-observation-size", "bad-gamma"],
)
def test_bad_environment_or_actions_give_one_clear_line(tmp_path: Path, args: tuple, message: str) -> None:
    stderr = _train(tmp_path, *args, expected=2)
    errors = [line for line in stderr.splitlines() if line.startswith("ml: error:")]
    assert len(errors) == 1 and message in errors[0], stderr
    assert "Traceback" not in stderr
    assert not any((tmp_path / args[0]).glob("run_*"))  # no run folder left behind


@pytest.mark.parametrize("change", ["task.num_envs=16", "trainer.vectorization=async"])
def test_continuing_with_other_environments_resets_them_and_says_so(
    tmp_path: Path, logging_yaml: Path, change: str
) -> None:
    _train(tmp_path, "cartpole", str(logging_yaml), "task.max_steps=2")
    exp_dir = tmp_path / "cartpole" / "run_0"
    # Other environments change the experiment: continuing takes --allow-config-change.
    flags = ["--allow-config-change"] if change.startswith("task.") else []
    stderr = _train(tmp_path, str(exp_dir / "config.yaml"), "task.max_steps=4", change, *flags)
    assert "resuming resets them" in stderr
    assert os.readlink(exp_dir / "checkpoints" / "ckpt.pt") == "ckpt.4.pt"


# No moviepy here: for trainer.record_video to record, a stand-in writes which rank saved a video.
_MOVIEPY = """
import os


class ImageSequenceClip:
    def __init__(self, frames, fps=None):
        self.frames = len(frames)

    def write_videofile(self, path, logger=None):
        with open(path, "a") as f:
            f.write(f"{self.frames} frames from rank {os.environ.get('RANK')}\\n")

    def close(self):
        pass
"""


@pytest.mark.parametrize("where", ["evaluation", "video"])
def test_sigterm_stops_a_job_s_evaluation_that_would_never_end(
    tmp_path: Path, logging_yaml: Path, where: str
) -> None:
    """In a job of two processes a stop signal reaches each rank at its own moment: in an evaluation
    the ranks agree at each environment step and abandon it together (it used to run on, forever in
    an environment without a time limit), and the checkpoint says which evaluation to do first; the
    video's episode is rank 0's alone (it used to be every rank's, into one file), which stops it."""
    marks = tmp_path / "marks"
    marks.mkdir()
    env = _env(tmp_path)
    paths = [str(Path(__file__).parent), env.get("PYTHONPATH", "")]
    overrides = ["task.env_id=endless_env:Endless-v0"]
    if where == "video":
        video = tmp_path / "moviepy" / "video" / "io"
        video.mkdir(parents=True)
        for folder in (video, video.parent, video.parent.parent):
            (folder / "__init__.py").touch()
        (video / "ImageSequenceClip.py").write_text(_MOVIEPY)
        paths.insert(0, str(tmp_path))
        overrides = ["task.env_id=endless_env:EndlessVideo-v0", "trainer.record_video=true"]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["ENDLESS_MARKS"] = str(marks)
    command = [
        *ML, "launch", "cartpole", str(logging_yaml), "launcher.name=torchrun", "launcher.nproc_per_node=2",
        "task.max_samples=null", "task.max_steps=3", "task.num_envs=2", "task.num_env_steps=32",
        "task.minibatch_size=32", "task.num_update_epochs=1", "trainer.eval_every_n_iterations=1",
        "trainer.num_eval_episodes=2", *overrides,
    ]  # fmt: skip
    with (tmp_path / "stderr.txt").open("w") as err:
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while len(list(marks.iterdir())) < (2 if where == "evaluation" else 1):  # in the long episodes
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # to torchrun (`ml launch` became it), which passes it on
        proc.wait(timeout=TIMEOUT_S)  # (torchrun itself then exits 1, with its own traceback)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the workers too
    exp_dir = tmp_path / "cartpole" / "run_0"
    saved = _checkpoint(exp_dir)
    if where == "evaluation":
        assert saved["abandoned_eval_step"] == 1 and saved["last_eval_step"] == -1
        assert _metric(exp_dir, "rl/eval_return") == []
    else:  # iteration 1's evaluation was over; its video ends where the signal stopped it
        assert saved["last_eval_step"] == 1
        videos = [p.read_text() for p in (exp_dir / "videos").iterdir()]
        assert len(videos) == 1 and [line.split()[-1] for line in videos[0].splitlines()] == ["0"], videos
