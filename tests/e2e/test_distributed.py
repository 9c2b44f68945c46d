"""End-to-end tests of training in several processes: real torchrun (or the mp launcher, which
gives each process torchrun's environment), real gloo process groups.

- DDP in 2 processes with batch B follows the loss curve of 1 process with batch 2B (the ranks'
  shards of each step together are that process's batch), and writes one run folder, one log.
- FSDP2 in 2 processes follows the same curve, checkpoints full (unsharded) weights and optimizer
  state from rank 0, and resumes from them, with 2 processes or with 1.
- Two torchrun "nodes" on this machine meet through a c10d rendezvous on 127.0.0.1 and train one job.
- SIGTERM to torchrun stops every rank at the same step with a checkpoint; the run then continues
  in 1 process from that step.
- The rl trainer collects on each rank and saves every rank's environments.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ml.loggers.jsonl import read_metrics
from tests.forked_ml import run_ml

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 180
BATCH = 32  # per process; the single-process reference takes 2 * BATCH

CONFIG = """\
model: {name: digits_mlp, hidden: 64, dropout: 0.0}
task: {name: digits, seed: 3, max_steps: 24, train_dl: {batch_size: 32}}
optimizer: {name: adam, lr: 1e-2}
lr_scheduler: {name: constant}
trainer:
  name: sl
  exp_name: dist
  sync_every_n_steps: 1
  valid_at_end: false
  checkpoint: {save_every_n_steps: 12}
logger: [{name: jsonl, write_every_n_steps: 1}]
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "dist.yaml"
    path.write_text(CONFIG)
    return path


