"""Tests of ``ml runs`` and of the run-status marker (``status.json``) it reads.

The module fixture trains five real runs of a tiny digits model at once, each in its own ``ml
train`` subprocess under one RUN_DIR: ``done`` (``ml train digits``, 5 steps, exit 0), ``failed``
(a task that raises after 3 steps, exit 1), ``stopped`` (SIGTERM once training logs, exit 0),
``killed`` (SIGKILL once training logs) and ``live`` (still training while ``ml runs`` looks; it
is stopped with SIGTERM when the module's tests are done). The reader's rules for odd folders
(truncated and repeated log lines, stale markers, locks of other hosts) are checked on folders
written by hand, and the marker's rules on in-process runs of the tiny trainer.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ml.tools.experiments import STATES, describe_run, find_runs, summarize_metrics

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 180
HOST = socket.gethostname()

TASK_MODULE = "ml_runs_test_task"
TASK_SOURCE = '''\
"""The digits task, slowed down (so a test can stop it mid-run) or failing after some steps."""

import time
from dataclasses import dataclass

from ml.core.config import conf_field
from ml.examples.digits import DigitsTask, DigitsTaskConfig


@dataclass
class SlowDigitsConfig(DigitsTaskConfig):
    step_sleep_s: float = conf_field(0.0, help="Sleep this long in each training batch's loss")
    fail_after_steps: int | None = conf_field(None, help="Raise in the loss of the step after this many")


class SlowDigitsTask(DigitsTask):
    def __init__(self, config: SlowDigitsConfig) -> None:
        super().__init__(config)

    def compute_loss(self, model, batch, state, output):
        if state.training:
            if state.num_steps == self.config.fail_after_steps:
                raise TypeError(f"planned failure after step {state.num_steps}")
            time.sleep(self.config.step_sleep_s)
        return super().compute_loss(model, batch, state, output)
'''

SLOW_YAML = f"""\
# ml train slow.yaml trainer.exp_name=...
model: {{name: digits_mlp, hidden: 16, num_layers: 1}}
task:
  name: "{TASK_MODULE}:SlowDigitsTask"
  max_steps: 1000000
  step_sleep_s: 0.02
  train_dl: {{batch_size: 16}}
  valid_dl: {{batch_size: 512}}
  test_dl: {{batch_size: 512}}
optimizer: {{name: adam, lr: 1e-3}}
trainer: {{name: sl, valid_every_n_steps: 2, checkpoint: {{save_every_n_steps: 2}}}}
logger: [{{name: jsonl, write_every_n_steps: 1}}]
"""

JSONL_ONLY = "logger=[{name: jsonl, write_every_n_steps: 1}]"
DONE_ARGS = (
    "digits",
    "task.max_steps=5",
    "lr_scheduler.warmup_steps=1",  # the digits schedule warms up for 100 steps
    "model.channels=4",
    "model.hidden=16",
    "trainer.valid_every_n_steps=2",
    "trainer.exp_name=done",
    JSONL_ONLY,
)


# ---------------------------------------------------------------------------------------------
# The real runs


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    folder: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr(self) -> str:
        return (self.folder / f"{self.name}.stderr").read_text()

    def wait(self) -> int:
        try:
            return self.popen.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise


@dataclass
class Runs:
    run_dir: Path
    lib: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)

    def exp_dir(self, name: str) -> Path:
        return self.run_dir / name / "run_0"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("ML_EXP_NAME", None)
        env["RUN_DIR"] = str(self.run_dir)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.lib), env.get("PYTHONPATH")]))
        env["OMP_NUM_THREADS"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, name: str, *args: str) -> Proc:
        logs = self.run_dir.parent / "logs"
        logs.mkdir(exist_ok=True)
        # Output to files, not pipes: a killed process's children could hold a pipe open.
        with (logs / f"{name}.stdout").open("w") as out, (logs / f"{name}.stderr").open("w") as err:
            popen = subprocess.Popen([*ML, "train", *args], env=self.env(), stdout=out, stderr=err)
        proc = self.procs[name] = Proc(name, popen, logs)
        return proc

    def wait_for_training(self, name: str) -> None:
        """Waits until the run's metrics.jsonl holds a complete training record."""
        proc, metrics = self.procs[name], self.exp_dir(name) / "logs" / "metrics.jsonl"
        deadline = time.monotonic() + TIMEOUT_S
        while not (metrics.exists() and any(r["phase"] == "train" for r in _records(metrics))):
            assert proc.popen.poll() is None, f"{name} exited ({proc.popen.returncode}):\n{proc.stderr()}"
            assert time.monotonic() < deadline, f"{name} did not start training"
            time.sleep(0.05)

    def ml_runs(
        self, *args: str | Path, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*ML, "runs", *map(str, args)],
            env=self.env() if env is None else env,
            capture_output=True,
            text=True,
            timeout=60,
        )


