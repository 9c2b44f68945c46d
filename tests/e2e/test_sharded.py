"""End-to-end tests of sharded checkpoints (``trainer.checkpoint.format=sharded``, the default
under FSDP): real processes (the mp launcher's; torchrun's for the kill -9), real gloo process
groups, real files.

- 2 FSDP processes save sharded checkpoints (asynchronously: DCP's ``async_save``) into
  ``checkpoints/ckpt.<step>/``, every rank its own shard file.
- The run resumes from its step-8 checkpoint with 2 processes (tensor by tensor the uninterrupted
  run), with 3 (FSDP resharded 3 ways) and with 1 (no FSDP): the loss of the first step after the
  resume, which the loaded weights alone decide, and the whole curve to step 12 are the
  uninterrupted run's (the same global batch in every case: the per-process batch times the
  processes), and so are the final weights. The three resumed runs are started side by side, once
  for the module, each in a copy of the run of its own. (Each ``ml`` command is forked from a
  process that imported torch, tests/forked_ml.py; the ranks it starts are new interpreters.)
- ``ml export`` streams a sharded checkpoint into one safetensors file.
- kill -9 of rank 1 while a sharded checkpoint is being written: the link still names the
  previous complete checkpoint, and the run resumes from it.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ml.run.layout import RunDir
from ml.utils.checkpoint import read_checkpoint
from ml.utils.sharded import model_tensor_specs, stream_model_tensors
from tests.e2e.test_distributed import ML, TIMEOUT_S, _env, _ml, _records, _worker_pid
from tests.forked_ml import Command, run_forked
from tests.same import assert_same

GLOBAL_BATCH = 24  # 2 x 12, 3 x 8, 1 x 24

CONFIG = """\
model: {name: digits_mlp, hidden: 48, dropout: 0.0}
task: {name: digits, seed: 5, max_steps: 12, train_dl: {batch_size: 12}}
optimizer: {name: adam, lr: 1e-2}
lr_scheduler: {name: constant}
trainer:
  name: sl
  exp_name: sharded
  parallel: fsdp
  sync_every_n_steps: 1
  valid_at_end: false
  checkpoint: {save_every_n_steps: 4, only_save_most_recent: false, async_save: true}
logger: [{name: jsonl, write_every_n_steps: 1}]
"""


def _launch(config: Path, run_dir: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess[str]:
    if nproc == 1:
        result = _ml("train", str(config), *overrides, run_dir=run_dir)
    else:
        launch = ["launch", str(config), "launcher.name=mp", f"launcher.nproc_per_node={nproc}"]
        result = _ml(*launch, *overrides, run_dir=run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _losses(exp_dir: Path) -> dict[int, float]:
    return {r["step"]: r["metrics"]["train/loss"] for r in _records(exp_dir) if r["phase"] == "train"}


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's whole model, read in this process (what ``ml export`` streams)."""
    part = read_checkpoint(ckpt)["model"]
    return dict(stream_model_tensors(part, model_tensor_specs(part)))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 steps in 2 FSDP processes, a sharded checkpoint every 4 steps (all kept)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    (tmp / "sharded.yaml").write_text(CONFIG)
    _launch(tmp / "sharded.yaml", tmp / "runs", 2)
    return tmp / "runs" / "sharded" / "run_0"


def test_every_rank_writes_its_shards_into_the_checkpoint_folder(uninterrupted: Path) -> None:
    checkpoints = uninterrupted / "checkpoints"
    assert os.readlink(checkpoints / "ckpt.pt") == "ckpt.12"
    for step in (4, 8, 12):
        folder = checkpoints / f"ckpt.{step}"
        names = {p.name for p in folder.iterdir()}
        shards = {n for n in names if n.endswith(".distcp")}  # __<rank>_<writing thread>.distcp
        assert names - shards == {".metadata", "ml-manifest.json", "ml.pt"}
        assert {n.split("_")[2] for n in shards} == {"0", "1"}  # both ranks wrote
    assert not list(checkpoints.glob("*.tmp"))
    ckpt = read_checkpoint(checkpoints / "ckpt.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2  # every rank's generators
    assert ckpt["sampler"]["position"] == 12 * GLOBAL_BATCH
    weights = _weights(checkpoints / "ckpt.pt")
    assert weights["net.0.weight"].shape == (48, 64)  # whole tensors, put together from both ranks


@pytest.fixture(scope="module")
def resumed(uninterrupted: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, str]]:
    """The run as it stood at step 8 (its checkpoint linked, the later one gone), copied once per
    number of processes (2, 3, 1) and resumed to step 12 in each, the three side by side (each
    ``ml`` command forked from a process that imported torch, tests/forked_ml.py); for each, the
    resumed run folder and its stderr."""
    folders, commands = {}, []
    for nproc in (2, 3, 1):
        tmp = tmp_path_factory.mktemp(f"resumed{nproc}")
        exp_dir = tmp / "runs" / "sharded" / "run_0"
        shutil.copytree(uninterrupted, exp_dir, symlinks=True)
        shutil.rmtree(exp_dir / "checkpoints" / "ckpt.12")
        (exp_dir / "checkpoints" / "ckpt.pt").unlink()
        (exp_dir / "checkpoints" / "ckpt.pt").symlink_to("ckpt.8")
        batch = f"task.train_dl.batch_size={GLOBAL_BATCH // nproc}"
        args = [str(exp_dir / "config.yaml"), batch, "--allow-config-change"]
        if nproc > 1:
            args = ["launch", *args, "launcher.name=mp", f"launcher.nproc_per_node={nproc}"]
        else:
            args = ["train", *args]
        folders[nproc] = exp_dir
        commands.append(Command(args, _env(tmp / "runs"), timeout_s=TIMEOUT_S))
    results = {}
    for (nproc, exp_dir), result in zip(folders.items(), run_forked(commands, parallel=3), strict=True):
        assert result.returncode == 0, result.stderr[-3000:]
        results[nproc] = (exp_dir, result.stderr)
    return results