def _env(run_dir: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ML_EXP_NAME")
    }
    env.update(RUN_DIR=str(run_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _ml(*args: str, run_dir: Path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``ml ARGS`` to completion, forked from a process that imported torch (tests/forked_ml.py): the
    processes it starts (ranks, torchrun's workers) are new interpreters, as for the script."""
    return run_ml(args, _env(run_dir), timeout_s=timeout)


def _job(config: Path, run_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """``nproc`` processes of one job, started by the mp launcher: torchrun's environment, without
    torchrun's own process (3 s a run); the tests of torchrun itself start it."""
    result = _ml(
        "launch",
        str(config),
        "launcher.name=mp",
        f"launcher.nproc_per_node={nproc}",
        *overrides,
        run_dir=run_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _only_run(run_dir: Path) -> Path:
    runs = sorted((run_dir / "dist").iterdir())
    assert [r.name for r in runs] == ["run_0"], runs  # one run folder for the whole job
    return runs[0]


def _records(exp_dir: Path) -> list[dict[str, Any]]:
    """The records so far (read while a run writes: a line still being written is skipped)."""
    return list(read_metrics(exp_dir / "logs"))


def _train_losses(exp_dir: Path) -> dict[int, float]:
    records = [r for r in _records(exp_dir) if r["phase"] == "train"]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), "a step was logged twice (by two ranks?)"
    return {r["step"]: r["metrics"]["train/loss"] for r in records}


def _state(ckpt: Path) -> dict[str, Any]:
    return json.loads(torch.load(ckpt, weights_only=True)["state"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The loss curve of one process with the doubled batch."""
    tmp = tmp_path_factory.mktemp("reference")
    (tmp / "dist.yaml").write_text(CONFIG)
    result = _ml(
        "train", str(tmp / "dist.yaml"), f"task.train_dl.batch_size={2 * BATCH}", run_dir=tmp / "runs"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = _train_losses(tmp / "runs" / "dist" / "run_0")
    assert sorted(losses) == list(range(1, 25))
    return losses


def _assert_same_curve(losses: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(losses) == sorted(reference)
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=2e-4, abs=1e-5), f"step {step}"
    assert reference[24] < reference[1] * 0.6  # and the curve is one of learning


def test_ddp_two_processes_follow_one_process_with_the_doubled_batch(
    config: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    result = _job(config, tmp_path / "runs")
    exp_dir = _only_run(tmp_path / "runs")
    _assert_same_curve(_train_losses(exp_dir), reference)
    assert "Joined the gloo process group as rank 0 of 2" in result.stderr
    state = _state(exp_dir / "checkpoints" / "ckpt.pt")
    assert (state["num_steps"], state["num_samples"]) == (24, 24 * 2 * BATCH)
    assert "ckpt.12.pt" in result.stderr  # saved once, by rank 0, then replaced by the newer one
    assert sorted(p.name for p in (exp_dir / "checkpoints").iterdir()) == ["ckpt.24.pt", "ckpt.pt"]
    test_records = [r for r in _records(exp_dir) if r["phase"] == "test"]
    assert len(test_records) == 1  # the test set, sharded over the ranks, is reported once


def _failed_alike_on_both_ranks(result: subprocess.CompletedProcess[str], run: Path) -> str:
    """Exit code 1, one ``training failed:`` line from each of the 2 ranks (the same), no traceback,
    and the run failed at step 0 without a checkpoint; returns the line."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    prefixes = ("ml: training failed: ", "ml[rank 1]: training failed: ")
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefixes)]
    assert len(lines) == 2 and lines[0].partition("failed: ")[2] == lines[1].partition("failed: ")[2], lines
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["step"]) == ("failed", 0)
    assert not list(run.glob("checkpoints/ckpt.*"))
    return lines[0]


def test_ddp_fails_on_parameters_the_loss_leaves_out_unless_told_to_find_them(
    config: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    """DDP waits for a gradient of every parameter: one the loss leaves out kept the gradients of its
    bucket from being averaged (the ranks stepped apart) and failed the next step with torch's error,
    which names parameters by number and asks for an argument the config did not reach."""
    # (A section whose component is renamed starts from that component's defaults.)
    model = ["model.name=tests.e2e.unused_head:DigitsWithUnusedHead", "model.hidden=64", "model.dropout=0"]
    failed = _ml(
        "launch",
        str(config),
        "launcher.name=mp",
        "launcher.nproc_per_node=2",
        *model,
        run_dir=tmp_path / "no",
    )
    line = _failed_alike_on_both_ranks(failed, _only_run(tmp_path / "no"))
    assert (
        "the loss of step 1 left out trainable parameters of the model (unused_head.weight, unused_head.bias)"
        in line
    )
    assert "set trainer.ddp.find_unused_parameters=true" in line

    # Told to find them, the job follows one process with the doubled batch (and the plain model).
    _job(config, tmp_path / "runs", *model, "trainer.ddp.find_unused_parameters=true")
    exp_dir = _only_run(tmp_path / "runs")
    _assert_same_curve(_train_losses(exp_dir), reference)
    assert _state(exp_dir / "checkpoints" / "ckpt.pt")["num_steps"] == 24


def test_rl_under_ddp_fails_on_parameters_the_loss_leaves_out(tmp_path: Path) -> None:
    failed = _ml(
        "launch",
        "cartpole",
        "model.name=tests.e2e.unused_head:ActorCriticWithUnusedHead",
        "model.observation_size=4",
        "model.action_size=2",
        "launcher.name=mp",
        "launcher.nproc_per_node=2",
        "task.max_steps=2",
        "task.num_envs=2",
        "task.minibatch_size=64",
        "trainer.eval_every_n_iterations=null",
        run_dir=tmp_path / "runs",
    )
    (run,) = (tmp_path / "runs" / "cartpole").iterdir()
    line = _failed_alike_on_both_ranks(failed, run)
    assert "the loss of iteration 1 left out trainable parameters of the model (unused_head.weight" in line


def test_fsdp_trains_checkpoints_full_state_and_resumes(
    config: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    run_dir = tmp_path / "runs"
    _job(config, run_dir, "trainer.parallel=fsdp", "trainer.checkpoint.format=full", "task.max_steps=12")
    exp_dir = _only_run(run_dir)
    ckpt = torch.load(exp_dir / "checkpoints" / "ckpt.12.pt", weights_only=True)
    # Full tensors, not shards: the shapes of the whole model (64 -> 64 -> 64 -> 10).
    assert ckpt["model"]["net.0.weight"].shape == (64, 64)
    assert ckpt["model"]["net.6.weight"].shape == (10, 64)
    assert "net.0.weight" in ckpt["optim"]["state"]  # optimizer state by parameter name
    assert ckpt["optim"]["state"]["net.0.weight"]["exp_avg"].shape == (64, 64)

    # Continue the same run to step 24 with FSDP in 2 processes: the curve is the reference's.
    _job(exp_dir / "config.yaml", run_dir, "task.max_steps=24")
    assert _state(exp_dir / "checkpoints" / "ckpt.pt")["num_steps"] == 24
    _assert_same_curve(_train_losses(exp_dir), reference)

    # And on in a single process (no FSDP there), from the full state.
    result = _ml(
        "train", str(exp_dir / "config.yaml"), "task.max_steps=30", "--allow-config-change", run_dir=run_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr and "at step 24" in result.stderr
    assert _state(exp_dir / "checkpoints" / "ckpt.pt")["num_steps"] == 30


def test_fsdp_resumes_the_full_state_of_an_optimizer_that_keeps_none(config: Path, tmp_path: Path) -> None:
    """SGD without momentum keeps no state: its full checkpoint holds only the groups' settings,
    which torch's loader could not place (it takes the device from the state's tensors)."""
    run_dir = tmp_path / "runs"
    sgd = ("trainer.parallel=fsdp", "trainer.checkpoint.format=full", "optimizer.name=sgd")
    _job(config, run_dir, *sgd, "optimizer.lr=0.1", "task.max_steps=2")
    exp_dir = _only_run(run_dir)
    assert torch.load(exp_dir / "checkpoints" / "ckpt.2.pt", weights_only=True)["optim"]["state"] == {}
    result = _job(exp_dir / "config.yaml", run_dir, "task.max_steps=3")
    assert "Resumed from" in result.stderr and "at step 2" in result.stderr
    assert _state(exp_dir / "checkpoints" / "ckpt.pt")["num_steps"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_nodes_meet_through_a_c10d_rendezvous(
    config: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    run_dir = tmp_path / "runs"
    node = [
        *ML,
        "launch",
        str(config),
        "launcher.name=torchrun",
        "launcher.nnodes=2",
        "launcher.nproc_per_node=1",
        f"launcher.rdzv_endpoint=127.0.0.1:{_free_port()}",
    ]
    # The same command line on each "node".
    nodes = [
        subprocess.Popen(node, env=_env(run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=TIMEOUT_S) for p in nodes]
    for p, (_, err) in zip(nodes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert sum("Joined the gloo process group as rank 0 of 2" in err for _, err in outputs) == 1
    exp_dir = _only_run(run_dir)
    state = _state(exp_dir / "checkpoints" / "ckpt.pt")
    assert (state["num_steps"], state["num_samples"]) == (24, 24 * 2 * BATCH)
    _assert_same_curve(_train_losses(exp_dir), reference)


def _wait_for_step(exp_dir: Path, step: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    metrics = exp_dir / "logs" / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if metrics.exists() and any(r["step"] >= step for r in _records(exp_dir) if r["phase"] == "train"):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never came")


def test_sigterm_under_torchrun_checkpoints_and_resumes_with_one_process(
    config: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "runs"
    launch = [*ML, "launch", str(config), "launcher.name=torchrun", "launcher.nproc_per_node=2"]
    proc = subprocess.Popen(
        [*launch, "task.max_steps=100000", "trainer.checkpoint.save_every_n_steps=100000"],
        env=_env(run_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(run_dir / "dist" / "run_0", 20, proc)
    proc.send_signal(signal.SIGTERM)  # to torchrun (`ml launch` became it), which passes it to the workers
    _, err = proc.communicate(timeout=TIMEOUT_S)
    exp_dir = _only_run(run_dir)
    assert "Stopping on SIGTERM at step" in err
    saved = _state(exp_dir / "checkpoints" / "ckpt.pt")
    stopped_at = saved["num_steps"]
    assert 20 <= stopped_at < 100000
    assert max(_train_losses(exp_dir)) == stopped_at  # the ranks stopped together, at the saved step

    # Another number of processes changes the experiment: refused unless asked for, then recorded.
    again = [str(exp_dir / "config.yaml"), f"task.max_steps={stopped_at + 10}"]
    refused = _ml("train", *again, run_dir=run_dir)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "number of processes: 2 -> 1" in refused.stderr.splitlines()[-1]
    assert _state(exp_dir / "checkpoints" / "ckpt.pt") == saved
    result = _ml("train", *again, "--allow-config-change", run_dir=run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "number of processes: 2 -> 1" in (exp_dir / "config_changes.log").read_text()
    assert f"at step {stopped_at}" in result.stderr
    losses = _train_losses(exp_dir)  # no step trained twice, none skipped
    assert sorted(losses) == list(range(1, stopped_at + 11))
    final = _state(exp_dir / "checkpoints" / "ckpt.pt")
    assert final["num_steps"] == stopped_at + 10
    assert final["num_samples"] > saved["num_samples"]


def test_rl_collects_on_every_rank_and_saves_every_ranks_environments(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs"
    overrides = [
        "task.max_steps=3",
        "task.num_envs=2",
        "task.minibatch_size=64",  # the rollout of 2 x 32 steps (cartpole's 256 would not fit)
        "trainer.eval_every_n_iterations=null",
        "trainer.num_eval_episodes=2",
    ]
    result = _ml(
        "launch",
        "cartpole",
        "launcher.name=torchrun",
        "launcher.nproc_per_node=2",
        *overrides,
        run_dir=run_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (exp_dir,) = (run_dir / "cartpole").iterdir()
    ckpt = torch.load(exp_dir / "checkpoints" / "ckpt.pt", weights_only=True)
    state = json.loads(ckpt["state"])
    assert state["num_samples"] == 3 * 2 * 32 * 2  # iterations x envs x steps x ranks
    first, second = ckpt["rl_ranks"]
    assert not torch.equal(first["observations"], second["observations"])  # each rank's own environments

    result = _ml(
        "launch", str(exp_dir / "config.yaml"), "launcher.name=torchrun", "task.max_steps=4", run_dir=run_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 3" in result.stderr
    assert (
        json.loads(torch.load(exp_dir / "checkpoints" / "ckpt.pt", weights_only=True)["state"])["num_steps"]
        == 4
    )


def _worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with global rank ``rank`` (read from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher_pid}")


def test_a_signal_to_one_rank_stops_all_ranks_at_the_same_step(config: Path, tmp_path: Path) -> None:
    """SIGUSR1 reaches rank 1 only; the ranks agree at the next sync, rank 0 saves, all exit 0."""
    run_dir = tmp_path / "runs"
    launch = [*ML, "launch", str(config), "launcher.name=torchrun", "launcher.nproc_per_node=2"]
    proc = subprocess.Popen(
        [*launch, "task.max_steps=100000", "trainer.sync_every_n_steps=5"],
        env=_env(run_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(run_dir / "dist" / "run_0", 12, proc)
    os.kill(_worker_pid(proc.pid, 1), signal.SIGUSR1)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]  # both workers stopped cleanly
    exp_dir = _only_run(run_dir)
    assert "Stopping on SIGUSR1 at step" in err
    stopped_at = _state(exp_dir / "checkpoints" / "ckpt.pt")["num_steps"]
    assert stopped_at % 5 == 0  # at a step where the ranks compare notes
    assert stopped_at < 100000
    assert not (exp_dir / ".lock_running").exists()


def test_launch_with_the_default_launcher_trains_in_this_process(config: Path, tmp_path: Path) -> None:
    result = _ml("launch", str(config), "task.max_steps=3", run_dir=tmp_path / "runs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process group" not in result.stderr
    assert _state(_only_run(tmp_path / "runs") / "checkpoints" / "ckpt.pt")["num_steps"] == 3


def test_fsdp_starts_from_an_export_and_one_process_from_the_sharded_folder(
    config: Path, tmp_path: Path
) -> None:
    """Initial weights (checkpoint.load_from_ckpt_path) go into FSDP's shards as a resume's do, and a
    sharded checkpoint's folder is itself a source of initial weights. With lr=0 the weights each run
    saves are those it started from."""
    from safetensors.torch import load_file

    run_dir, export = tmp_path / "runs", tmp_path / "w.safetensors"
    assert _ml("train", str(config), "task.max_steps=2", run_dir=run_dir).returncode == 0
    assert _ml("export", str(run_dir / "dist" / "run_0"), "-o", str(export), run_dir=run_dir).returncode == 0
    exported = load_file(export)
    frozen = ["optimizer.lr=0.0", "task.max_steps=1", "trainer.checkpoint.save_every_n_steps=null"]
    _job(
        config, run_dir, "trainer.parallel=fsdp", f"trainer.checkpoint.load_from_ckpt_path={export}", *frozen
    )
    folder = run_dir / "dist" / "run_1" / "checkpoints" / "ckpt.1"
    assert folder.is_dir()  # sharded: the default under FSDP
    result = _ml(
        "train",
        str(config),
        f"trainer.checkpoint.load_from_ckpt_path={folder}",
        "trainer.checkpoint.format=full",
        *frozen,
        run_dir=run_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Initial weights loaded from {folder}" in result.stderr
    weights = torch.load(run_dir / "dist" / "run_2" / "checkpoints" / "ckpt.1.pt", weights_only=True)["model"]
    assert sorted(weights) == sorted(exported)
    for name, tensor in exported.items():
        assert torch.equal(weights[name], tensor), name


COUNTING = """\
model: {name: "counting_task:CountingModel"}
task:
  name: "counting_task:CountingTask"
  max_steps: 2
  n_valid: 9
  some_at: 5
  step_sleep_s: 0.3
  train_dl: {batch_size: 2}
  valid_dl: {batch_size: 2}
  test_dl: {batch_size: 2}
optimizer: {name: adam, lr: 0.0}
lr_scheduler: {name: constant}
trainer:
  name: sl
  exp_name: dist
  parallel: fsdp
  sync_every_n_steps: 5  # the ranks agree on the clock at step 0 and after the loop
  valid_every_n_steps: 1
  valid_at_end: false
  test_at_end: false
logger: [{name: jsonl, write_every_n_steps: 1}]
"""


def _train_counting(tmp_path: Path, config_text: str) -> Path:
    """Trains ``config_text`` (the counting task, ``counting_task.py``) on 2 processes; returns the
    run folder."""
    config = tmp_path / "counting.yaml"
    config.write_text(config_text)
    run_dir = tmp_path / "runs"
    env = {
        **_env(run_dir),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    command = [*ML, "launch", str(config), "launcher.name=mp", "launcher.nproc_per_node=2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return _only_run(run_dir)


def test_fsdp_validation_covers_every_sample_and_what_one_rank_alone_logged(tmp_path: Path) -> None:
    """The 9 samples 0..8 split 5 and 4 over the ranks: rank 0 evaluates 3 batches ([0, 2], [4, 6],
    [8]), rank 1 two ([1, 3], [5, 7]) and joins rank 0's third forward pass with a stand-in; the
    mean is 4 (all 9, none dropped for an even split), and ``some``, logged by rank 1's [5, 7] alone,
    is 6. The validations' records say when they were written, not when the ranks last agreed on
    the clock (at step 0: every later step took 0.3 s)."""
    records = [r for r in _records(_train_counting(tmp_path, COUNTING)) if r["phase"] == "valid"]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["metrics"]["valid/loss"] == pytest.approx(4.0)
        assert record["metrics"]["model/mean"] == pytest.approx(4.0)
        assert record["metrics"]["valid/some"] == pytest.approx(6.0)
        assert record["elapsed_s"] >= 0.3 * record["step"], record


def test_fsdp_evaluates_with_rank_0_s_running_statistics_which_the_checkpoint_keeps(tmp_path: Path) -> None:
    """FSDP leaves each rank the batch-norm statistics of its own batches (DDP broadcasts rank 0's);
    a rank evaluated with its own, so validation disagreed with the checkpoint's (rank 0's) model, and
    a resumed run validated differently from an uninterrupted one."""
    normed = COUNTING.replace("counting_task:CountingModel", "counting_task:NormedCountingModel").replace(
        "  valid_every_n_steps: 1\n", "  valid_every_n_steps: 2\n  checkpoint: {format: full}\n"
    )
    exp_dir = _train_counting(tmp_path, normed)
    (record,) = [r for r in _records(exp_dir) if r["phase"] == "valid"]
    buffers = torch.load(exp_dir / "checkpoints" / "ckpt.pt", weights_only=True)["model"]
    mean, var = buffers["norm.running_mean"].item(), buffers["norm.running_var"].item()
    expected = (4.0 - mean) / (var + 1e-5) ** 0.5  # the samples 0..8: their mean, normed as rank 0 does
    assert record["metrics"]["valid/loss"] == pytest.approx(expected, rel=1e-5), (record, mean, var)
