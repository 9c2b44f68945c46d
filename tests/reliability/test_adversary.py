"""What an adversary broke, round two: each test reproduces one attack on a fresh run folder.

1. A full disk must not leave a lock that blocks the run for good, nor an empty run folder.
2. ``trainer.log_dir_name`` cannot point outside the run folder.
3. Raising ``task.max_steps`` trains further, with a schedule of the new length (not at lr 0).
4. A FIFO where a checkpoint or ``status.json`` should be hangs nothing; a stop signal ends a
   start-up that never finishes.
5. A burst of SIGTERMs stops the run cleanly (exit 0), like one.
6. A lock naming a pid no process can have breaks neither ``ml runs`` nor a continuation.
7. A batch size of 0 or -1, or a model too large for memory, is bad input (one line, exit 2,
   nothing created); so few open files that data loader workers could not pass batches trains.
8. A disk that fills while metrics are written stops the run naming the file, and ``status.json``
   still says the run failed.

Every test runs the real ``ml`` command in a subprocess (forked from one that imported torch, see
``tests/forked_ml.py``, where its start-up is not what is tested); the full disks are small tmpfs mounts
(root only, as in ``test_disk.py``).
"""

import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from ml.cli import main as ml_main
from tests.forked_ml import run_ml
from tests.reliability.test_disk import tmpfs

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.entry"]
TIMEOUT_S = 120
E2E = Path(__file__).resolve().parent.parent / "e2e"  # resume_task.py: a task that can hang or signal

# A small, quick run: a 64-32-10 MLP on the digits, a checkpoint every 5 steps.
CONFIG = """\
model: {name: digits_mlp, hidden: 32, dropout: 0.0}
task: {name: digits, max_steps: 10, train_dl: {batch_size: 32}}
optimizer: {name: adam, lr: 1e-3}
lr_scheduler: {name: cosine, warmup_steps: 2}
trainer:
  name: sl
  exp_name: adv
  test_at_end: false
  checkpoint: {save_every_n_steps: 5, only_save_most_recent: false}
logger: [{name: jsonl, write_every_n_steps: 1}]
"""


