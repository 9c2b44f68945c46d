"""Asynchronous checkpoint saving (``trainer.checkpoint.async_save``), with real files and real runs.

In-process: an async checkpoint holds exactly what a synchronous one does; what training changes
right after the save returns does not reach the file; ``ckpt.pt`` only ever names a complete file;
a write that fails (a real ``RLIMIT_FSIZE``) is raised at the next step with the synchronous
message, the previous checkpoint kept. End to end (``ml train`` subprocesses): SIGTERM while an
async write is in flight leaves a complete checkpoint and exits 0; a write refused by the file-size
limit stops the run with exit 1 and one line; and the run continued from there ends bit for bit
like an uninterrupted synchronous run.
"""

import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from ml.core.state import State
from ml.trainers.base import CheckpointWriteError
from ml.utils.checkpoint import HostSnapshot
from tests.e2e.resume_task import read_indices
from tests.same import assert_same
from tests.tiny import make_parts, train_steps

BALLAST = 4_000_000  # floats (16 MB): a write takes long enough for training to go on meanwhile


def _parts(exp_dir: Path, **checkpoint: object) -> tuple:
    torch.manual_seed(0)
    trainer, model, task, optim, sched = make_parts(exp_dir, **checkpoint)
    model.register_buffer("ballast", torch.randn(BALLAST))
    train_steps(model, task, optim, sched, State.init_state(), 2)  # Adam's moments exist
    return trainer, model, task, optim, sched


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clone(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# In-process


def test_the_host_copy_keeps_shared_memory_shared_and_owns_it(tmp_path: Path) -> None:
    weight = torch.randn(6, 4)
    state = {"encoder": weight, "decoder": weight.t(), "row": weight[2], "step": torch.tensor(3)}
    snapshot = HostSnapshot()
    copy = snapshot.take(state)
    assert copy["decoder"].untyped_storage().data_ptr() == copy["encoder"].untyped_storage().data_ptr()
    assert copy["row"].storage_offset() == 8 and torch.equal(copy["row"], weight[2])
    assert copy["encoder"].untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
    (tmp_path / "copy").mkdir(), (tmp_path / "state").mkdir()
    torch.save(copy, tmp_path / "copy" / "x.pt")
    torch.save(state, tmp_path / "state" / "x.pt")  # the same file: one storage for the three views
    assert (tmp_path / "copy" / "x.pt").read_bytes() == (tmp_path / "state" / "x.pt").read_bytes()
    weight.zero_()
    assert not torch.equal(copy["encoder"], weight)

    snapshot.release()  # written: the next copy reuses its memory
    again = snapshot.take(state)
    assert again["encoder"].untyped_storage().data_ptr() == copy["encoder"].untyped_storage().data_ptr()


def test_an_async_checkpoint_holds_exactly_what_a_sync_one_holds(tmp_path: Path) -> None:
    sync, model, task, optim, sched = _parts(tmp_path / "sync")
    background = make_parts(tmp_path / "async", async_save=True)[0]
    state = State(num_steps=2, num_samples=32)
    sync_path = sync.save_checkpoint(state, task, model, optim, sched)
    async_path = background.save_checkpoint(state, task, model, optim, sched)
    assert background.wait_for_checkpoint() == async_path
    assert background.wait_for_checkpoint() is None  # nothing left in flight

    assert os.readlink(async_path.parent / "ckpt.pt") == async_path.name == sync_path.name
    assert (tmp_path / "async" / ".lock_ckpt").exists()
    expected, got = _load(sync_path), _load(async_path)
    config = got.pop("config").replace("/async", "/sync").replace("async_save: true", "async_save: false")
    assert config == expected.pop("config")  # but for the experiment directory and async_save
    assert_same(got, expected)
    assert list(got["model"]) == list(model.state_dict())  # the same order too


def test_changes_right_after_an_async_save_do_not_reach_the_file(tmp_path: Path) -> None:
    trainer, model, task, optim, sched = _parts(tmp_path, async_save=True)
    before = _clone({"model": model.state_dict(), "optim": optim.state_dict()["state"]})
    path = trainer.save_checkpoint(State(num_steps=2), task, model, optim, sched)
    # What the next steps do, in place, while the file is being written.
    with torch.no_grad():
        model.ballast.add_(1.0)
        for param in model.parameters():
            param.mul_(-3.0)
    train_steps(model, task, optim, sched, State(num_steps=2), 1)  # Adam updates its moments in place
    trainer.wait_for_checkpoint()

    saved = _load(path)
    assert_same(saved["model"], before["model"], "model")
    assert_same({k: dict(v) for k, v in saved["optim"]["state"].items()}, before["optim"], "optim")
    assert not torch.equal(saved["model"]["ballast"], model.ballast)  # the model did change


def test_ckpt_pt_only_ever_names_a_complete_checkpoint(tmp_path: Path) -> None:
    trainer, model, task, optim, sched = _parts(tmp_path, async_save=True)
    link = tmp_path / "checkpoints" / "ckpt.pt"
    seen: dict[str, int] = {}
    problems: list[str] = []
    done = threading.Event()

    def watch() -> None:  # reads whatever ckpt.pt names, as often as it can, during the saves
        while not done.is_set():
            try:
                name = os.readlink(link)
            except FileNotFoundError:  # no checkpoint yet
                continue
            try:
                ckpt = _load(link.parent / name)
            except FileNotFoundError:  # fine if the link moved on and retention removed the file
                if os.readlink(link) == name:
                    problems.append(f"ckpt.pt names {name}, which does not exist")
                continue
            except Exception as e:
                problems.append(f"{type(e).__name__}: {e}")
                continue
            step = json.loads(ckpt["state"])["num_steps"]
            if name != f"ckpt.{step}.pt" or float(ckpt["model"]["ballast"][0]) != step:
                problems.append(f"{name} holds step {step}")
            seen[name] = step

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for step in range(1, 7):
            model.ballast.fill_(float(step))
            trainer.save_checkpoint(State(num_steps=step), task, model, optim, sched)
            model.ballast.fill_(-1.0)  # a step that would poison a checkpoint written from the model
            time.sleep(0.02)
        trainer.wait_for_checkpoint()
        time.sleep(0.1)
    finally:
        done.set()
        watcher.join()
    assert not problems, problems
    assert len(seen) >= 2, seen  # it did see the link move
    assert sorted(p.name for p in link.parent.iterdir()) == ["ckpt.6.pt", "ckpt.pt"]


@contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """A real RLIMIT_FSIZE on this process: a larger write fails with EFBIG (SIGXFSZ is ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def _without_free_space(message: str) -> str:
    return re.sub(r" \([\d.]+ MiB free there\)", "", message)


def test_a_failed_async_write_is_raised_at_the_next_step_like_a_sync_one(tmp_path: Path) -> None:
    trainer, model, task, optim, sched = _parts(tmp_path / "async", async_save=True)
    sync = make_parts(tmp_path / "sync")[0]
    trainer.save_checkpoint(State(num_steps=1), task, model, optim, sched)
    sync.save_checkpoint(State(num_steps=1), task, model, optim, sched)
    trainer.wait_for_checkpoint()
    with _file_size_limit(2**20):
        with pytest.raises(CheckpointWriteError) as sync_error:
            sync.save_checkpoint(State(num_steps=2), task, model, optim, sched)
        trainer.save_checkpoint(State(num_steps=2), task, model, optim, sched)  # returns at once
        while trainer._pending_save is not None and trainer._pending_save.thread.is_alive():
            time.sleep(0.01)
    with pytest.raises(CheckpointWriteError) as async_error:
        trainer.on_step_end(State(num_steps=3), {}, task, model, optim, sched)
    message = str(async_error.value)
    assert "ckpt.2.pt: File too large" in message and message.endswith("; ckpt.1.pt is kept")
    same = _without_free_space(str(sync_error.value)).replace(str(tmp_path / "sync"), str(tmp_path / "async"))
    assert _without_free_space(message) == same

    checkpoints = tmp_path / "async" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["ckpt.1.pt", "ckpt.pt"]  # no partial file
    assert os.readlink(checkpoints / "ckpt.pt") == "ckpt.1.pt"
    assert json.loads(_load(checkpoints / "ckpt.pt")["state"])["num_steps"] == 1
    assert trainer.wait_for_checkpoint() is None  # raised once; the next save can go ahead
    trainer.save_checkpoint(State(num_steps=3), task, model, optim, sched)
    trainer.wait_for_checkpoint()
    assert os.readlink(checkpoints / "ckpt.pt") == "ckpt.3.pt"


# ---------------------------------------------------------------------------------------------
# End to end: ``ml train``

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 120
MAX_STEPS = 16

# The resume tests' task: 2 batches of 4 per step, ~60 ms a step, a 16 MiB buffer in every
# checkpoint (so a write spans a step or two), a checkpoint every 3 steps.
CONFIG = f"""\
model: {{name: "resume_task:DropoutBNModel", hidden: 16, dropout: 0.2}}
task:
  name: "resume_task:IndexedTask"
  num_samples: 48
  max_steps: {MAX_STEPS}
  step_sleep_s: 0.03
  ballast_mb: 16
  train_dl: {{batch_size: 4, num_workers: 0, shuffle: true, drop_last: true}}
  valid_dl: {{batch_size: 24}}
  test_dl: {{batch_size: 24}}
optimizer: {{name: adamw, lr: 1e-2}}
lr_scheduler: {{name: cosine, warmup_steps: 3}}
trainer:
  name: sl
  exp_name: async
  batches_per_step: 2
  deterministic: true
  valid_every_n_steps: 5
  checkpoint: {{save_every_n_steps: 3}}
logger:
  - {{name: jsonl, write_every_n_steps: 1}}
"""


class _Run:
    """An ``ml train`` run in ``run_dir``: started from ``config`` first, then from its own config.yaml."""

    def __init__(self, run_dir: Path, config: Path) -> None:
        self.run_dir, self.config, self.segments = run_dir, config, 0
        self.proc: subprocess.Popen | None = None
        run_dir.mkdir(parents=True)

    @property
    def exp_dir(self) -> Path:
        return self.run_dir / "async" / "run_0"

    @property
    def checkpoints(self) -> Path:
        return self.exp_dir / "checkpoints"

    def start(self, *overrides: str, file_limit: int | None = None) -> None:
        self.segments += 1
        env = {k: v for k, v in os.environ.items() if k not in ("ML_EXP_NAME", "RANK", "WORLD_SIZE")}
        tests_e2e = str(Path(__file__).parents[1] / "e2e")
        env.update(RUN_DIR=str(self.run_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_e2e, env.get("PYTHONPATH")]))
        first = self.segments == 1
        args = [str(self.config), f"task.indices_file={self.exp_dir / 'indices.txt'}"] if first else []
        args = args or [str(self.exp_dir / "config.yaml")]

        def limit() -> None:
            if file_limit is not None:  # past it a write fails with EFBIG instead of SIGXFSZ killing
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

        with (self.run_dir / f"stderr.{self.segments}.txt").open("w") as err:
            self.proc = subprocess.Popen(
                [*ML, "train", *args, *overrides],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=limit,
            )

    def finish(self, expected_code: int) -> str:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=TIMEOUT_S)
        finally:
            self.kill()
        stderr = (self.run_dir / f"stderr.{self.segments}.txt").read_text()
        assert code == expected_code, f"exit {code}\n{stderr[-3000:]}"
        return stderr

    def wait_for(self, what: str, condition: Any) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"the run exited ({self.proc.returncode}) before {what}")
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.002)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def assert_stopped_cleanly_at(self, step: int) -> None:
        """``ckpt.pt`` names ``ckpt.<step>.pt``, which loads and holds that step; nothing else is left."""
        link = self.checkpoints / "ckpt.pt"
        assert os.readlink(link) == f"ckpt.{step}.pt"
        assert json.loads(_load(link)["state"])["num_steps"] == step
        assert sorted(p.name for p in self.checkpoints.iterdir()) == sorted([f"ckpt.{step}.pt", "ckpt.pt"])
        assert not (self.exp_dir / ".lock_running").exists()


def _writing(checkpoints: Path) -> bool:
    return checkpoints.exists() and any(name.endswith(".tmp") for name in os.listdir(checkpoints))


@pytest.mark.slow
def test_async_runs_stop_on_sigterm_fail_on_a_refused_write_and_resume_like_a_sync_run(
    tmp_path: Path,
) -> None:
    config = tmp_path / "async.yaml"
    config.write_text(CONFIG)
    reference = _Run(tmp_path / "sync", config)
    run = _Run(tmp_path / "async", config)
    try:
        reference.start()  # uninterrupted and synchronous, alongside
        # 1. SIGTERM while a background write is in flight (its temp file exists): the loop stops
        # at the step boundary, the write is waited for, the stop step is saved, exit 0.
        run.start("trainer.checkpoint.async_save=true")
        run.wait_for("the first checkpoint", (run.checkpoints / "ckpt.pt").exists)
        run.wait_for("a write in flight", lambda: _writing(run.checkpoints))
        assert run.proc is not None
        run.proc.send_signal(signal.SIGTERM)
        stderr = run.finish(0)
        assert "Stopping on SIGTERM" in stderr and "Traceback" not in stderr
        stop = read_indices(run.exp_dir / "indices.txt")[-1][0]
        assert 6 <= stop <= 9, stop  # the write of step 6 (or a later one) was in flight
        run.assert_stopped_cleanly_at(stop)
        size = (run.checkpoints / f"ckpt.{stop}.pt").stat().st_size
        assert size > 16 * 2**20

        # 2. Continued under a file-size limit: the next background write fails, and the run stops
        # at the next step with exit 1 and one line; the checkpoint of step ``stop`` is kept.
        run.start(file_limit=size // 2)
        stderr = run.finish(1)
        assert "Traceback" not in stderr, stderr[-3000:]
        last = stderr.strip().splitlines()[-1]
        failed = (stop // 3 + 1) * 3
        assert last.startswith(f"ml: training failed: cannot write checkpoint {run.checkpoints}"), last
        assert f"ckpt.{failed}.pt: File too large" in last and last.endswith(f"ckpt.{stop}.pt is kept"), last
        run.assert_stopped_cleanly_at(stop)

        # 3. Continued without the limit: the end is bit for bit the synchronous run's.
        run.start()
        stderr = run.finish(0)
        assert f"at step {stop}" in stderr and "Traceback" not in stderr
        run.assert_stopped_cleanly_at(MAX_STEPS)
        reference.finish(0)
    finally:
        run.kill()
        reference.kill()
    assert read_indices(run.exp_dir / "indices.txt")[-1][0] == MAX_STEPS
    final, expected = _load(run.checkpoints / "ckpt.pt"), _load(reference.checkpoints / "ckpt.pt")
    for part in ("model", "optim", "lr", "task", "rng", "sampler", "final_metrics"):
        assert_same(final[part], expected[part], part)
    state, expected_state = json.loads(final["state"]), json.loads(expected["state"])
    counters = ("num_steps", "num_epochs", "num_samples", "num_epoch_steps", "num_epoch_samples")
    assert {k: state[k] for k in counters} == {k: expected_state[k] for k in counters}
