"""One rule for a run's newest complete checkpoint, asked by resume, ``ml runs`` and ``ml export`` alike.

The layout a kill between renaming ``ckpt.<step>.pt`` into place and swapping the link leaves:
``ckpt.pt -> ckpt.2.pt`` with a complete ``ckpt.4.pt`` beside it. Every asker takes step 4: the
run resumes from it, ``ml runs`` reports it, ``ml export`` exports it. Also, a run trained into
a folder given as ``trainer.exp_dir`` (outside ``$RUN_DIR``) is found by ``ml runs`` and ``ml plot``.
"""

import io
import json
import os
import subprocess
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ml.cli import main as ml_main
from ml.run.checkpoints import newest_checkpoint
from ml.run.layout import RunDir, find_runs, is_run
from tests.forked_ml import run_ml
from tests.tools.test_export import TIMEOUT_S, env

DIGITS = ["digits", "task.max_steps=4", "lr_scheduler.warmup_steps=1", "trainer.valid_every_n_steps=2"]
KEEP_ALL = ["trainer.checkpoint.save_every_n_steps=2", "trainer.checkpoint.only_save_most_recent=false"]


def _ml_train(args: list[str], run_dir: Path) -> subprocess.CompletedProcess[str]:
    """``ml train ARGS`` to completion, forked from a process that imported torch (tests/forked_ml.py)."""
    return run_ml(["train", *args], env(run_dir), timeout_s=TIMEOUT_S)


def _stdout_of(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = ml_main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def unlinked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits run with checkpoints at steps 2 and 4, its link put back at step 2."""
    run_dir = tmp_path_factory.mktemp("unlinked")
    result = _ml_train([*DIGITS, *KEEP_ALL], run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    exp_dir = run_dir / "digits" / "run_0"
    link = exp_dir / "checkpoints" / "ckpt.pt"
    link.unlink()
    link.symlink_to("ckpt.2.pt")
    (exp_dir / "status.json").unlink()  # as after a kill: no marker of the session that saved step 4
    return exp_dir


def test_the_rule_takes_the_complete_checkpoint_newer_than_the_link(unlinked: Path) -> None:
    newest = newest_checkpoint(RunDir(unlinked))
    assert newest is not None and newest.step == 4 and newest.path.name == "ckpt.4.pt"
    assert newest.file == unlinked / "checkpoints" / "ckpt.4.pt"


def test_ml_runs_reports_the_newest_checkpoint(unlinked: Path) -> None:
    code, out = _stdout_of(["runs", str(unlinked), "--json"])
    assert code == 0
    (row,) = json.loads(out)
    assert row["checkpoint_step"] == 4 and row["checkpoint"].endswith("checkpoints/ckpt.4.pt")
    assert row["state"] == "interrupted"


def test_ml_export_exports_the_newest_checkpoint(unlinked: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    code, printed = _stdout_of(["export", str(unlinked), "-o", str(out)])
    assert code == 0 and f"exported step 4 from {unlinked / 'checkpoints' / 'ckpt.4.pt'}" in printed
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["ml.step"] == "4"
        weights = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    saved = torch.load(unlinked / "checkpoints" / "ckpt.4.pt", weights_only=True)["model"]
    assert all(torch.equal(weights[k], saved[k]) for k in weights)


def test_resume_continues_from_the_newest_checkpoint(unlinked: Path) -> None:
    """Last: the resumed run relinks and trains on (the other tests read the layout before it)."""
    result = _ml_train([str(unlinked / "config.yaml"), "task.max_steps=6"], unlinked.parent.parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from {unlinked / 'checkpoints' / 'ckpt.4.pt'} at step 4" in result.stderr
    assert os.readlink(unlinked / "checkpoints" / "ckpt.pt") == "ckpt.6.pt"


def test_a_run_given_its_own_folder_is_found_by_ml_runs_and_ml_plot(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "my_run"
    result = _ml_train([*DIGITS, f"trainer.exp_dir={elsewhere}"], tmp_path / "runs")
    assert result.returncode == 0, result.stderr[-3000:]
    # The final step is saved twice (then with its final metrics), and said once.
    assert result.stderr.count(f"Saved checkpoint {elsewhere / 'checkpoints' / 'ckpt.4.pt'}") == 1
    assert is_run(elsewhere) and find_runs(elsewhere) == [("my_run", elsewhere.resolve())]
    for folder in (elsewhere, elsewhere.parent):
        code, out = _stdout_of(["runs", str(folder), "--json"])
        assert code == 0
        (row,) = json.loads(out)
        assert (row["name"], row["state"], row["step"]) == ("my_run", "finished", 4)
    code, out = _stdout_of(["plot", str(elsewhere), "-o", str(tmp_path / "curves.png")])
    assert code == 0 and (tmp_path / "curves.png").stat().st_size > 0
