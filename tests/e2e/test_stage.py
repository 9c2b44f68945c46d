"""``ml stage``: a run folder that a later job trains with the code of the moment it was staged.

The user's package in the working directory is staged, then changed; the run is then trained the way
a Slurm job script runs it (``python -m ml.entry train <run>/config.yaml`` in the submitting
directory) and imports the staged version. What is staged: the top-level modules and the packages
(with their data files), not ``runs/``, hidden folders, ``__pycache__`` or folders that are not
packages.
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ml.run.layout import RunDir
from ml.run.locks import write_lock
from tests.e2e.test_distributed import ML, TIMEOUT_S, _env, _train_losses

PACKAGE = """\
import sys
from pathlib import Path

from ml.examples.digits import DigitsMLP, DigitsMLPConfig

VERSION = 1
DATA = (Path(__file__).parent / "data.txt").read_text()
print(f"stagedmod version {VERSION}, data {DATA}", file=sys.stderr)


class StagedMLP(DigitsMLP):
    def __init__(self, config: DigitsMLPConfig) -> None:
        super().__init__(config)
"""

CONFIG = """\
model: {name: "stagedmod:StagedMLP", hidden: 16}
task: {name: digits, seed: 3, max_steps: 3, train_dl: {batch_size: 32}}
optimizer: {name: adam, lr: 1e-2}
trainer: {name: sl, exp_name: staged, valid_at_end: false}
logger: [{name: jsonl, write_every_n_steps: 1}]
"""
MLP_CONFIG = CONFIG.replace('"stagedmod:StagedMLP"', "digits_mlp")  # no user code needed


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**_env(cwd / "runs"), "PYTHONPATH": str(cwd)}  # the working tree importable, as `ml` makes it
    return subprocess.run(
        cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def test_a_staged_run_trains_with_the_code_it_was_staged_with(tmp_path: Path) -> None:
    package = tmp_path / "stagedmod"
    package.mkdir()
    (package / "__init__.py").write_text(PACKAGE)
    (package / "data.txt").write_text("v1")
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "junk.pyc").write_bytes(b"\0")
    (tmp_path / "helper.py").write_text("X = 1\n")
    for left_out in ("runs/old", ".git", "notes"):  # not code: results, history, a plain folder
        (tmp_path / left_out).mkdir(parents=True)
        (tmp_path / left_out / "x.py").write_text("")
    (tmp_path / "exp.yaml").write_text(CONFIG)

    staged = _run([*ML, "stage", "exp.yaml"], tmp_path)
    assert staged.returncode == 0, staged.stderr[-3000:]
    run = Path(staged.stdout.strip())
    assert run == tmp_path / "runs" / "staged" / "run_0"
    assert "stagedmod version 1" in staged.stderr  # checked with the working tree's code
    code = sorted(str(p.relative_to(run / "code")) for p in (run / "code").rglob("*") if p.is_file())
    assert code == ["helper.py", "stagedmod/__init__.py", "stagedmod/data.txt"]
    assert (run / "config.yaml").is_file() and not (run / "checkpoints").exists()

    # The working tree moves on before the job starts.
    (package / "__init__.py").write_text(PACKAGE.replace("VERSION = 1", "VERSION = 2"))
    (package / "data.txt").write_text("v2")

    job = _run([sys.executable, "-m", "ml.entry", "train", str(run / "config.yaml")], tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "stagedmod version 1, data v1" in job.stderr
    assert "version 2" not in job.stderr
    assert f"Training with the code staged in {run / 'code'}" in job.stderr
    assert sorted(_train_losses(run)) == [1, 2, 3]


# trainer.log_dir_name=code: the log folder would take the place of the staged code, left empty;
# trainer.checkpoint.format=bogus: a trainer setting, refused by the job that trains the folder later.
@pytest.mark.parametrize(
    "override", ["optimizer.lr=fast", "trainer.log_dir_name=code", "trainer.checkpoint.format=bogus"]
)
def test_bad_input_stages_nothing(tmp_path: Path, override: str) -> None:
    (tmp_path / "exp.yaml").write_text(MLP_CONFIG)
    result = _run([*ML, "stage", "exp.yaml", override], tmp_path)
    assert result.returncode == 2
    key = override.split("=")[0]
    assert result.stderr.strip().splitlines()[-1].startswith(f"ml: error: {key}")
    assert not (tmp_path / "runs").exists()


def _listing(root: Path) -> list[tuple[str, int, int]]:
    """Every entry under ``root`` (hidden ones too) with its size and modification time."""
    entries = [(p, p.lstat()) for p in root.rglob("*")]
    return sorted((str(p.relative_to(root)), st.st_size, st.st_mtime_ns) for p, st in entries)


@pytest.mark.parametrize("holds", ["a finished run", "checkpoints", "a live process's lock"])
def test_staging_into_a_folder_that_holds_a_run_changes_nothing(tmp_path: Path, holds: str) -> None:
    (tmp_path / "exp.yaml").write_text(MLP_CONFIG)
    folder = tmp_path.resolve() / "existing"
    if holds == "a finished run":
        trained = _run([*ML, "train", "exp.yaml", f"trainer.exp_dir={folder}"], tmp_path)
        assert trained.returncode == 0, trained.stderr[-3000:]
    elif holds == "checkpoints":  # its config.yaml deleted
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "ckpt.3.pt").write_bytes(b"a checkpoint")
    else:  # a submitted Slurm job's, waiting to start; its owner (this process) is alive
        write_lock(RunDir(folder), "scheduled")
    before = _listing(tmp_path)

    # Staging would replace the run's config.yaml with one the run then refuses to continue with.
    result = _run([*ML, "stage", "exp.yaml", f"trainer.exp_dir={folder}", "optimizer.lr=0.5"], tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"ml: error: trainer.exp_dir={folder} already holds a run")
    assert "stage into a new folder" in line and f"`ml train {folder / 'config.yaml'}`" in line
    assert _listing(tmp_path) == before


def test_what_is_not_a_regular_file_is_not_staged(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("X = 1\n")
    os.mkfifo(package / "pipe")  # copying it would wait for a writer
    (package / "data.lnk").symlink_to("gone.txt")  # a link to nothing
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(package / "agent.sock"))
    (tmp_path / "exp.yaml").write_text(MLP_CONFIG)
    before = _listing(tmp_path)
    try:
        result = _run([*ML, "stage", "exp.yaml"], tmp_path)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr[-3000:]
    [warning] = [line for line in result.stderr.splitlines() if "Not staging" in line]
    assert "pkg/agent.sock, pkg/data.lnk, pkg/pipe: not regular files" in warning
    run = Path(result.stdout.strip())
    code = sorted(str(p.relative_to(run / "code")) for p in (run / "code").rglob("*") if not p.is_dir())
    assert code == ["pkg/__init__.py"]
    assert (run / "config.yaml").is_file()
    assert [e for e in _listing(tmp_path) if not e[0].startswith("runs")] == before


def test_a_reader_of_the_staged_folders_that_leaves_early_misses_no_message(tmp_path: Path) -> None:
    """``ml stage exp.yaml -m ... | head -1``: both runs staged, each named on stderr, exit 141 as a
    shell tool SIGPIPE ended. It was a traceback and "training failed" (exit 1) without the second
    run's line (stdout unbuffered), or "Exception ignored ... BrokenPipeError" and 120 (buffered)."""
    (tmp_path / "exp.yaml").write_text(MLP_CONFIG)
    env = {**_env(tmp_path / "runs"), "PYTHONPATH": str(tmp_path)}
    for buffered in (False, True):
        if buffered:
            env.pop("PYTHONUNBUFFERED", None)
        else:
            env["PYTHONUNBUFFERED"] = "1"
        read, write = os.pipe()
        os.close(read)  # the reader is gone before anything is written
        try:
            result = subprocess.run(
                [*ML, "stage", "exp.yaml", "-m", "optimizer.lr=1e-2,2e-2"], env=env, cwd=tmp_path,
                stdout=write, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT_S,
            )  # fmt: skip
        finally:
            os.close(write)
        assert result.returncode == 128 + signal.SIGPIPE, result.stderr[-3000:]
        assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
        runs = tmp_path / "runs" / "staged"
        first, second = (2, 3) if buffered else (0, 1)
        for number in (first, second):
            assert f"ml: staged {runs / f'run_{number}'}: " in result.stderr
            assert (runs / f"run_{number}" / "config.yaml").is_file()
