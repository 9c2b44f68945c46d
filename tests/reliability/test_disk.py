"""Disk trouble during a run: a full disk, a file-size limit, a run folder that turns read-only.

Each time the run must stop with exit code 1 and one clear line naming the write that failed (no
traceback), and the checkpoint written before must stay intact: ``ckpt.pt`` names it, it loads, and
no temporary file is left. A full disk uses a small tmpfs where mounting is allowed (root); the
file-size limit (``RLIMIT_FSIZE``) works everywhere.
"""

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.forked_ml import run_ml

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 120

# A ~1 MB checkpoint (weights and Adam state of a 64-256-256-10 MLP) every 5 steps.
CONFIG = """\
model: {name: digits_mlp, hidden: 256, dropout: 0.0}
task: {name: digits, max_steps: 40, train_dl: {batch_size: 32}}
optimizer: {name: adam, lr: 1e-3}
lr_scheduler: {name: constant}
trainer:
  name: sl
  exp_name: disk
  test_at_end: false
  valid_at_end: false
  checkpoint: {save_every_n_steps: 5}
logger: [{name: jsonl, write_every_n_steps: 1}]
"""


def _env(run_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ML_EXP_NAME", "RANK", "WORLD_SIZE")}
    env.update(RUN_DIR=str(run_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _ml(*args: str, run_dir: Path, file_limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """``ml ARGS`` to completion, forked from a process that imported torch (tests/forked_ml.py); with
    ``file_limit``, the script in a new interpreter that may write files of at most that size."""
    if file_limit is None:
        return run_ml(args, _env(run_dir), timeout_s=TIMEOUT_S)

    def limit() -> None:
        # Past the limit a write fails with EFBIG instead of the process being killed by SIGXFSZ.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run(
        [*ML, *args],
        env=_env(run_dir),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
        preexec_fn=limit,
    )


def _assert_one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ml: training failed: "), last
    for needle in needles:
        assert needle in last, last
    return last


def _assert_intact(exp_dir: Path, step: int) -> None:
    checkpoints = exp_dir / "checkpoints"
    link = checkpoints / "ckpt.pt"
    assert os.readlink(link) == f"ckpt.{step}.pt"
    ckpt = torch.load(link, weights_only=True)
    assert json.loads(ckpt["state"])["num_steps"] == step
    assert not list(checkpoints.glob(".*.tmp")), list(checkpoints.iterdir())
    assert not (exp_dir / ".lock_running").exists()


def test_a_file_size_limit_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "disk.yaml").write_text(CONFIG)
    run_dir = tmp_path / "runs"
    first = _ml("train", str(tmp_path / "disk.yaml"), "task.max_steps=5", run_dir=run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    exp_dir = run_dir / "disk" / "run_0"
    size = (exp_dir / "checkpoints" / "ckpt.5.pt").stat().st_size
    assert size > 500_000

    result = _ml(
        "train", str(exp_dir / "config.yaml"), "task.max_steps=40", run_dir=run_dir, file_limit=size // 2
    )
    _assert_one_line_failure(
        result, "cannot write checkpoint", "ckpt.10.pt", "File too large", "ckpt.5.pt is kept"
    )
    _assert_intact(exp_dir, 5)

    # Once the limit is gone the run goes on from the kept checkpoint.
    again = _ml("train", str(exp_dir / "config.yaml"), "task.max_steps=40", run_dir=run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 5" in again.stderr
    _assert_intact(exp_dir, 40)


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mounts a tmpfs of ``size`` at ``path``; returns why it cannot instead (not root, no permission)."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    path.mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return f"cannot mount a tmpfs here: {result.stderr.strip()}"
    return None


@contextlib.contextmanager
def tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted in ``tmp_path`` for the block (the test skips where it cannot be)."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    reason = _mount_tmpfs(mount, size)
    if reason is not None:
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1.6 MiB tmpfs: room for one checkpoint and the logs, not for the next checkpoint beside it."""
    with tmpfs(tmp_path, "1600k") as mount:
        yield mount


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(small_disk: Path, tmp_path: Path) -> None:
    (tmp_path / "disk.yaml").write_text(CONFIG)
    result = _ml("train", str(tmp_path / "disk.yaml"), run_dir=small_disk)
    last = _assert_one_line_failure(result, "No space left on device")
    exp_dir = small_disk / "disk" / "run_0"
    saved = sorted(
        int(p.name.split(".")[1]) for p in (exp_dir / "checkpoints").glob("ckpt.*.pt") if p.name != "ckpt.pt"
    )
    assert saved, last
    _assert_intact(exp_dir, saved[-1])  # the newest complete checkpoint, still named by ckpt.pt


def test_a_run_folder_that_turns_read_only_stops_the_run_cleanly(tmp_path: Path) -> None:
    """The run folder is bind-mounted read-only over itself while the run trains (root only)."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    (tmp_path / "disk.yaml").write_text(CONFIG)
    run_dir = tmp_path / "runs"
    proc = subprocess.Popen(
        [*ML, "train", str(tmp_path / "disk.yaml"), "task.max_steps=100000"],
        env=_env(run_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    exp_dir = run_dir / "disk" / "run_0"
    deadline = time.monotonic() + TIMEOUT_S
    while not (exp_dir / "checkpoints" / "ckpt.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    bind = subprocess.run(["mount", "--bind", str(exp_dir), str(exp_dir)], capture_output=True, text=True)
    if bind.returncode != 0:
        proc.kill()
        proc.communicate()
        pytest.skip(f"cannot bind-mount here: {bind.stderr.strip()}")
    try:
        # The remount fails (EBUSY) while a file opened through the new mount is open for writing, that
        # is while a save is under way: try again until it lands between two saves.
        for _ in range(200):
            remount = subprocess.run(
                ["mount", "-o", "remount,bind,ro", str(exp_dir)], capture_output=True, text=True
            )
            if remount.returncode == 0:
                break
            time.sleep(0.01)
        assert remount.returncode == 0, remount.stderr
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        subprocess.run(["umount", "-l", str(exp_dir)], check=False)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    _assert_one_line_failure(result, "Read-only file system")
    link = exp_dir / "checkpoints" / "ckpt.pt"
    step = json.loads(torch.load(link, weights_only=True)["state"])["num_steps"]
    assert os.readlink(link) == f"ckpt.{step}.pt" and step % 5 == 0
    # A save open when the folder turned read-only leaves its temp file: nothing can remove a file
    # there. Once the folder is writable again, the next run that takes the lock removes it.
    left = list((exp_dir / "checkpoints").glob(".*.tmp"))
    assert len(left) <= 1, left
    # A save whose file was renamed into place before its link swap failed is complete: the next run
    # resumes from it rather than from the linked one.
    numbered = [p.name.split(".")[1] for p in (exp_dir / "checkpoints").glob("ckpt.*.pt")]
    newest = max(int(n) for n in numbered if n.isdigit())
    assert newest in (step, step + 5), numbered
    again = _ml("train", str(exp_dir / "config.yaml"), f"task.max_steps={newest + 5}", run_dir=run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {newest}" in again.stderr
    _assert_intact(exp_dir, newest + 5)
