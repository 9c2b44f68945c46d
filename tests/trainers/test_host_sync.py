"""No host sync inside a training step: the device decides whether a step is applied, and values
are read on the host only when a logger writes (or a checkpoint is saved).

On a GPU a read (``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()``) makes the host wait for
the device, so that the next step's host work cannot overlap this step's kernels. The test counts
those reads on the CPU, where they are cheap but the code path is the same.
"""

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from ml.core.state import Phase, State
from ml.loggers.jsonl import JsonlLogger, JsonlLoggerConfig
from ml.lr_schedulers.builtin import CosineConfig, CosineLRScheduler
from ml.optimizers.builtin import AdamWConfig, AdamWOptimizer
from ml.tasks.sl import DataLoaderConfig, SupervisedLearningTaskConfig
from ml.trainers.sl import NonFiniteLossError, SupervisedLearningTrainer, SupervisedLearningTrainerConfig
from tests.tiny import TinyModel, TinyModelConfig, TinyTask

READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


class HostReads:
    """Counts reads of tensor values on the host while :attr:`counting`."""

    def __init__(self) -> None:
        self.counting = False
        self.calls: list[str] = []

    def wrap(self, name: str, method: Callable) -> Callable:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.counting:
                self.calls.append(name)
            return method(tensor, *args, **kwargs)

        return counted

    def wrap_to(self, method: Callable) -> Callable:
        def to(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            target = kwargs.get("device", args[0] if args and not isinstance(args[0], torch.dtype) else None)
            if self.counting and target is not None and torch.device(target).type == "cpu":
                # Not torch's fused optimizer or gradient scaler moving the scale and found_inf flag to
                # the parameters' or the scaler's device: here the CPU, on a GPU the GPU (no read).
                caller = Path(sys._getframe(1).f_code.co_filename)
                if caller.parent.name not in ("optim", "amp") or caller.parent.parent.name != "torch":
                    self.calls.append("to('cpu')")
            return method(tensor, *args, **kwargs)

        return to


@contextmanager
def counting_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostReads]:
    reads = HostReads()
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, reads.wrap(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.Tensor, "to", reads.wrap_to(torch.Tensor.to))
    yield reads


class StepWindows(TinyTask):
    """Many steps in one epoch; counts the host reads from each step's start to the next's."""

    reads: HostReads
    per_step: dict[int, list[str]]
    nan_at: int | None = None

    def get_dataset(self, phase: Phase) -> TensorDataset:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8 * 40, 4, generator=g)
        return TensorDataset(x, (x.sum(1) > 0).long())

    def on_step_start(self, state: State, model: nn.Module, optim: Any, lr_sched: Any) -> None:
        if self.reads.counting:
            self.per_step[state.num_steps] = self.reads.calls
        self.reads.calls = []
        self.reads.counting = True  # from the first step's start on

    def compute_loss(
        self, model: nn.Module, batch: tuple, state: State, output: torch.Tensor
    ) -> torch.Tensor:
        loss = F.cross_entropy(output, batch[1])
        return loss * float("nan") if state.num_steps + 1 == self.nan_at else loss


def _train(exp_dir: Path, reads: HostReads, *, nan_at: int | None = None, **trainer: Any) -> StepWindows:
    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {"name": "sl", "exp_dir": str(exp_dir), "clip_grad_norm": 1.0, **trainer},
    )
    sl = SupervisedLearningTrainer(config)  # type: ignore[arg-type]
    sl.add_logger(
        JsonlLogger(JsonlLoggerConfig(name="jsonl", write_every_n_steps=10, write_every_n_seconds=None))
    )
    task = StepWindows(
        SupervisedLearningTaskConfig(name="t", max_steps=30, train_dl=DataLoaderConfig(batch_size=8))
    )
    task.reads, task.per_step, task.nan_at = reads, {}, nan_at
    try:
        sl.train(
            TinyModel(TinyModelConfig(name="tiny")),
            task,
            AdamWOptimizer(AdamWConfig(name="adamw", lr=1e-2)),
            CosineLRScheduler(CosineConfig(name="cosine", warmup_steps=5, total_steps=30)),
        )
    finally:
        reads.counting = False
    return task


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_steps_that_do_not_log_read_nothing_on_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """With the defaults (AdamW's fused step takes the skip flag; torch's non-fused Adam reads its
    step counts on the host itself, and other optimizers read the flag: docs of ml.optimizers.fast).
    Under fp16 the gradient scaler read its found_inf flag on the host at every step: it hands it to
    the fused kernel only when the optimizer says it can take it."""
    with counting_host_reads(monkeypatch) as reads:
        task = _train(tmp_path, reads, valid_at_end=False, test_at_end=False, precision=precision)
    # The logger writes at steps 1, 11 and 21 (and 30, the last, whose window ends in the final
    # checkpoint); step 1 also makes one-time checks (the fused kernel's arithmetic, on two tensors).
    logged = {1, 11, 21}
    quiet = {step: calls for step, calls in task.per_step.items() if step not in logged}
    assert len(quiet) >= 25 and all(calls == [] for calls in quiet.values()), {
        s: c for s, c in quiet.items() if c
    }
    assert all(task.per_step[step] for step in logged)  # the counter sees the reads of a log write


def test_a_stop_is_raised_at_the_next_read_naming_the_step_and_nothing_is_saved_past_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with counting_host_reads(monkeypatch) as reads, pytest.raises(NonFiniteLossError) as error:
        _train(tmp_path, reads, nan_at=13, checkpoint={"save_every_n_steps": 15})
    assert str(error.value).startswith("non-finite values at step 13 (loss nan, gradient norm nan")
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 11]  # the checkpoint due at step 15 read the record first, and stopped
    assert not (tmp_path / "checkpoints" / "ckpt.15.pt").exists()  # nor was a checkpoint saved past it


def test_skipped_steps_change_nothing_and_are_counted_when_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with counting_host_reads(monkeypatch) as reads:
        _train(tmp_path / "skip", reads, nan_at=13, non_finite_loss="skip")
    records = [
        json.loads(line) for line in (tmp_path / "skip" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if r["phase"] == "train"]
    skipped = [r["metrics"].get("trainer/skipped_steps") for r in train]
    assert [r["step"] for r in train] == [1, 11, 21, 30] and skipped == [None, None, 1, 1]
    ckpt = torch.load(tmp_path / "skip" / "checkpoints" / "ckpt.pt", weights_only=True)
    assert ckpt["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert int(ckpt["optim"]["state"][0]["step"]) == 29  # the skipped step left the counts too
