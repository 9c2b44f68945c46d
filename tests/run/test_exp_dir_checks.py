"""Where a run may go: ``trainer.exp_dir`` is refused, before anything is created, where it would
be lost or ignored.

- A run's own ``config.yaml`` continues that run: a command-line ``trainer.exp_dir`` for another
  folder is refused (one line, exit 2, nothing created), saying how to start a new run from it.
- ``trainer.exp_dir`` may not be an experiment's folder (one holding run folders) nor lie inside a
  run's folder, where ``ml runs`` and ``ml plot`` would miss runs; a ``run_<N>`` higher up that holds
  no run (a folder of the user's) is no reason to refuse.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ml.core.compose import compose_config
from ml.errors import ConfigError
from ml.launchers.checks import check_before_claim
from ml.run.claim import check_exp_dir

CONFIG = """\
model: {name: digits_mlp, hidden: 16}
task: {name: digits, max_steps: 20}
optimizer: {name: adam, lr: 0.001}
trainer: {name: sl, exp_name: tiny, exp_dir: EXP_DIR}
logger: [{name: stdout}]
"""


def _run(folder: Path) -> Path:
    """A run folder as training leaves one: its config (naming the folder) beside checkpoints/ (one
    checkpoint in it) and logs/."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "ckpt.5.pt").write_bytes(b"")
    (folder / "logs").mkdir()
    config = folder / "config.yaml"
    config.write_text(CONFIG.replace("EXP_DIR", str(folder)))
    return config


def test_a_run_config_refuses_an_exp_dir_for_another_folder_from_the_command_line(tmp_path: Path) -> None:
    config = _run(tmp_path / "runs" / "tiny" / "run_0")
    other = tmp_path / "runs" / "other" / "x"
    with pytest.raises(
        ConfigError, match=r"continues its own run.*cp .*config\.yaml new\.yaml && ml train new\.yaml"
    ):
        compose_config([str(config)], ["task.max_steps=22", f"trainer.exp_dir={other}"])
    same = compose_config([str(config)], [f"trainer.exp_dir={config.parent}"])  # its own folder: fine
    assert same.trainer.exp_dir == str(config.parent)

    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    env = {**os.environ, "RUN_DIR": str(tmp_path / "runs")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ml.cli",
            "train",
            str(config),
            "task.max_steps=22",
            f"trainer.exp_dir={other}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ml: error: trainer.exp_dir=") and result.stderr.count("\n") == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing created


def test_an_experiment_folder_or_a_folder_inside_a_run_is_refused_as_exp_dir(tmp_path: Path) -> None:
    experiment = tmp_path / "runs" / "tiny"
    config = _run(experiment / "run_0")
    _run(experiment / "run_1")
    with pytest.raises(
        ConfigError, match=r"holds run folders \(run_0, run_1\): it is an experiment's folder"
    ):
        check_exp_dir(str(experiment))
    for run, inside in [("run_0", "checkpoints"), ("run_1", "logs/new")]:
        with pytest.raises(
            ConfigError, match=f"lies inside the run folder {re.escape(str(experiment / run))} "
        ):
            check_exp_dir(str(experiment / run / inside))
    # A run folder itself (continuing it), a new folder, one under a run_<N> of the user's: fine.
    mine = tmp_path / "home" / "run_7" / "experiments" / "a"
    mine.mkdir(parents=True)
    for fine in (experiment / "run_0", tmp_path / "runs" / "new", mine):
        assert check_exp_dir(str(fine)) == fine.resolve()

    # What ml train (and ml stage, and every point of a sweep) checks before claiming a folder.
    composed = compose_config([str(config)])
    composed.trainer.exp_dir = str(experiment)
    with pytest.raises(ConfigError, match="it is an experiment's folder"):
        check_before_claim(composed, device=False)
    composed.trainer.exp_dir = str(experiment / "run_0" / "checkpoints")
    with pytest.raises(ConfigError, match="lies inside the run folder"):
        check_before_claim(composed, device=False)
    assert not (experiment / "run_0" / "checkpoints" / "config.yaml").exists()


def test_what_looks_like_a_run_around_runs_refuses_nothing_but_what_holds_runs_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omegaconf import OmegaConf

    from ml.run.claim import claim_run_dir
    from ml.trainers.sl import SupervisedLearningTrainerConfig

    # A project's root with its own config.yaml and logs/, runs below it: runs are made and continued.
    (tmp_path / "config.yaml").write_text("a: 1\n")
    (tmp_path / "logs").mkdir()
    runs = tmp_path / "runs"
    run_0, _ = _run(runs / "tiny" / "run_0").parent, _run(runs / "tiny" / "run_1")
    assert check_exp_dir(str(run_0)) == run_0.resolve()  # continuing it
    data = tmp_path / "new" / "run_1"  # a data folder of the user's named like a run
    data.mkdir(parents=True)
    assert check_exp_dir(str(tmp_path / "new")) == (tmp_path / "new").resolve()
    # A folder of experiments (RUN_DIR itself) holds runs too.
    with pytest.raises(ConfigError, match=r"holds run folders \(tiny/run_0, tiny/run_1\)"):
        check_exp_dir(str(runs))
    # Runs two levels down behind a run_<N> of the user's, or beside a data folder named like one.
    other = tmp_path / "other" / "run_3"
    _run(other / "tiny" / "run_0")
    (tmp_path / "mix" / "run_1").mkdir(parents=True)
    _run(tmp_path / "mix" / "tiny" / "run_0")
    for holding in (other, tmp_path / "mix"):
        with pytest.raises(ConfigError, match=r"holds run folders \(tiny/run_0\)"):
            check_exp_dir(str(holding))
    # A project's root (its config.yaml and logs/) is not a run (to continue, or to be inside of).
    from ml.run.layout import written_by_a_run

    assert not written_by_a_run(tmp_path) and written_by_a_run(run_0)
    # RUN_DIR inside a run, or at an experiment's folder with exp_name one of its runs: the run made
    # there could be neither listed nor continued.
    monkeypatch.setenv("RUN_DIR", str(run_0.parent))
    trainer = OmegaConf.structured(SupervisedLearningTrainerConfig)
    trainer.exp_name = "run_0"
    with pytest.raises(ConfigError, match="lies inside the run folder"):
        claim_run_dir(trainer)
    monkeypatch.setenv("RUN_DIR", str(run_0))
    trainer = OmegaConf.structured(SupervisedLearningTrainerConfig)
    trainer.exp_name = "tiny"
    with pytest.raises(ConfigError, match=f"RUN_DIR={re.escape(str(run_0))} lies inside the run folder"):
        claim_run_dir(trainer)
    assert not (run_0 / "tiny").exists()


def test_a_project_s_own_config_and_checkpoints_do_not_make_it_a_run(tmp_path: Path) -> None:
    # A project's root: its config.yaml beside checkpoints of its own, a status.json, logs/.
    (tmp_path / "config.yaml").write_text("lr: 0.1\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt_best.pth").write_bytes(b"")
    (tmp_path / "status.json").write_text("{}")
    (tmp_path / "logs").mkdir()
    inside = tmp_path / "out" / "r1"
    assert check_exp_dir(str(inside)) == inside.resolve()
    # A package shipping a config.yaml beside logs/ (two levels down, as a staged run's code/<pkg>).
    package = tmp_path / "new" / "code" / "pkg"
    (package / "logs").mkdir(parents=True)
    (package / "config.yaml").write_text("trainer: {name: sl}\n")
    assert check_exp_dir(str(tmp_path / "new")) == (tmp_path / "new").resolve()