def _env(run_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("ML_EXP_NAME", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(RUN_DIR=str(run_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(E2E), env.get("PYTHONPATH")]))
    return env


def _ml(
    *args: str, run_dir: Path, limit_files: int | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """``ml ARGS`` to completion, forked from a process that imported torch (tests/forked_ml.py);
    with ``limit_files``, the script in a new interpreter that may open that many files."""
    if limit_files is None:
        return run_ml(args, _env(run_dir, **env), timeout_s=TIMEOUT_S)

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit_files, limit_files))

    return subprocess.run(
        [*ML, *args],
        env=_env(run_dir, **env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
        preexec_fn=preexec,
    )


def _config(tmp_path: Path, text: str = CONFIG) -> str:
    path = tmp_path / "adv.yaml"
    path.write_text(text)
    return str(path)


def _one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last
    return last


def _runs_json(path: Path) -> list[dict]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert ml_main(["runs", str(path), "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: room for a short run's checkpoints and logs."""
    with tmpfs(tmp_path, "3m") as mount:
        yield mount


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: metrics written at every step fill it in a few seconds."""
    with tmpfs(tmp_path, "256k") as mount:
        yield mount


def _fill(disk: Path) -> Path:
    """Fills the disk to its last byte; returns the filler file."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                continue
    return filler


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The RUN_DIR of one finished 5-step run, which the refused runs below must leave as it is."""
    root = tmp_path_factory.mktemp("finished")
    first = _ml("train", _config(root), "task.max_steps=5", run_dir=root / "runs")
    assert first.returncode == 0, first.stderr[-3000:]
    return root / "runs"


# -- 1. a full disk ------------------------------------------------------------------------------


def test_a_full_disk_leaves_no_lock_that_blocks_the_run(small_disk: Path, tmp_path: Path) -> None:
    config = _config(tmp_path)
    first = _ml("train", config, "task.max_steps=5", run_dir=small_disk)
    assert first.returncode == 0, first.stderr[-3000:]
    exp_dir = small_disk / "adv" / "run_0"
    filler = _fill(small_disk)

    blocked = _ml("train", str(exp_dir / "config.yaml"), "task.max_steps=10", run_dir=small_disk)
    last = _one_line(blocked, 1, "No space left on device")
    assert str(exp_dir) in last, last  # the file the disk refused is named
    assert not (exp_dir / ".lock_running").exists()
    assert not [p for p in exp_dir.iterdir() if p.name.endswith(".tmp")]

    fresh = _ml("train", config, run_dir=small_disk)
    _one_line(fresh, 1, "No space left on device")
    assert sorted(p.name for p in (small_disk / "adv").iterdir()) == ["run_0"]  # no empty run_1

    filler.unlink()
    again = _ml("train", str(exp_dir / "config.yaml"), "task.max_steps=10", run_dir=small_disk)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 5" in again.stderr
    assert os.readlink(exp_dir / "checkpoints" / "ckpt.pt") == "ckpt.10.pt"


def test_an_empty_lock_is_named_with_its_fix(finished_run: Path, tmp_path: Path) -> None:
    """An empty lock (no ml writes one now) proves nothing: the error names the file and the fix."""
    run_dir = tmp_path / "runs"
    shutil.copytree(finished_run, run_dir, symlinks=True)  # a copy: the run is shared
    exp_dir = run_dir / "adv" / "run_0"
    (exp_dir / ".lock_running").write_text("")
    result = _ml("train", str(exp_dir / "config.yaml"), "task.max_steps=10", run_dir=run_dir)
    _one_line(result, 2, str(exp_dir / ".lock_running"), "names no owner", "remove it")


# -- 2. log_dir_name -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../run_0/logs", "../../../escaped", "<tmp>/absolute-logs", ".."])
def test_log_dir_name_cannot_leave_the_run_folder(finished_run: Path, name: str) -> None:
    root = finished_run.parent  # <tmp>; run_N/../../../ is here too
    name = name.replace("<tmp>", str(root))
    metrics = finished_run / "adv" / "run_0" / "logs" / "metrics.jsonl"
    before = metrics.read_bytes()
    result = _ml("train", _config(root), f"trainer.log_dir_name={name}", run_dir=finished_run)
    _one_line(result, 2, "trainer.log_dir_name must be a plain folder name")
    assert metrics.read_bytes() == before
    assert sorted(p.name for p in (finished_run / "adv").iterdir()) == ["run_0"]
    assert not (root / "escaped").exists() and not (root / "absolute-logs").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.log_dir_name=code", "trainer.log_dir_name=code is taken by the run folder's own code"),
        ("trainer.log_dir_name=.lock_ckpt", "is taken by the run folder's own .lock_ckpt"),
        ("trainer.exp_name=" + "a" * 300, "trainer.exp_name must be at most 255 bytes long"),
    ],
    ids=["the code copy's name", "a lock's name", "too long"],
)
def test_a_folder_name_the_run_folder_or_the_disk_cannot_take_is_refused(
    tmp_path: Path, override: str, message: str
) -> None:
    """``code`` as the log folder silently emptied ``ml stage``'s copy of the code; a name over 255
    bytes failed (exit 1) after the experiment's folder was made."""
    run_dir = tmp_path / "runs"
    _one_line(_ml("train", _config(tmp_path), override, run_dir=run_dir), 2, message)
    assert not run_dir.exists()


# -- 3. raising the limit ------------------------------------------------------------------------


def _lrs(exp_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["metrics"]["trainer/lr"] for r in records if "trainer/lr" in r["metrics"]}


def test_raising_max_steps_trains_further_on_a_schedule_of_that_length(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs"
    first = _ml("train", _config(tmp_path), "task.max_steps=10", run_dir=run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    exp_dir = run_dir / "adv" / "run_0"
    assert _lrs(exp_dir)[10] == 0.0  # the cosine schedule ended with the first limit

    more = _ml("train", str(exp_dir / "config.yaml"), "task.max_steps=20", run_dir=run_dir)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "lr_scheduler.total_steps: 10 -> 20" in more.stderr  # the resume says what it follows
    lrs = _lrs(exp_dir)
    assert all(lrs[step] > 0 for step in range(11, 20)), lrs
    ten = torch.load(exp_dir / "checkpoints" / "ckpt.10.pt", weights_only=True)["model"]
    twenty = torch.load(exp_dir / "checkpoints" / "ckpt.20.pt", weights_only=True)["model"]
    assert any(not torch.equal(ten[k], twenty[k]) for k in ten)  # the weights moved


def test_a_secret_stays_out_of_the_saved_config_and_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs"
    token = "s3cret-" + uuid.uuid4().hex
    secret = "trainer.log_dir_name=${ml.secret:ADV_LOGS}"
    result = _ml("train", _config(tmp_path), "task.max_steps=5", secret, run_dir=run_dir, ADV_LOGS=token)
    assert result.returncode == 0, result.stderr[-3000:]
    exp_dir = run_dir / "adv" / "run_0"
    assert (exp_dir / token / "metrics.jsonl").is_file()  # the value was used...
    assert "log_dir_name: ${ml.secret:ADV_LOGS}" in (exp_dir / "config.yaml").read_text()  # ...not saved
    for path in [exp_dir / "config.yaml", *(exp_dir / "checkpoints").glob("ckpt.*.pt")]:
        assert token.encode() not in path.read_bytes(), path
    missing = _ml("train", str(exp_dir / "config.yaml"), "task.max_steps=6", run_dir=run_dir)
    _one_line(missing, 2, "set the environment variable ADV_LOGS")


# -- 4. FIFOs and a start-up that never ends -------------------------------------------------------


def test_fifos_in_a_run_folder_hang_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs"
    first = _ml("train", _config(tmp_path), "task.max_steps=5", run_dir=run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    exp_dir = run_dir / "adv" / "run_0"
    (exp_dir / "status.json").unlink()
    os.mkfifo(exp_dir / "status.json")
    started = time.monotonic()
    (row,) = _runs_json(run_dir)
    assert row["state"] == "interrupted" and row["checkpoint_step"] == 5
    os.mkfifo(exp_dir / "checkpoints" / "fifo")
    (exp_dir / "checkpoints" / "ckpt.pt").unlink()
    (exp_dir / "checkpoints" / "ckpt.pt").symlink_to("fifo")
    (exp_dir / "checkpoints" / "ckpt.5.pt").rename(exp_dir / "checkpoints" / "old.pt")
    train = _ml("train", str(exp_dir / "config.yaml"), "task.max_steps=10", run_dir=run_dir)
    _one_line(train, 2, "not a regular file")
    export = _ml("export", str(exp_dir), "-o", str(tmp_path / "m.safetensors"), run_dir=run_dir)
    _one_line(export, 2, "not a regular file")
    assert time.monotonic() - started < 60


def test_a_stop_signal_ends_a_start_up_that_never_finishes(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        CONFIG.replace(
            "model: {name: digits_mlp, hidden: 32, dropout: 0.0}",
            'model: {name: "resume_task:DropoutBNModel"}',
        ).replace(
            "task: {name: digits, max_steps: 10, train_dl: {batch_size: 32}}",
            'task: {name: "resume_task:IndexedTask", max_steps: 10, dataset_sleep_s: 600}',
        ),
    )
    proc = subprocess.Popen(
        [*ML, "train", config],
        env=_env(tmp_path / "runs", ML_STARTUP_STOP_GRACE_S="2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4)  # into get_dataset's sleep
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 30
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM during start-up" in err.strip().splitlines()[-1]


# -- 5. a burst of signals -----------------------------------------------------------------------


def test_a_burst_of_sigterms_stops_the_run_cleanly(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs"
    for attempt in range(3):
        proc = subprocess.Popen(
            [*ML, "train", _config(tmp_path), "task.max_steps=100000"],
            env=_env(run_dir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        exp_dir = run_dir / "adv" / f"run_{attempt}"
        deadline = time.monotonic() + TIMEOUT_S
        while not (exp_dir / "checkpoints" / "ckpt.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        for _ in range(10):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.01)
        _, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, (attempt, proc.returncode, err[-3000:])
        status = json.loads((exp_dir / "status.json").read_text())
        assert status["state"] == "interrupted" and status["signal"] == "SIGTERM"
        assert os.readlink(exp_dir / "checkpoints" / "ckpt.pt") == f"ckpt.{status['step']}.pt"


# -- 6. a pid no process can have ----------------------------------------------------------------


def test_a_huge_pid_in_a_lock_breaks_neither_ml_runs_nor_a_continuation(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs"
    first = _ml("train", _config(tmp_path), "task.max_steps=5", run_dir=run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    exp_dir = run_dir / "adv" / "run_0"
    (exp_dir / ".lock_running").write_text(f"pid: 99999999999999999999\nhost: {socket.gethostname()}\n")
    (row,) = _runs_json(run_dir)
    assert row["state"] == "crashed"
    result = _ml("train", str(exp_dir / "config.yaml"), "task.max_steps=10", run_dir=run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Taking over the running lock" in result.stderr


# -- 7. sizes and limits -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("task.train_dl.batch_size=0", "task.train_dl.batch_size must be positive, got 0"),
        ("task.valid_dl.batch_size=-1", "task.valid_dl.batch_size must be positive, got -1"),
        ("model.hidden=100000000000", "out of memory while building it"),
    ],
)
def test_impossible_sizes_are_bad_input(tmp_path: Path, override: str, needle: str) -> None:
    run_dir = tmp_path / "runs"
    result = _ml("train", _config(tmp_path), override, run_dir=run_dir)
    _one_line(result, 2, needle)
    assert not run_dir.exists()


def test_few_open_files_do_not_hang_data_loader_workers(tmp_path: Path) -> None:
    result = _ml(
        "train",
        _config(tmp_path),
        "task.max_steps=6",
        "task.train_dl.num_workers=2",
        run_dir=tmp_path / "runs",
        limit_files=20,
    )
    assert result.returncode == 0, result.stderr[-3000:]


# -- 8. a disk that fills while metrics are written -----------------------------------------------


def test_a_disk_filling_with_metrics_names_the_file_and_marks_the_run_failed(
    tiny_disk: Path, tmp_path: Path
) -> None:
    no_saves = CONFIG.replace(
        "checkpoint: {save_every_n_steps: 5, only_save_most_recent: false}",
        "checkpoint: {save_every_n_steps: null}",
    )
    result = _ml("train", _config(tmp_path, no_saves), "task.max_steps=1000000", run_dir=tiny_disk)
    exp_dir = tiny_disk / "adv" / "run_0"
    _one_line(result, 1, "No space left on device", str(exp_dir / "logs" / "metrics.jsonl"))
    status = json.loads((exp_dir / "status.json").read_text())
    assert status["state"] == "failed" and "No space left on device" in status["error"], status
    (row,) = _runs_json(tiny_disk / "adv")
    assert row["state"] == "failed"
