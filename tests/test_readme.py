"""The README's examples run as written: the user module, its YAML, and training from Python."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

README = Path(__file__).resolve().parent.parent / "README.md"


def _user_env(folder: Path) -> dict[str, str]:
    """A user's bare environment with their module's folder on PYTHONPATH (and the caller's
    PYTHONPATH after it, where the packages of an environment without a venv may live)."""
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": path}


def _blocks(language: str) -> dict[str, str]:
    """The README's code blocks in ``language``, keyed by the file name in their first line."""
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return {block.splitlines()[0].lstrip("# ").split()[-1]: block for block in blocks}


def test_the_python_api_example_trains(tmp_path: Path) -> None:
    python, configs = _blocks("python"), _blocks("yaml")
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "tasks.py").write_text(python["mypkg/tasks.py"])
    (tmp_path / "my.yaml").write_text(configs["my.yaml"])
    assert yaml.safe_load(configs["my.yaml"])["task"]["max_steps"] == 200
    (tmp_path / "train_my.py").write_text(python["train_my.py"])
    result = subprocess.run(
        [sys.executable, "train_my.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) < 0.5  # a sum of two inputs is easy to fit
    assert (tmp_path / "runs" / "my" / "from_python" / "checkpoints" / "ckpt.200.pt").is_file()

    cli = Path(sys.executable).parent / "ml"
    result = subprocess.run(
        [str(cli), "train", "my.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_user_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "my" / "run_0" / "checkpoints" / "ckpt.200.pt").is_file()


def test_every_file_the_readme_links_to_is_in_the_repository() -> None:
    """A clone has what the README points at: no link leaves the repository (``../shared/...``)."""
    text = README.read_text()
    links = re.findall(r"\]\(([^)#]+)\)", text)
    paths = re.findall(r"`((?:\.\./|docs/|ml/|bench/|tests/)[\w./-]+\.(?:md|py|yaml))`", text)
    assert links, "the README links to its design document"
    for target in [*links, *paths]:
        if "://" in target:
            continue
        assert not target.startswith("../"), f"{target} is outside the repository"
        assert (README.parent / target).is_file(), f"the README names {target}, which a clone does not have"


def test_the_streaming_example_trains_and_its_checkpoint_holds_the_position(tmp_path: Path) -> None:
    python, configs = _blocks("python"), _blocks("yaml")
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "tasks.py").write_text(python["mypkg/tasks.py"])
    (tmp_path / "mypkg" / "stream.py").write_text(python["mypkg/stream.py"])
    (tmp_path / "my.yaml").write_text(configs["my.yaml"])
    cli = Path(sys.executable).parent / "ml"
    result = subprocess.run(
        [str(cli), "train", "my.yaml", "task.name=mypkg.stream:StreamTask", "task.max_steps=150",
         "task.train_dl.num_workers=2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=_user_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "runs" / "my" / "run_0" / "checkpoints" / "ckpt.150.pt", weights_only=True)
    state = yaml.safe_load(ckpt["state"]) if isinstance(ckpt["state"], str) else ckpt["state"]
    assert (state["num_epochs"], state["num_epoch_samples"]) == (1, 150 * 32 - 4096)  # 128 steps an epoch
    assert "stream" in ckpt