def _records(metrics: Path) -> list[dict]:
    """The complete records of a metrics file (a line being written may be cut short)."""
    out = []
    for line in metrics.read_text().splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            out.append(json.loads(line))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    root = tmp_path_factory.mktemp("ml_runs")
    lib = root / "lib"
    lib.mkdir()
    (lib / f"{TASK_MODULE}.py").write_text(TASK_SOURCE)
    slow = root / "slow.yaml"
    slow.write_text(SLOW_YAML)
    result = Runs(root / "runs", lib)
    try:
        result.start("done", *DONE_ARGS)
        result.start(
            "failed", str(slow), "trainer.exp_name=failed", "task.fail_after_steps=3", "task.step_sleep_s=0"
        )
        for name in ("stopped", "killed", "live"):
            result.start(name, str(slow), f"trainer.exp_name={name}")
        for name, sig in (("stopped", signal.SIGTERM), ("killed", signal.SIGKILL)):
            result.wait_for_training(name)
            result.procs[name].popen.send_signal(sig)
        result.wait_for_training("live")
        for name in ("done", "failed", "stopped", "killed"):
            result.codes[name] = result.procs[name].wait()
        yield result
    finally:
        for proc in result.procs.values():
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in result.procs.values():
            try:
                proc.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()


def _by_name(listing: list[dict]) -> dict[str, dict]:
    return {row["name"]: row for row in listing}


