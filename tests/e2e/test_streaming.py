"""End-to-end tests of streamed training data: ``ml train`` subprocesses, real signals. A run that is
signalled, killed or resumed is the real script; a run of one segment is forked from a process that
imported torch (tests/forked_ml.py).

The task (``stream_task.py``, on the subprocesses' PYTHONPATH) streams an ``IterableDataset`` that
shards by rank and loader worker, adds random noise to every sample, and implements
``state_dict()`` / ``load_state_dict()``. A run stopped mid-epoch (by SIGTERM, or killed with
SIGKILL after a checkpoint) and continued with ``ml train <exp_dir>/config.yaml`` must end with
exactly the tensors of a run that never stopped: weights, optimizer, generators and the stream's
own position. The same holds for two ranks (two ``ml train`` processes given torchrun's
variables, joined in a gloo group), whose shards differ in length (every rank ends each epoch at the
same step); resuming their stream with one process is refused. A job's ranks started as processes
of their own also show that every rank starts from the initial weights rank 0 names.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.forked_ml import Command, run_forked
from tests.same import assert_same

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 120
MAX_STEPS = 12

# 38 samples, two workers: two shards of 19, batches of 4 (the last of 3), two batches a step:
# 5 steps an epoch, so 12 steps end in the middle of the third epoch.
CONFIG = f"""\
model: {{name: "stream_task:DropoutMLP", hidden: 16, dropout: 0.2}}
task:
  name: "stream_task:StreamTask"
  num_samples: 38
  max_steps: {MAX_STEPS}
  train_dl: {{batch_size: 4, num_workers: 2, drop_last: false}}
  valid_dl: {{batch_size: 8}}
  test_dl: {{batch_size: 8}}
optimizer: {{name: adamw, lr: 1e-2}}
lr_scheduler: {{name: cosine, warmup_steps: 2}}
trainer:
  name: sl
  exp_name: stream
  batches_per_step: 2
  valid_every_n_steps: 4
  checkpoint: {{save_every_n_steps: 1000}}