@pytest.mark.parametrize("nproc", [2, 3, 1])
def test_resume_with_another_number_of_processes(
    uninterrupted: Path, resumed: dict[int, tuple[Path, str]], nproc: int
) -> None:
    exp_dir, stderr = resumed[nproc]
    assert "at step 8" in stderr

    reference, resumed = _losses(uninterrupted), _losses(exp_dir)
    ours = _weights(exp_dir / "checkpoints" / "ckpt.12")
    theirs = _weights(uninterrupted / "checkpoints" / "ckpt.12")
    if nproc == 2:  # the same processes: the uninterrupted run, bit for bit
        assert all(resumed[s] == reference[s] for s in range(9, 13))
        assert_same(ours, theirs, "model")
        assert_same(
            read_checkpoint(exp_dir / "checkpoints" / "ckpt.12")["rng_ranks"],
            read_checkpoint(uninterrupted / "checkpoints" / "ckpt.12")["rng_ranks"],
        )
    else:  # another sum order of the same global batch
        if nproc == 1:  # DCP without a process group is this process's intent: not said at each save
            assert "torch.distributed is disabled" not in stderr
        for step in range(9, 13):
            assert resumed[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-6), step
        for name, tensor in theirs.items():
            torch.testing.assert_close(ours[name], tensor, rtol=1e-3, atol=1e-5)


def test_export_streams_a_sharded_checkpoint_into_one_safetensors_file(
    uninterrupted: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from ml.tools.export import main

    assert main([str(uninterrupted), "-o", str(tmp_path / "model.safetensors")]) == 0
    assert_same(
        load_file(tmp_path / "model.safetensors"), _weights(uninterrupted / "checkpoints" / "ckpt.12")
    )


def test_kill_9_of_rank_1_during_a_sharded_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """Rank 1 is killed while the shards of a checkpoint are being written (a bigger model, for a
    save that takes a while); the link names the one before, which the run then resumes from."""
    config = tmp_path / "sharded.yaml"
    config.write_text(CONFIG.replace("hidden: 48", "hidden: 1024").replace(", async_save: true", ""))
    run_dir = tmp_path / "runs"
    overrides = ["task.max_steps=100000", "trainer.checkpoint.only_save_most_recent=true"]
    proc = subprocess.Popen(
        [*ML, "launch", str(config), "launcher.name=torchrun", "launcher.nproc_per_node=2", *overrides],
        env=_env(run_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = RunDir(run_dir / "sharded" / "run_0")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not run.link.is_symlink():  # a first checkpoint is complete
            assert proc.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.01)
        first = os.readlink(run.link)
        writing = run.checkpoints / f"ckpt.{int(first.split('.')[1]) + 4}.tmp"
        while not writing.is_dir():  # the next one's shards are being written
            assert proc.poll() is None and time.monotonic() < deadline, "no second save"
            time.sleep(0.0005)
        os.kill(_worker_pid(proc.pid, 1), signal.SIGKILL)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, err[-3000:]
    assert os.readlink(run.link) == first  # the save in flight never became the checkpoint
    assert not run.sharded_checkpoint(int(first.split(".")[1]) + 4).exists()

    step = int(first.split(".")[1])
    resumed = _ml(
        "train", str(run.config), f"task.max_steps={step + 1}", "--allow-config-change", run_dir=run_dir
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stderr
    assert os.readlink(run.link) == f"ckpt.{step + 1}"
    assert not list(run.checkpoints.glob("*.tmp"))  # the unfinished folder is gone with retention
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [f"ckpt.{step + 1}", "ckpt.pt"]