def _json(runs: Runs, *args: str | Path) -> list[dict]:
    result = runs.ml_runs(runs.run_dir, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _status(runs: Runs, name: str) -> dict:
    return json.loads((runs.exp_dir(name) / "status.json").read_text())


def _linked_step(exp_dir: Path) -> int:
    return int(os.readlink(exp_dir / "checkpoints" / "ckpt.pt").split(".")[1])


# ---------------------------------------------------------------------------------------------
# The marker the trainer writes


def test_the_runs_ended_as_planned(runs: Runs) -> None:
    assert runs.codes == {"done": 0, "failed": 1, "stopped": 0, "killed": -signal.SIGKILL}, {
        name: runs.procs[name].stderr()[-2000:] for name in runs.codes
    }
    assert "training failed: TypeError: planned failure after step 3" in runs.procs["failed"].stderr()


def test_a_finished_run_is_marked_finished(runs: Runs) -> None:
    status = _status(runs, "done")
    assert status["state"] == "finished"
    assert status["step"] == 5 == _linked_step(runs.exp_dir("done"))
    assert status["signal"] is None and status["error"] is None
    assert status["pid"] == runs.procs["done"].pid and status["host"] == HOST
    assert status["elapsed_s"] > 0
    assert time.time() - _timestamp(status["time"]) < 3600
    assert not (runs.exp_dir("done") / ".lock_running").exists()
    assert not list(runs.exp_dir("done").glob(".status.json*"))  # no temporary file left behind


def test_a_run_stopped_by_sigterm_is_marked_interrupted_at_its_checkpoint(runs: Runs) -> None:
    status = _status(runs, "stopped")
    assert status["state"] == "interrupted" and status["signal"] == "SIGTERM" and status["error"] is None
    assert status["step"] == _linked_step(runs.exp_dir("stopped"))  # the stop's own checkpoint
    assert "Stopping on SIGTERM" in runs.procs["stopped"].stderr()


def test_a_failed_run_is_marked_failed_with_its_error(runs: Runs) -> None:
    status = _status(runs, "failed")
    assert status["state"] == "failed" and status["signal"] is None
    assert status["error"] == "TypeError: planned failure after step 3"
    assert status["step"] == 3
    assert not (runs.exp_dir("failed") / ".lock_running").exists()  # the teardown ran in full


def test_a_killed_run_leaves_a_provisional_marker_and_a_stale_lock(runs: Runs) -> None:
    # The marker a session writes as it starts (room kept for its end, see ml.run.status) stays.
    assert json.loads((runs.exp_dir("killed") / "status.json").read_text())["state"] == "running"
    lock = (runs.exp_dir("killed") / ".lock_running").read_text()
    assert f"pid: {runs.procs['killed'].pid}" in lock


def _timestamp(text: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(text).timestamp()


# ---------------------------------------------------------------------------------------------
# ml runs on the real runs


def test_json_describes_every_run(runs: Runs) -> None:
    listing = _json(runs)
    assert [(row["name"], row["run"]) for row in listing] == [
        ("done", "run_0"),
        ("failed", "run_0"),
        ("killed", "run_0"),
        ("live", "run_0"),
        ("stopped", "run_0"),
    ]  # by name, then run number
    rows = _by_name(listing)
    assert {name: row["state"] for name, row in rows.items()} == {
        "done": "finished",
        "failed": "failed",
        "killed": "crashed",
        "live": "running",
        "stopped": "interrupted",
    }
    assert rows["live"]["pid"] == runs.procs["live"].pid and rows["live"]["host"] == HOST
    assert rows["killed"]["pid"] == runs.procs["killed"].pid
    assert rows["stopped"]["signal"] == "SIGTERM"
    assert rows["failed"]["error"] == "TypeError: planned failure after step 3"
    assert rows["failed"]["step"] == 3 and rows["failed"]["checkpoint_step"] == 2

    done = rows["done"]
    records = _records(runs.exp_dir("done") / "logs" / "metrics.jsonl")
    valid = [r for r in records if r["phase"] == "valid"]
    best = min(valid, key=lambda r: r["metrics"]["valid/loss"])
    train = [r for r in records if r["phase"] == "train"]
    assert done["step"] == 5 and done["checkpoint_step"] == 5 and done["run_number"] == 0
    assert done["path"] == str(runs.exp_dir("done").resolve())
    assert done["checkpoint"].endswith("checkpoints/ckpt.5.pt")
    assert (
        abs(
            _timestamp(done["checkpoint_time"])
            - (runs.exp_dir("done") / "checkpoints" / "ckpt.5.pt").stat().st_mtime
        )
        < 2
    )
    assert done["train_loss"] == train[-1]["metrics"]["train/loss"]
    assert (done["metric"], done["best"], done["best_step"]) == (
        "valid/loss",
        best["metrics"]["valid/loss"],
        best["step"],
    )
    accuracy = max(valid, key=lambda r: r["metrics"]["valid/accuracy"])
    assert done["best_valid"]["valid/accuracy"]["value"] == accuracy["metrics"]["valid/accuracy"]  # highest
    assert done["wall_s"] == max(r["elapsed_s"] for r in records)
    for row in listing:  # machine-readable numbers
        assert isinstance(row["step"], int), row
        assert row["wall_s"] is None or isinstance(row["wall_s"], float), row
    assert isinstance(rows["live"]["train_loss"], float) and math.isfinite(rows["live"]["train_loss"])


def test_the_table_shows_states_steps_and_owners(runs: Runs) -> None:
    result = runs.ml_runs(runs.run_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["EXPERIMENT", "RUN", "STATE", "STEP", "CHECKPOINT"]
    assert "BEST VALID/LOSS" in lines[0]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == ["done", "failed", "killed", "live", "stopped"]
    assert rows["done"].split()[1:4] == ["run_0", "finished", "5"]
    assert " ago " in rows["done"]
    assert f"pid {runs.procs['live'].pid}@{HOST}" in rows["live"] and "running" in rows["live"]
    assert f"pid {runs.procs['killed'].pid}@{HOST} is gone" in rows["killed"]
    assert rows["stopped"].rstrip().endswith("SIGTERM")
    assert "TypeError: planned failure" in rows["failed"]
    assert all(line == line.rstrip() for line in lines)  # no trailing blanks


def test_filters_by_name_and_state(runs: Runs) -> None:
    assert [r["name"] for r in _json(runs, "--state", "crashed")] == ["killed"]
    assert [r["name"] for r in _json(runs, "--state", "finished,failed")] == ["done", "failed"]
    assert [r["name"] for r in _json(runs, "--state", "running", "--state", "interrupted")] == [
        "live",
        "stopped",
    ]
    assert [r["name"] for r in _json(runs, "--name", "st*")] == ["stopped"]
    assert [r["name"] for r in _json(runs, "--name", "*e*", "--state", "finished")] == ["done"]
    assert _json(runs, "--name", "nothing*") == []
    nothing = runs.ml_runs(runs.run_dir, "--name", "nothing*")
    assert nothing.returncode == 0 and nothing.stdout.startswith("no runs under")


def test_a_path_may_be_one_experiment_or_one_run(runs: Runs) -> None:
    for path in (runs.run_dir / "done", runs.run_dir / "done" / "run_0"):
        listing = json.loads(runs.ml_runs(path, "--json").stdout)
        assert [(r["name"], r["run"], r["state"]) for r in listing] == [("done", "run_0", "finished")]
    env = runs.env()  # the default: RUN_DIR
    assert [r["name"] for r in json.loads(runs.ml_runs("--json", env=env).stdout)] == [
        "done",
        "failed",
        "killed",
        "live",
        "stopped",
    ]


def test_another_metric_and_its_direction(runs: Runs) -> None:
    row = _by_name(_json(runs, "--metric", "valid/accuracy"))["done"]
    records = [r for r in _records(runs.exp_dir("done") / "logs" / "metrics.jsonl") if r["phase"] == "valid"]
    assert row["best"] == max(r["metrics"]["valid/accuracy"] for r in records)
    table = runs.ml_runs(runs.run_dir, "--metric", "valid/accuracy").stdout
    assert "BEST VALID/ACCURACY" in table.splitlines()[0]


def test_ml_runs_imports_no_torch(runs: Runs) -> None:
    code = (
        "import sys\n"
        "from ml.cli import main\n"
        f"assert main(['runs', {str(runs.run_dir)!r}, '--json']) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'omegaconf'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Bad input, empty folders


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ml: error: "), result.stderr
    return lines[0]


def _bare_env(run_dir: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RUN_DIR", "ML_EXP_NAME")}
    if run_dir is not None:
        env["RUN_DIR"] = str(run_dir)
    return env


def _ml_runs(
    *args: str | Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ML, "runs", *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_a_missing_run_dir_is_bad_input_naming_it(tmp_path: Path) -> None:
    line = _one_error_line(_ml_runs(tmp_path / "nowhere", env=_bare_env(None)))
    assert str(tmp_path / "nowhere") in line
    line = _one_error_line(_ml_runs(env=_bare_env(tmp_path / "gone")))
    assert f"RUN_DIR={tmp_path / 'gone'}" in line and "ml runs PATH" in line
    line = _one_error_line(_ml_runs(env=_bare_env(None), cwd=tmp_path))  # no ./runs, RUN_DIR unset
    assert "./runs" in line and "RUN_DIR" in line and "ml runs PATH" in line


def test_an_unknown_state_lists_the_valid_ones(tmp_path: Path) -> None:
    line = _one_error_line(_ml_runs(tmp_path, "--state", "finished,done", env=_bare_env(None)))
    assert "'done'" in line and all(state in line for state in STATES)


def test_a_file_or_a_bad_option_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    assert "a_file is a file" in _one_error_line(_ml_runs(tmp_path / "a_file", env=_bare_env(None)))
    _one_error_line(_ml_runs(tmp_path, "--frobnicate", env=_bare_env(None)))


def test_an_empty_run_dir_says_so_in_one_line(tmp_path: Path) -> None:
    result = _ml_runs(env=_bare_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"no experiments under {tmp_path}\n"
    result = _ml_runs(tmp_path, "--json", env=_bare_env(None))
    assert json.loads(result.stdout) == []


# ---------------------------------------------------------------------------------------------
# The reader's rules, on folders written by hand


def _write_metrics(exp_dir: Path, lines: list[str]) -> None:
    (exp_dir / "logs").mkdir(parents=True, exist_ok=True)
    (exp_dir / "logs" / "metrics.jsonl").write_text("".join(lines))


def _line(step: int, phase: str, elapsed: float, **metrics: float | str) -> str:
    return (
        json.dumps({"step": step, "phase": phase, "elapsed_s": elapsed, "time": 0.0, "metrics": metrics})
        + "\n"
    )


def _checkpoint(exp_dir: Path, step: int) -> None:
    folder = exp_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"ckpt.{step}.pt").write_bytes(b"x")
    (folder / "ckpt.pt").unlink(missing_ok=True)
    (folder / "ckpt.pt").symlink_to(f"ckpt.{step}.pt")


def test_a_truncated_last_line_and_repeated_steps(tmp_path: Path) -> None:
    """A resumed run of an older version logged steps 5..6 twice: the later records count."""
    path = tmp_path / "metrics.jsonl"
    lines = [
        _line(4, "train", 4.0, **{"train/loss": 1.0}),
        _line(4, "valid", 4.1, **{"valid/loss": 0.8, "valid/accuracy": 0.6}),
        _line(5, "train", 5.0, **{"train/loss": 0.9}),
        _line(6, "train", 6.0, **{"train/loss": 0.8}),
        _line(6, "valid", 6.1, **{"valid/loss": 0.5, "valid/accuracy": 0.9}),  # superseded below
        _line(5, "train", 4.5, **{"train/loss": 0.95}),  # the resumed process, from step 4's checkpoint
        _line(6, "train", 5.5, **{"train/loss": 0.85}),
        _line(6, "valid", 5.6, **{"valid/loss": 0.7, "valid/accuracy": "nan"}),
        _line(7, "train", 6.5, **{"train/loss": 0.75}),
        '{"step": 8, "phase": "train", "elap',  # cut short by a kill
    ]
    path.write_text("".join(lines))
    summary = summarize_metrics(path)
    assert summary.last_train_step == 7 and summary.train_loss == 0.75
    assert summary.best is not None and (summary.best.value, summary.best.step) == (0.7, 6)
    accuracy = summary.best_valid["valid/accuracy"]
    assert (accuracy.value, accuracy.step) == (0.6, 4)  # highest; 0.9 was superseded, nan ignored
    assert summary.wall_s == 6.5  # the largest elapsed_s (also of records superseded since)
    assert summarize_metrics(path, "train/loss").best.value == 0.75  # type: ignore[union-attr]


def test_a_marker_older_than_the_newest_checkpoint_is_ignored(tmp_path: Path) -> None:
    """The run finished at step 5, was continued, and its continuation was killed after step 9
    and its lock removed by hand: the run can be continued from step 9, not finished at 5."""
    exp_dir = tmp_path / "exp" / "run_0"
    _checkpoint(exp_dir, 9)
    (exp_dir / "status.json").write_text(json.dumps({"state": "finished", "step": 5}))
    info = describe_run(exp_dir)
    assert (info.state, info.step, info.signal) == ("interrupted", 9, None)
    (exp_dir / "status.json").write_text(json.dumps({"state": "failed", "step": 11, "error": "E: x"}))
    info = describe_run(exp_dir)
    assert (info.state, info.step, info.error) == ("failed", 11, "E: x")


def test_locks_decide_before_the_marker(tmp_path: Path) -> None:
    exp_dir = tmp_path / "exp" / "run_0"
    _checkpoint(exp_dir, 4)
    (exp_dir / "status.json").write_text(json.dumps({"state": "interrupted", "step": 4, "signal": "SIGUSR1"}))
    lock = exp_dir / ".lock_running"
    lock.write_text(f"pid: {os.getpid()}\nhost: elsewhere-{HOST}\ntime: 2026-01-01T00:00:00+00:00\n")
    info = describe_run(exp_dir)
    assert (info.state, info.pid, info.host) == ("running?", os.getpid(), f"elsewhere-{HOST}")
    lock.write_text(f"pid: {os.getpid()}\nhost: {HOST}\ntime: 2026-01-01T00:00:00+00:00\n")
    info = describe_run(exp_dir)
    assert info.state == "running" and info.wall_s is not None and info.wall_s > 0
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock.write_text(f"pid: {gone.pid}\nhost: {HOST}\n")
    assert describe_run(exp_dir).state == "crashed"
    lock.unlink()
    (exp_dir / ".lock_scheduled").write_text(f"pid: 1\nhost: {HOST}\n")
    assert describe_run(exp_dir).state == "scheduled"
    (exp_dir / ".lock_scheduled").unlink()
    info = describe_run(exp_dir)
    assert (info.state, info.signal) == ("interrupted", "SIGUSR1")


def test_runs_without_marker_or_lock(tmp_path: Path) -> None:
    empty = tmp_path / "exp" / "run_0"
    empty.mkdir(parents=True)
    assert describe_run(empty).state == "empty"
    logged = tmp_path / "exp" / "run_1"
    _write_metrics(logged, [_line(1, "train", 0.1, **{"train/loss": 2.0})])
    assert describe_run(logged).state == "unknown"
    _checkpoint(logged, 1)
    assert describe_run(logged).state == "interrupted"


def test_find_runs_tells_run_dirs_experiments_and_runs_apart(tmp_path: Path) -> None:
    for rel in ("a/run_0", "a/run_2", "a/run_10", "run_3/run_0", "b/run_1", "b/notes"):
        (tmp_path / rel).mkdir(parents=True)
    found = [(name, path.name) for name, path in find_runs(tmp_path)]
    assert found == [("a", "run_0"), ("a", "run_2"), ("a", "run_10"), ("b", "run_1"), ("run_3", "run_0")]
    assert [(n, p.name) for n, p in find_runs(tmp_path / "a")] == [
        ("a", "run_0"),
        ("a", "run_2"),
        ("a", "run_10"),
    ]
    assert [(n, p.name) for n, p in find_runs(tmp_path / "run_3")] == [("run_3", "run_0")]
    assert [(n, p.name) for n, p in find_runs(tmp_path / "a" / "run_2")] == [("a", "run_2")]
    with pytest.raises(FileNotFoundError):
        find_runs(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# The marker's rules, on in-process runs of the tiny trainer


def _train_tiny(exp_dir: Path, task_cls: type, max_steps: int = 6) -> None:
    from omegaconf import OmegaConf

    from ml.loggers.jsonl import JsonlLogger, JsonlLoggerConfig
    from ml.lr_schedulers.builtin import ConstantConfig, ConstantLRScheduler
    from ml.optimizers.builtin import AdamConfig, AdamOptimizer
    from ml.tasks.sl import SupervisedLearningTaskConfig
    from ml.trainers.sl import SupervisedLearningTrainer, SupervisedLearningTrainerConfig
    from tests.tiny import TinyModel, TinyModelConfig

    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {"name": "sl", "exp_dir": str(exp_dir), "checkpoint": {"save_every_n_steps": 2}},
    )
    trainer = SupervisedLearningTrainer(config)  # type: ignore[arg-type]
    trainer.add_logger(JsonlLogger(JsonlLoggerConfig(name="jsonl", write_every_n_steps=1)))
    trainer.train(
        TinyModel(TinyModelConfig(name="tiny")),
        task_cls(SupervisedLearningTaskConfig(name="tiny", max_steps=max_steps)),
        AdamOptimizer(AdamConfig(name="adam")),
        ConstantLRScheduler(ConstantConfig(name="constant")),
    )


def _failing_task(error: Exception, after_steps: int = 3) -> type:
    from tests.tiny import TinyTask

    class FailingTask(TinyTask):
        def compute_loss(self, model, batch, state, output):  # type: ignore[no-untyped-def]
            if state.training and state.num_steps == after_steps:
                raise error
            return super().compute_loss(model, batch, state, output)

    return FailingTask


def test_a_failure_is_marked_after_the_teardown(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="disk on fire"):
        _train_tiny(tmp_path, _failing_task(RuntimeError("disk on fire\nsecond line")))
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == "RuntimeError: disk on fire"
    assert status["step"] == 3 and status["pid"] == os.getpid()
    assert not (tmp_path / ".lock_running").exists()
    assert describe_run(tmp_path).state == "failed"


def test_a_marker_that_cannot_be_written_hides_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import ml.run.status

    def refuse(path: object, text: str) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(ml.run.status, "atomic_write_text", refuse)
    with pytest.raises(ValueError, match="the original error"):
        _train_tiny(tmp_path, _failing_task(ValueError("the original error")))
    assert not (tmp_path / "status.json").exists() and not (tmp_path / ".lock_running").exists()
    assert "Could not write" in caplog.text

    finished = tmp_path / "finished"
    from tests.tiny import TinyTask

    _train_tiny(finished, TinyTask)  # a run that succeeded is not failed for its marker
    assert not (finished / "status.json").exists()
    assert describe_run(finished).state == "interrupted"  # read from its checkpoint instead


def test_refused_input_leaves_the_marker_alone(tmp_path: Path) -> None:
    from ml.core.compose import ConfigError
    from tests.tiny import TinyTask

    _train_tiny(tmp_path, TinyTask, max_steps=4)
    before = (tmp_path / "status.json").read_text()
    assert json.loads(before)["state"] == "finished"
    with pytest.raises(ConfigError):
        _train_tiny(tmp_path, _failing_task(ConfigError("a bad setting"), after_steps=4), max_steps=8)
    assert (tmp_path / "status.json").read_text() == before


@pytest.mark.parametrize("buffered", [False, True], ids=["unbuffered", "buffered"])
def test_a_reader_that_stops_early_ends_the_listing_quietly(runs: Runs, buffered: bool) -> None:
    """``ml runs --json | head -1``: the closed pipe is the reader's choice, not a failure to trace;
    also where stdout is buffered (no PYTHONUNBUFFERED), its last flush at the interpreter's exit
    said "Exception ignored ... BrokenPipeError" and exited 120."""
    env = runs.env()
    if buffered:
        env.pop("PYTHONUNBUFFERED")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        result = subprocess.run(
            [*ML, "runs", runs.run_dir, "--json"], env=env, stdout=write, stderr=subprocess.PIPE,
            text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write)
    assert result.returncode == 128 + signal.SIGPIPE
    assert result.stderr == ""
