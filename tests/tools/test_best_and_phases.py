"""Tests of which best value ``ml runs`` reports and which records a metric's curve holds.

The module fixture trains one real run (``ml train digits``, 8 steps, validating every 2) of a task
that logs ``valid/score``, a name the name rule calls lower-is-better, which the run monitors with
``trainer.checkpoint.mode=max``, and ``task/acc`` in its own namespace, so in the records of every
phase (train, valid, test). Variants of the run's ``config.yaml`` are copies of the real one with
the monitor's settings changed.
"""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from ml.tools import plot
from ml.tools.experiments import describe_run

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 180

TASK_MODULE = "ml_tools_scored_task"
TASK_SOURCE = '''\
"""Digits, with a validation score whose best (highest) is at step 4, and task/acc in every phase."""

from ml.examples.digits import DigitsTask


class ScoredDigitsTask(DigitsTask):
    def compute_loss(self, model, batch, state, output):
        images, labels = batch
        accuracy = (output.argmax(dim=-1) == labels).float().mean()
        self.logger.log_scalar("acc", accuracy, namespace="task")  # no phase prefix
        if state.phase == "valid":
            self.logger.log_scalar("score", -float((state.num_steps - 4) ** 2), namespace="valid")
        return super().compute_loss(model, batch, state, output)
'''
TRAIN = [
    "digits",
    f"task.name={TASK_MODULE}:ScoredDigitsTask",
    "task.max_steps=8",
    "lr_scheduler.warmup_steps=1",
    "model.channels=4",
    "model.hidden=16",
    "trainer.exp_name=scored",
    "trainer.valid_every_n_steps=2",
    "trainer.checkpoint.monitor=valid/score",
    "trainer.checkpoint.mode=max",
    "logger=[{name: jsonl, write_every_n_steps: 1}]",
]
SCORES = {2: -4.0, 4: 0.0, 6: -4.0, 8: -16.0}  # valid/score by step: highest at 4, lowest at 8


def _env(tmp: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ML_EXP_NAME")
    }
    env.update(RUN_DIR=str(tmp / "runs"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp / "lib"), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("best")
    (tmp / "lib").mkdir()
    (tmp / "lib" / f"{TASK_MODULE}.py").write_text(TASK_SOURCE)
    result = subprocess.run(
        [*ML, "train", *TRAIN], env=_env(tmp), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "runs" / "scored" / "run_0"


def _records(run: Path, phase: str) -> list[dict]:
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == phase]


def _ml_runs(run: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ML, "runs", str(run), *args], capture_output=True, text=True, timeout=60, check=False
    )


def _variant(run: Path, tmp_path: Path, checkpoint: dict, early_stopping: dict) -> Path:
    """A copy of the run's config and logs whose config sets the monitors as given."""
    copy = tmp_path / "scored" / "run_0"
    shutil.copytree(run / "logs", copy / "logs")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["checkpoint"].update(checkpoint)
    config["trainer"]["early_stopping"].update(early_stopping)
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


def test_the_run_logged_what_the_tests_need(run: Path) -> None:
    assert {r["step"]: r["metrics"]["valid/score"] for r in _records(run, "valid")} == SCORES
    for phase in ("train", "valid", "test"):
        assert all("task/acc" in r["metrics"] for r in _records(run, phase)), phase
    # The trainer kept the highest score's checkpoint as the best, as the config asked.
    assert (run / "checkpoints" / "best.pt").resolve().name == "ckpt.4.pt"


def test_the_best_follows_the_mode_the_run_set(run: Path) -> None:
    """checkpoint.mode=max: the best is the highest valid/score (the name rule would say the lowest),
    the checkpoint the trainer kept as best.pt."""
    result = _ml_runs(run, "--json", "--metric", "valid/score")
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert (row["metric"], row["mode"], row["best"], row["best_step"]) == ("valid/score", "max", 0.0, 4)
    assert row["best_valid"]["valid/score"] == {"value": 0.0, "step": 4}
    table = _ml_runs(run, "--metric", "valid/score").stdout.splitlines()
    assert "BEST VALID/SCORE" in table[0] and " 0 @4 " in table[1]


def test_early_stopping_mode_counts_too_and_else_the_name_rule(run: Path, tmp_path: Path) -> None:
    stopped = _variant(
        run, tmp_path / "a", {"monitor": None, "mode": None}, {"monitor": "valid/score", "mode": "max"}
    )
    info = describe_run(stopped, metric="valid/score")
    assert (info.mode, info.best, info.best_step) == ("max", 0.0, 4)

    unset = _variant(run, tmp_path / "b", {"mode": None}, {})
    info = describe_run(unset, metric="valid/score")
    assert (info.mode, info.best, info.best_step) == ("min", -16.0, 8)  # "score": lower is better by name

    # Both name it with different modes: the checkpoint's, which chose best.pt.
    both = _variant(run, tmp_path / "c", {"mode": "min"}, {"monitor": "valid/score", "mode": "max"})
    assert describe_run(both, metric="valid/score").best == -16.0


def test_a_key_of_several_phases_is_a_series_per_phase_in_ml_runs(run: Path) -> None:
    for phase in ("train", "valid", "test"):
        expected = max(r["metrics"]["task/acc"] for r in _records(run, phase))  # acc: higher is better
        info = describe_run(run, metric=f"{phase}:task/acc")
        assert (info.metric, info.best, info.metric_phases) == (f"{phase}:task/acc", expected, [phase])
    # task/acc alone could mean any of the three: one line naming the choices, exit code 2.
    result = _ml_runs(run, "--metric", "task/acc")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ml: error: "), result.stderr
    assert "train:task/acc or valid:task/acc or test:task/acc" in result.stderr
    # Keys with a phase prefix are in their phase's records alone: as before.
    assert describe_run(run).best == min(r["metrics"]["valid/loss"] for r in _records(run, "valid"))


def _svg_texts(path: Path) -> list[str]:
    return [el.text or "" for el in ET.parse(path).getroot().iter("{http://www.w3.org/2000/svg}text")]


def test_ml_plot_draws_a_curve_per_phase(run: Path, tmp_path: Path) -> None:
    read = plot.read_run(run, "scored/run_0")
    for phase in ("train", "valid"):
        steps, values = read.curve("task/acc", "step", phase)
        records = _records(run, phase)
        assert steps == [float(r["step"]) for r in records]
        assert values == [r["metrics"]["task/acc"] for r in records]
    with pytest.raises(ValueError, match="train and valid and test"):
        read.curve("task/acc", "step")

    out = tmp_path / "p.svg"
    assert plot.main([str(run), "--metric", "task/acc", "--metric", "valid: task/acc", "-o", str(out)]) == 0
    texts = _svg_texts(out)
    assert {"task/acc", "valid:task/acc"} <= set(texts)  # the two subplots' titles
    # The first subplot overlays the phases, the second shows the validation's alone.
    for phase in ("train", "valid", "test"):
        assert texts.count(f"scored/run_0 ({phase})") == 1
    assert texts.count("scored/run_0") == 1


def test_ml_plot_lists_the_phases_of_an_unknown_choice(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    result = subprocess.run(
        [*ML, "plot", str(run), "--metric", "train:valid/score", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and not out.exists()
    assert "no run logged train:valid/score; available: " in result.stderr
    available = result.stderr.split("available: ")[1].strip().split(", ")
    assert {"task/acc", "train:task/acc", "valid:task/acc", "test:task/acc", "valid/score"} <= set(available)
    assert "valid:valid/score" not in available  # one phase logs it: its name is enough