logger: [{{name: jsonl, write_every_n_steps: 1}}]
"""

# Two ranks of one worker each: shards of 20 and 19 samples, in batches of 4: 5 batches on each,
# rank 1's last of 3 samples, so every epoch has 5 steps and 39 samples.
DIST_OVERRIDES = (
    "task.num_samples=39",
    "task.train_dl.num_workers=1",
    "trainer.batches_per_step=1",
    "trainer.sync_every_n_steps=1",
)
ALL_PARTS = ("model", "optim", "lr", "rng", "task", "sampler", "stream")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Run:
    """The ``ml train`` processes of an experiment, one per rank, with their output in files (workers
    killed with their parent would keep a pipe open)."""

    run_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    segments: int = 0

    @property
    def exp_dir(self) -> Path:
        return self.run_dir / "stream" / "run_0"

    @property
    def checkpoints(self) -> Path:
        return self.exp_dir / "checkpoints"

    def _environments(self, ranks: int) -> list[dict[str, str]]:
        """Each rank's: with several, its rank in torchrun's variables (as torchrun would give it,
        without the cost of its own process)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ML_EXP_NAME")
        }
        path = [str(Path(__file__).parent), env.get("PYTHONPATH")]
        env.update(
            RUN_DIR=str(self.run_dir),
            PYTHONPATH=os.pathsep.join(filter(None, path)),
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        if ranks == 1:
            return [env]
        env.update(WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=str(_free_port()))
        return [dict(env, RANK=str(rank), LOCAL_RANK=str(rank)) for rank in range(ranks)]

    def train(self, *args: str, ranks: int = 1) -> "Run":
        """Starts ``ml train ARGS`` in ``ranks`` processes (the script, in new interpreters)."""
        self.segments += 1
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.procs = []
        for rank, env in enumerate(self._environments(ranks)):
            with (
                self._output("stdout", rank).open("w") as out,
                self._output("stderr", rank).open("w") as err,
            ):
                self.procs.append(subprocess.Popen([*ML, "train", *args], env=env, stdout=out, stderr=err))
        return self

    def run(self, *args: str, ranks: int = 1, expected_code: int = 0) -> str:
        """``ml train ARGS`` in ``ranks`` processes side by side to their end, each forked from a
        process that imported torch (tests/forked_ml.py); asserts their exit codes; returns rank 0's
        stderr. For a run no signal reaches."""
        self.segments += 1
        self.run_dir.mkdir(parents=True, exist_ok=True)
        commands = [Command(["train", *args], env, timeout_s=TIMEOUT_S) for env in self._environments(ranks)]
        for rank, result in enumerate(run_forked(commands, parallel=ranks)):
            self._output("stdout", rank).write_text(result.stdout)
            self._output("stderr", rank).write_text(result.stderr)
            assert result.returncode == expected_code, (
                f"rank {rank}: exit {result.returncode}\n{result.stderr[-3000:]}"
            )
        return self._output("stderr", 0).read_text()

    def _output(self, name: str, rank: int) -> Path:
        return self.run_dir / f"{name}.{self.segments}.{rank}.txt"

    def finish(self, expected_code: int = 0) -> str:
        """Waits for every rank; asserts their exit codes; returns rank 0's stderr."""
        for rank, proc in enumerate(self.procs):
            try:
                code = proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
            stderr = self._output("stderr", rank).read_text()
            assert code == expected_code, f"rank {rank}: exit {code}\n{stderr[-3000:]}"
        return self._output("stderr", 0).read_text()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def ckpt(self) -> dict[str, Any]:
        return torch.load(self.checkpoints / "ckpt.pt", map_location="cpu", weights_only=True)

    def linked_step(self) -> int:
        return int(os.readlink(self.checkpoints / "ckpt.pt").split(".")[1])


def _train_losses(run: Run) -> dict[int, float]:
    lines = (run.exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r["metrics"]["train/loss"] for r in records if r["phase"] == "train"}


def _assert_same_training(run: Run, reference: Run) -> None:
    final, expected = run.ckpt(), reference.ckpt()
    for part in ALL_PARTS:
        assert_same(final[part], expected[part], part)
    counters = ("num_steps", "num_epochs", "num_samples", "num_epoch_steps", "num_epoch_samples")
    state, ref_state = json.loads(final["state"]), json.loads(expected["state"])
    assert {k: state[k] for k in counters} == {k: ref_state[k] for k in counters}
    assert state["num_steps"] == MAX_STEPS
    assert _train_losses(run) == _train_losses(reference)


def _mid_epoch(run: Run, step: int) -> None:
    """The run's newest checkpoint is of ``step``, in the middle of an epoch, with the stream's place."""
    assert run.linked_step() == step
    saved = run.ckpt()
    state = json.loads(saved["state"])
    assert state["num_steps"] == step and state["num_epoch_samples"] > 0
    assert all(rank is not None for rank in saved["stream"]["ranks"])


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "stream.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def reference(config: Path, tmp_path: Path) -> Iterator[Run]:
    """The uninterrupted single-process run, trained in the background while the test interrupts its own."""
    run = Run(tmp_path / "reference").train(str(config))
    yield run
    run.kill()


@pytest.mark.slow
def test_stopped_by_sigterm_then_killed_by_sigkill_with_workers_each_resume_exactly(
    config: Path, reference: Run, tmp_path: Path
) -> None:
    # One chain (each process start costs seconds): SIGTERM during step 3, mid-epoch; the continued
    # run checkpoints every 3 steps and is killed with SIGKILL during step 8, the third step of the
    # second epoch; the run continued from its last checkpoint (6) ends like the uninterrupted one.
    run = Run(tmp_path)
    stops = ("trainer.checkpoint.save_every_n_steps=3", "task.stops=3:SIGTERM,8:SIGKILL")
    try:
        stderr = run.train(str(config), *stops, f"task.stop_marker_dir={tmp_path}").finish(0)
        assert "Stopping on SIGTERM at step 3" in stderr and "Traceback" not in stderr
        _mid_epoch(run, 3)

        stderr = run.train(str(run.exp_dir / "config.yaml")).finish(-signal.SIGKILL)
        assert "at step 3" in stderr and (tmp_path / "stop.8").exists()
        _mid_epoch(run, 6)

        stderr = run.train(str(run.exp_dir / "config.yaml")).finish(0)
        assert "at step 6" in stderr and "Traceback" not in stderr
    finally:
        run.kill()
    reference.finish(0)
    assert reference.linked_step() == MAX_STEPS
    _assert_same_training(run, reference)


@pytest.mark.slow
def test_two_ranks_stop_and_resume_exactly_and_not_with_another_world_size(
    config: Path, tmp_path: Path
) -> None:
    reference = Run(tmp_path / "reference").train(str(config), *DIST_OVERRIDES, ranks=2)
    run = Run(tmp_path / "stopped")
    stop = ("task.stops=3:SIGTERM", f"task.stop_marker_dir={tmp_path}")
    try:
        stderr = run.train(str(config), *DIST_OVERRIDES, *stop, ranks=2).finish(0)
        assert "Joined the gloo process group as rank 0 of 2" in stderr
        assert "Stopping on SIGTERM at step 3" in stderr  # sent to rank 0, agreed by both
        _mid_epoch(run, 3)
        saved = run.ckpt()
        assert saved["stream"]["world_size"] == 2 and len(saved["stream"]["ranks"]) == 2

        # One process cannot take over two ranks' shards, even when a config change is allowed.
        stderr = run.train(str(run.exp_dir / "config.yaml"), "--allow-config-change").finish(2)
        assert "resume it with 2 processes, not 1" in stderr.strip().splitlines()[-1]
        assert "Traceback" not in stderr and run.linked_step() == 3

        run.train(str(run.exp_dir / "config.yaml"), ranks=2).finish(0)
        reference.finish(0)
    finally:
        run.kill()
        reference.kill()
    _assert_same_training(run, reference)
    state = json.loads(run.ckpt()["state"])
    # 5 steps an epoch, of 8 samples but the last (7: the ranks' sum, not rank 0's times 2).
    assert (state["num_epochs"], state["num_epoch_steps"]) == (2, 2)
    assert state["num_samples"] == 2 * 39 + 2 * 8 and state["num_epoch_samples"] == 2 * 8


@pytest.mark.slow
@pytest.mark.parametrize(
    ("parallel", "size", "batches_per_step", "steps", "trained"),
    [
        # Shards of 19 and 18 in batches of 4: the 5th step's hold 3 and 2 samples. DDP averages
        # the ranks' gradients as equals: unweighted, the step's would be the mean of a 3-sample
        # and a 2-sample mean.
        ("ddp", 37, 1, 5, 37),
        # Shards of 17 and 16, 3 batches a step: the 2nd step's groups hold 2 batches (4 and 1
        # samples) and 1 (4 samples). Every rank steps over as many batches (FSDP's passes are
        # collectives: a rank with fewer waited forever), the shortest group's count: rank 0's
        # last sample is dropped with the end of the epoch.
        ("fsdp", 33, 3, 2, 32),
    ],
)
def test_two_ranks_whose_last_batches_differ_step_on_the_mean_over_all_their_samples(
    tmp_path: Path, parallel: str, size: int, batches_per_step: int, steps: int, trained: int
) -> None:
    """The last step of the epoch is one SGD step over both ranks' last batches together, and the
    loss and accuracy logged for it are their means over those samples."""
    from torch.nn import functional as F

    from tests.e2e.stream_task import DropoutMLP, DropoutMLPConfig, epoch_order, split

    lr = 0.5
    config = tmp_path / "uneven.yaml"
    config.write_text(
        CONFIG.replace(f"max_steps: {MAX_STEPS}", f"max_steps: {steps}")  # one epoch
        .replace("{name: adamw, lr: 1e-2}", f"{{name: sgd, lr: {lr}}}")
        .replace("{name: cosine, warmup_steps: 2}", "{name: constant}")
        .replace("dropout: 0.2", "dropout: 0.0")
        .replace("save_every_n_steps: 1000", "save_every_n_steps: 1, only_save_most_recent: false")
    )
    overrides = (
        *DIST_OVERRIDES,
        f"task.num_samples={size}",
        "task.noise=0.0",
        f"trainer.batches_per_step={batches_per_step}",
        f"trainer.parallel={parallel}",
        "trainer.checkpoint.format=full",
        "task.eval_streams=false",  # (FSDP evaluates map-style data only)
    )
    run = Run(tmp_path / "run")
    run.run(str(config), *overrides, ranks=2)
    before = torch.load(run.checkpoints / f"ckpt.{steps - 1}.pt", map_location="cpu", weights_only=True)
    after = torch.load(run.checkpoints / f"ckpt.{steps}.pt", map_location="cpu", weights_only=True)
    assert json.loads(after["state"])["num_samples"] == trained  # one epoch

    # The step by hand, from the weights before it: each rank's last batch (of 4 samples at most).
    features, labels = split("train", size)
    order = epoch_order(size, 0)
    first = 4 * batches_per_step * (steps - 1)
    last = torch.cat([order[rank::2][first : first + 4] for rank in range(2)])
    assert last.numel() == trained - 2 * first
    model = DropoutMLP(DropoutMLPConfig(hidden=16, dropout=0.0))
    model.load_state_dict(before["model"])
    output = model(features[last])
    loss = F.cross_entropy(output, labels[last])
    loss.backward()
    expected = {name: (p - lr * p.grad).detach() for name, p in model.named_parameters()}
    for name, value in expected.items():
        torch.testing.assert_close(after["model"][name], value, rtol=0, atol=1e-6, msg=name)

    lines = (run.exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    (logged,) = [r["metrics"] for r in records if r["phase"] == "train" and r["step"] == steps]
    assert logged["train/loss"] == pytest.approx(loss.item(), rel=1e-6)
    accuracy = (output.argmax(dim=1) == labels[last]).float().mean().item()
    assert logged["train/accuracy"] == pytest.approx(accuracy, rel=1e-6)


@pytest.mark.slow
def test_every_rank_starts_from_the_initial_weights_rank_0_names(tmp_path: Path) -> None:
    """``checkpoint.load_from_ckpt_path`` names a file for each rank here (through its RANK), as a
    link that a run still training moves on may between two ranks' reads: every rank reads rank 0's
    (DDP broadcast rank 0's weights before, so the ranks' copies would have trained apart). Seen in
    the sum of the weights the first step starts from, averaged over the ranks."""
    from safetensors.torch import save_file

    from tests.e2e.stream_task import DropoutMLP, DropoutMLPConfig

    sums = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        weights = DropoutMLP(DropoutMLPConfig(hidden=16)).state_dict()
        # A chain of links, as a run still training keeps (latest -> its newest) and as a hub cache
        # keeps files (a name -> a blob without the suffix): rank 0's end of the chain is read.
        save_file(weights, tmp_path / f"blob{rank}")
        (tmp_path / f"newest{rank}").symlink_to(tmp_path / f"blob{rank}")
        (tmp_path / f"latest{rank}.safetensors").symlink_to(f"newest{rank}")
        sums.append(sum(value.double().sum().item() for value in weights.values()))
    config = tmp_path / "init.yaml"
    config.write_text(CONFIG)
    overrides = (
        *DIST_OVERRIDES,
        "task.max_steps=1",
        "model.log_weight_sum=true",
        f"trainer.checkpoint.load_from_ckpt_path={tmp_path}/latest${{oc.env:RANK}}.safetensors",
    )
    run = Run(tmp_path / "run")
    run.run(str(config), *overrides, ranks=2)
    records = [json.loads(line) for line in (run.exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    (first,) = [r["metrics"] for r in records if r["phase"] == "train" and r["step"] == 1]
    assert first["model/weight_sum"] == pytest.approx(sums[0], rel=1e-6)  # logged in float32
    assert abs(sums[1] - sums[0]) > 1e-3  # the other rank's file would show


@pytest.mark.slow
def test_fsdp_evaluates_streams_whose_shards_hold_different_numbers_of_batches(tmp_path: Path) -> None:
    """19 validation samples over two ranks, in batches of 3: 4 batches and 3. FSDP's forward passes
    are collective, so the rank with fewer joins the other's last one with a stand-in (what it logs
    is dropped): the metrics are the means over the 19 samples, without a hang; with
    ``task.valid_dl.max_batches=3``, over the 18 of the ranks' first 3 batches."""
    from torch.nn import functional as F

    from tests.e2e.stream_task import DropoutMLP, DropoutMLPConfig, epoch_order, split

    config = tmp_path / "fsdp.yaml"
    config.write_text(CONFIG)
    overrides = (
        *DIST_OVERRIDES,
        "task.num_samples=38",  # (validation: half as many)
        "task.max_steps=2",
        "task.valid_dl.batch_size=3",
        "trainer.parallel=fsdp",
        "trainer.checkpoint.format=full",
    )
    run = Run(tmp_path / "run")
    run.run(str(config), *overrides, ranks=2)
    model = DropoutMLP(DropoutMLPConfig(hidden=16)).eval()
    model.load_state_dict(run.ckpt()["model"])
    features, labels = split("valid", 19)
    with torch.no_grad():
        output = model(features)
    records = [json.loads(line) for line in (run.exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    (valid,) = [r["metrics"] for r in records if r["phase"] == "valid" and r["step"] == 2]
    assert valid["valid/loss"] == pytest.approx(F.cross_entropy(output, labels).item(), rel=1e-5)
    accuracy = (output.argmax(dim=1) == labels).float().mean().item()
    assert valid["valid/accuracy"] == pytest.approx(accuracy, rel=1e-6)

    # At most 3 batches in each rank: rank 0 leaves out its 4th (the pass's 19th sample, which the
    # shards take in turn), and no rank waits for another's pass.
    capped = Run(tmp_path / "capped")
    capped.run(str(config), *overrides, "task.valid_dl.max_batches=3", ranks=2)
    model.load_state_dict(capped.ckpt()["model"])
    first = epoch_order(19, 0)[:18]
    with torch.no_grad():
        output = model(features[first])
    records = [
        json.loads(line) for line in (capped.exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    (valid,) = [r["metrics"] for r in records if r["phase"] == "valid" and r["step"] == 2]
    assert valid["valid/loss"] == pytest.approx(F.cross_entropy(output, labels[first]).item(), rel=1e-5)

    # One validation sample: rank 1's shard has no batch to take part with. Said in one line.
    small = Run(tmp_path / "small")
    stderr = small.run(str(config), *overrides, "task.num_samples=2", ranks=2, expected_code=2)
    assert stderr.strip().splitlines()[-1] == (
        "ml: error: the valid stream of StreamTask gave at least one rank no batch: under "
        "trainer.parallel=fsdp every rank takes part in each forward pass; give it more samples, "
        "or fewer loader workers"
    )
