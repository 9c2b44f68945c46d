"""``ml stage``: a run folder that a later job trains with the code of the moment it was staged.

The user's package in the working directory is staged, then changed; the run is then trained the way
a Slurm job script runs it (``python -m ml.entry train <run>/config.yaml`` in the submitting
directory) and imports the staged version. What is staged: the top-level modules and the packages
(with their data files), not ``runs/``, hidden folders, ``__pycache__`` or folders that are not
packages.
"""

import subprocess
import sys
from pathlib import Path

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


def test_bad_input_stages_nothing(tmp_path: Path) -> None:
    (tmp_path / "exp.yaml").write_text(CONFIG.replace('"stagedmod:StagedMLP"', "digits_mlp"))
    result = _run([*ML, "stage", "exp.yaml", "optimizer.lr=fast"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("ml: error: optimizer.lr")
    assert not (tmp_path / "runs").exists()
