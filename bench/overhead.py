"""Measures what a training framework costs per step: ``ml`` against a plain loop, Lightning and Accelerate.

Every contender trains the same MLP on the same in-memory data for a fixed number of steps: the
1,797 8x8 digits of scikit-learn (64 features, 10 classes), batch 64, shuffled, last partial batch
dropped (28 steps per epoch), Adam at 1e-3, cross-entropy, weights initialised from seed 0, one
torch thread (``torch.set_num_threads(1)``), denormals flushed to zero (``torch.set_flush_denormal``,
see below), on CUDA when there is one (else the CPU). Two models:

* ``tiny``: 64-256-256-10 (85k weights), where the framework's per-step overhead dominates;
* ``big``: 64-1024-1024-1024-10 (2.2M weights), where the matrix products dominate.

The contenders:

* ``plain``: a hand-written loop (DataLoader over a TensorDataset, ``zero_grad``, ``backward``,
  ``step``; no ``loss.item()`` or other host sync per step);
* ``plain_again``: the same loop once more, in its own interpreter, as if it were another contender
  (an A/A control): its ratio to ``plain`` is what the machine's noise alone makes of a ratio;
* ``ml``: ``ml train`` with its defaults, as the ``digits`` example runs it: stdout, jsonl and
  TensorBoard loggers at their default intervals (10 s, 1 s, 10 s), checkpoints at the default cadence
  (every 3,600 s, so only the final one, after the timed steps), no periodic validation (the default;
  the data has no validation or test split), the non-finite check, gradient norm and every metric
  the trainer logs by default (loss, grad norm, learning rate, epoch, steps/s, samples/s);
* ``ml minimal``: ``ml train`` with no logger, no timed checkpoints (the final one cannot be turned
  off; it comes after the timed steps) and no validation or test at the end;
* ``lightning``: ``lightning.Trainer`` with its defaults (TensorBoard or CSV logger, a checkpoint at
  every epoch end, progress bar, model summary; ``devices=1``), ``self.log`` of the loss each step;
* ``fabric``: ``lightning.fabric.Fabric`` (``setup``, ``setup_dataloaders``, ``fabric.backward``);
* ``accelerate``: ``accelerate.Accelerator`` (``prepare``, ``accelerator.backward``);
* ``lightning_stripped`` (only with ``--contenders``): the Trainer without logger, checkpoints,
  progress bar and model summary;
* ``plain_tuned``: the plain loop with the three things ``ml``'s trainers
  do by default that a plain loop does not: Adam's fused kernel (``fused=True``; torch's default on
  the CPU is a loop over the tensors; ``trainer.fast_optimizer``), glibc's malloc
  thresholds (``ml.utils.malloc.tune_malloc()``; ``trainer.tune_malloc``; the big model's steps
  page-fault their freed memory back in without it) and the gradients unset without torch's
  ``zero_grad`` wrapper (``ml.optimizers.fast.clear_grads``, always). ``ml``'s ratio to it is the
  framework's own cost.

Each run is a fresh interpreter, and the contenders alternate in rounds (plain, ml, ..., plain, ml,
...; each round starts one contender further on) so that changes in the machine's load hit them
alike. The model's first module records the time at which the training forward passes of steps
``warmup + 1`` and ``steps`` begin; the steps in between are the timed ones (``steps - warmup - 1``
whole steps, start-up and the first ``warmup`` steps excluded, and so is everything after the last
forward: the final checkpoint, teardown). On CUDA the device is synchronised at those two instants,
and around each block of the partner's steps (below), whose time is taken out.

Each run also carries a partner (unless ``--no-partner``): the plain loop, with its own copy of the
model, optimizer and data, trained in the contender's process in blocks of 100 steps (tiny) or 10
(big) between the contender's timed steps (the block runs inside the contender's forward pass, at the
first module). The partner's wall time, CPU time and page faults are measured apart and taken out of
the contender's; it ends up taking as many steps. Runs here vary by +-20% from one to the next, and
even 0.4 s stretches of one run by as much (other tenants of the host, not this machine's load:
reported steal time stays 0), so a ratio between two runs needs many rounds; a ratio to plain steps
taken a fraction of a second before, in the same process, needs far fewer. The partner shares the
process and its settings (one thread, denormals, the allocator ``ml`` tunes), so that ratio isolates
the contender's per-step work; it is slightly unfavourable to contenders that log or save on a wall
clock (``ml``'s jsonl logger writes every second of wall time, partner steps included).

Reported per contender:

* steps/s: the median over rounds of the timed steps per second;
* x plain: in each round, the run's steps/s divided by that round's plain run, then the median;
* middle half: the 25th to the 75th percentile of those ratios (how far one round's ratio can be
  trusted: compare with the A/A control's);
* x plain in-process: the run's steps/s divided by its partner's, then the median over rounds, and
  its middle half (the in-process A/A control is ``plain``'s own);
* us/step over plain: ``1/steps_per_s - 1/plain_steps_per_s`` of the medians, in microseconds;
* faults/step: the process's minor page faults per timed step (memory handed back to the OS and
  faulted back in; the median over rounds);
* start-up: from launching the interpreter to the end of the first step (imports, set-up, data, the
  first step), the median over rounds.

Why flush denormals: as the loss nears 0, some of Adam's second moments become denormal floats, and
on a CPU every operation on them is slow: the plain loop drops from ~530 to ~340 steps/s between 1,000
and 8,000 steps. When that happens depends on the data order, which each framework draws in its own
way (``ml`` met it after ~1,000 steps with ``task.seed=0``, the plain loop later), so without the flush
the ratios measured the trajectories, not the frameworks. Every contender runs with it alike.

The JSON results also hold each run's ratio of median step times (which ignores slow steps: those
other tenants slow down, but also any work done every N steps or seconds) and of CPU time.

The issue's targets (tiny model: ``ml`` defaults at least 0.95x plain, ``ml`` minimal at least
Fabric; big model: ``ml`` at least 0.99x) are checked on both ratios and printed below the table.

Run it with ``python bench/overhead.py`` (needs ``pip install -e ".[bench]"`` for the peers; those not
installed are left out) or ``python bench/overhead.py --quick`` for a smoke run.
"""

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONTENDERS: tuple[str, ...] = (
    "plain",
    "plain_again",
    "plain_tuned",
    "ml",
    "ml_minimal",
    "ml_same_math",
    "lightning",
    "fabric",
    "accelerate",
)
EXTRA: tuple[str, ...] = ("lightning_stripped",)  # only when asked for with --contenders
NEEDS: dict[str, str] = {
    "lightning": "lightning",
    "lightning_stripped": "lightning",
    "fabric": "lightning",
    "accelerate": "accelerate",
}
LABELS: dict[str, str] = {
    "plain": "plain PyTorch",
    "plain_again": "plain PyTorch, again (A/A)",
    "plain_tuned": "plain PyTorch, tuned as ml",
    "ml": "ml (defaults)",
    "ml_minimal": "ml (minimal)",
    "ml_same_math": "ml (defaults, plain's arithmetic)",
    "lightning": "Lightning Trainer (defaults)",
    "lightning_stripped": "Lightning Trainer (stripped)",
    "fabric": "Lightning Fabric",
    "accelerate": "HF Accelerate",
}
# The targets (tiny model unless named): (description, model, contender, at least, or the
# contender whose ratio it must reach).
TARGETS: tuple[tuple[str, str, str, float | str], ...] = (
    ("ml defaults >= 0.95x plain (tiny)", "tiny", "ml", 0.95),
    ("ml minimal >= Fabric (tiny)", "tiny", "ml_minimal", "fabric"),
    ("ml defaults >= 0.99x plain (big)", "big", "ml", 0.99),
    ("ml, plain's arithmetic >= 0.98x plain (tiny)", "tiny", "ml_same_math", 0.98),
    ("ml, plain's arithmetic >= 0.98x plain (big)", "big", "ml_same_math", 0.98),
    ("ml, plain's arithmetic >= Fabric (tiny)", "tiny", "ml_same_math", "fabric"),
)
MODELS: dict[str, tuple[int, ...]] = {"tiny": (64, 256, 256, 10), "big": (64, 1024, 1024, 1024, 10)}
# (steps, warmup) per model: the full run and --quick.
# (steps, warmup, partner block) per model: the full run and --quick.
STEPS: dict[str, tuple[int, int, int]] = {"tiny": (3000, 200, 100), "big": (300, 20, 10)}
QUICK_STEPS: dict[str, tuple[int, int, int]] = {"tiny": (60, 10, 10), "big": (12, 4, 2)}
BATCH_SIZE = 64
LR = 1e-3
SEED = 0

# ---------------------------------------------------------------------------------------------
# The worker: one contender, one model, in a fresh interpreter. Each contender imports only what it
# uses, so start-up times are each library's own.


def _usage() -> tuple[float, float, int]:
    """Now: wall clock, process CPU time, minor page faults so far."""
    return time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Clock:
    """Times of the training forward passes ``2`` and ``warmup + 1`` to ``steps`` (1-based).

    Also the process's minor page faults between passes ``warmup + 1`` and ``steps``. With a
    ``partner`` (see :class:`_PlainLoop`), every ``block`` passes of the timed window the partner runs
    ``block`` plain steps of its own, inside the contender's forward pass; the partner's wall time,
    CPU time and page faults are kept apart and taken out of the contender's.
    """

    def __init__(
        self,
        warmup: int,
        steps: int,
        sync: Callable[[], None],
        partner: Callable[[], "_PlainLoop"] | None = None,
        block: int = 1,
    ) -> None:
        if not 1 <= warmup < steps - 1:
            raise ValueError(f"need 1 <= warmup < steps - 1, got warmup {warmup} and steps {steps}")
        self.calls = 0
        self.marks: dict[int, list[str]] = {}
        for call, name in ((2, "first_step_done"), (warmup + 1, "timed_start"), (steps, "timed_end")):
            self.marks.setdefault(call, []).append(name)
        self.times: dict[str, float] = {}
        self.cpu_times: dict[str, float] = {}
        self.faults: dict[str, int] = {}
        self.stamps: list[float] = []  # every timed pass's start (partner time taken out), for the median
        self.first_stamp, self.last_stamp = warmup + 1, steps
        self.sync = sync
        self.make_partner, self.block = partner, block
        self.partner: _PlainLoop | None = None
        self.partner_steps = 0
        self.partner_usage = [0.0, 0.0, 0]  # wall s, CPU s, faults of the partner's steps
        self.aside = [0.0, 0.0, 0]  # what the contender is not charged for: the partner, its set-up

    def tick(self) -> None:
        self.calls += 1
        names = self.marks.get(self.calls)
        if names is not None:
            self.sync()
            now, cpu, faults = _usage()
            for name in names:
                self.times[name], self.cpu_times[name], self.faults[name] = now, cpu, faults
        if self.first_stamp <= self.calls <= self.last_stamp:
            self.stamps.append(time.perf_counter() - self.aside[0])  # (no GPU sync in between)
            if (
                self.make_partner is not None
                and self.calls < self.last_stamp
                and (self.calls - self.first_stamp) % self.block == 0
            ):
                self._partner_block(min(self.block, self.last_stamp - self.calls))

    def _partner_block(self, steps: int) -> None:
        assert self.make_partner is not None
        self.sync()  # the contender's queued work is the contender's
        if self.partner is None:
            before = _usage()
            self.partner = self.make_partner()
            self._set_aside(before, _usage())
        before = _usage()
        self.partner.train(steps)
        self.sync()
        after = _usage()
        self._set_aside(before, after)
        for i in range(3):
            self.partner_usage[i] += after[i] - before[i]
        self.partner_steps += steps

    def _set_aside(self, before: tuple[float, float, int], after: tuple[float, float, int]) -> None:
        for i in range(3):
            self.aside[i] += after[i] - before[i]


class _PlainLoop:
    """The plain loop: its own model (from seed 0), Adam and data order, trained ``steps`` at a time.

    The ``plain`` contenders train one to the end. As a partner (:func:`_partner`) one runs in a
    contender's process, in blocks between the contender's steps: each contender's steps are then
    compared with plain steps taken in the same process a fraction of a second apart, which the
    machine's changing speed affects alike, so the ratio keeps what the contender costs and loses most
    of the noise between runs. The partner shares the process and its settings (threads, denormals,
    an allocator tuned by ``ml``), so that ratio isolates per-step work.
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        clock: "_Clock | _NoClock",
        fused: bool | None = None,
        tuned: bool = False,
    ) -> None:
        import torch

        self.clear_grads: Callable[[Any], None] | None = None
        if tuned:
            from ml.optimizers.fast import clear_grads

            self.clear_grads = clear_grads
        self.device = _device()
        self.model = _model(widths, clock).to(self.device)
        self.optim = torch.optim.Adam(self.model.parameters(), lr=LR, fused=fused)
        self.loader = _loader(_data())
        self.batches = iter(self.loader)

    def train(self, steps: int) -> None:
        import torch
        import torch.nn.functional as F

        self.model.train()
        with torch.enable_grad():  # a partner runs inside the contender's forward pass, whatever its mode
            for _ in range(steps):
                batch = next(self.batches, None)
                if batch is None:  # the next epoch, in a new order
                    self.batches = iter(self.loader)
                    batch = next(self.batches)
                x, y = (t.to(self.device, non_blocking=True) for t in batch)
                loss = F.cross_entropy(self.model(x), y)
                if self.clear_grads is not None:
                    self.clear_grads(self.optim)
                else:
                    self.optim.zero_grad(set_to_none=True)
                loss.backward()
                self.optim.step()


def _partner(widths: tuple[int, ...]) -> _PlainLoop:
    """A plain loop to run beside a contender (see :class:`_PlainLoop`), untimed by its clock."""
    import torch

    with torch.random.fork_rng(devices=[]):  # leaves the contender's random numbers alone
        return _PlainLoop(widths, _NO_CLOCK)


class _NoClock:
    def tick(self) -> None:
        pass


_NO_CLOCK = _NoClock()


def _model(widths: tuple[int, ...], clock: "_Clock | _NoClock") -> Any:
    """The MLP, behind a module that ticks the clock at each training forward pass."""
    import torch
    from torch import nn

    class Tick(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                clock.tick()
            return x

    torch.manual_seed(SEED)
    layers: list[nn.Module] = [Tick()]
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _data() -> Any:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    digits = load_digits()
    images = torch.from_numpy((digits.data / 16.0).astype(np.float32))
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return TensorDataset(images, labels)


def _loader(dataset: Any) -> Any:
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_plain(
    widths: tuple[int, ...],
    steps: int,
    clock: _Clock,
    workdir: Path,
    fused: bool | None = None,
    tuned: bool = False,
) -> None:
    del workdir
    _PlainLoop(widths, clock, fused, tuned).train(steps)


def run_plain_tuned(widths: tuple[int, ...], steps: int, clock: _Clock, workdir: Path) -> None:
    """The plain loop with what ``ml``'s trainers do by default: fused Adam, malloc's thresholds set,
    the gradients unset directly."""
    from ml.utils.malloc import tune_malloc

    tune_malloc()
    run_plain(widths, steps, clock, workdir, fused=True, tuned=True)


_ML_MODEL: dict[str, Any] = {}  # the widths and clock the next ``overhead_mlp`` is built with


def _ml_components(widths: tuple[int, ...], clock: _Clock) -> None:
    """Registers the model (``overhead_mlp``) and the task (``overhead_digits``) with ``ml`` (once)."""
    from dataclasses import dataclass

    import torch.nn.functional as F

    from ml.core.registry import register_model, register_task, registered_names

    _ML_MODEL.update(widths=widths, clock=clock)
    if "overhead_mlp" in registered_names("model"):
        return
    from ml.models.base import BaseModel, BaseModelConfig
    from ml.tasks.sl import SupervisedLearningTask, SupervisedLearningTaskConfig

    @dataclass
    class MLPConfig(BaseModelConfig):
        pass

    @register_model("overhead_mlp")
    class MLP(BaseModel[MLPConfig]):
        """The plain loop's layers as the model's own, run in order as ``nn.Sequential`` runs them.

        As a user writes an ``ml`` model: the model is the module. A ``BaseModel`` holding the
        ``nn.Sequential`` would cost a module call per step that the plain loop and Lightning's
        ``training_step`` (which call the ``nn.Sequential`` itself) do not pay.
        """

        def __init__(self, config: MLPConfig) -> None:
            super().__init__(config)
            for name, layer in _model(_ML_MODEL["widths"], _ML_MODEL["clock"]).named_children():
                self.add_module(name, layer)

        def forward(self, x: Any) -> Any:
            for layer in self._modules.values():
                x = layer(x)
            return x

    @dataclass
    class DigitsConfig(SupervisedLearningTaskConfig):
        pass

    @register_task("overhead_digits")
    class Digits(SupervisedLearningTask[DigitsConfig]):
        def get_dataset(self, phase: Any) -> Any:
            if phase != "train":
                raise NotImplementedError(f"no {phase} data")
            return _data()

        def compute_loss(self, model: Any, batch: Any, state: Any, output: Any) -> Any:
            return F.cross_entropy(output, batch[1])


def _ml_config(steps: int, minimal: bool, same_math: bool = False) -> str:
    lines = [
        "model: {name: overhead_mlp}",
        f"task: {{name: overhead_digits, max_steps: {steps}, seed: {SEED},",
        f"       train_dl: {{batch_size: {BATCH_SIZE}}}}}",
        f"optimizer: {{name: adam, lr: {LR}}}",
        "trainer:",
        "  name: sl",
        "  exp_name: overhead",
    ]
    if same_math:  # the plain loop's Adam (torch's default step) and glibc's default malloc
        lines += ["  fast_optimizer: false", "  tune_malloc: false"]
    if minimal:
        lines += [
            "  valid_at_end: false",
            "  test_at_end: false",
            "  checkpoint: {save_every_n_seconds: null}",
            "logger: []",
        ]
    else:  # the digits example's loggers, at their default intervals
        lines += ["logger:", "  - {name: stdout}", "  - {name: jsonl}", "  - {name: tensorboard}"]
    return "\n".join(lines) + "\n"


def _run_ml(
    widths: tuple[int, ...], steps: int, clock: _Clock, workdir: Path, minimal: bool, same_math: bool = False
) -> None:
    from ml.cli import main

    _ml_components(widths, clock)
    config = workdir / "config.yaml"
    config.write_text(_ml_config(steps, minimal, same_math))
    code = main(["train", str(config), f"trainer.exp_dir={workdir / 'run'}"])
    if code != 0:
        raise RuntimeError(f"ml train exited with {code}")


def run_ml(widths: tuple[int, ...], steps: int, clock: _Clock, workdir: Path) -> None:
    _run_ml(widths, steps, clock, workdir, minimal=False)


def run_ml_same_math(widths: tuple[int, ...], steps: int, clock: _Clock, workdir: Path) -> None:
    """``ml`` with its defaults but the plain loop's arithmetic: ``trainer.fast_optimizer=false
    trainer.tune_malloc=false``; its ratio to ``plain`` is the framework's own cost per step."""
    _run_ml(widths, steps, clock, workdir, minimal=False, same_math=True)


def run_ml_minimal(widths: tuple[int, ...], steps: int, clock: _Clock, workdir: Path) -> None:
    _run_ml(widths, steps, clock, workdir, minimal=True)


def run_lightning(
    widths: tuple[int, ...], steps: int, clock: _Clock, workdir: Path, stripped: bool = False
) -> None:
    import lightning as L
    import torch
    import torch.nn.functional as F

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model(widths, clock)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=LR)

    off = ("logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary")
    extra: dict[str, Any] = dict.fromkeys(off, False) if stripped else {}
    trainer = L.Trainer(max_steps=steps, devices=1, default_root_dir=str(workdir), **extra)
    trainer.fit(Module(), _loader(_data()))


def run_lightning_stripped(widths: tuple[int, ...], steps: int, clock: _Clock, workdir: Path) -> None:
    run_lightning(widths, steps, clock, workdir, stripped=True)


def run_fabric(widths: tuple[int, ...], steps: int, clock: _Clock, workdir: Path) -> None:
    import torch
    import torch.nn.functional as F
    from lightning.fabric import Fabric

    del workdir
    fabric = Fabric(devices=1)
    model = _model(widths, clock)
    optim = torch.optim.Adam(model.parameters(), lr=LR)
    model, optim = fabric.setup(model, optim)
    loader = fabric.setup_dataloaders(_loader(_data()))
    step = 0
    model.train()
    while step < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optim.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optim.step()
            step += 1
            if step >= steps:
                break


def run_accelerate(widths: tuple[int, ...], steps: int, clock: _Clock, workdir: Path) -> None:
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    del workdir
    accelerator = Accelerator()
    model = _model(widths, clock)
    optim = torch.optim.Adam(model.parameters(), lr=LR)
    model, optim, loader = accelerator.prepare(model, optim, _loader(_data()))
    step = 0
    model.train()
    while step < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optim.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optim.step()
            step += 1
            if step >= steps:
                break


RUNNERS: dict[str, Callable[[tuple[int, ...], int, _Clock, Path], None]] = {
    "plain": run_plain,
    "plain_again": run_plain,
    "plain_tuned": run_plain_tuned,
    "ml": run_ml,
    "ml_minimal": run_ml_minimal,
    "ml_same_math": run_ml_same_math,
    "lightning": run_lightning,
    "lightning_stripped": run_lightning_stripped,
    "fabric": run_fabric,
    "accelerate": run_accelerate,
}


def worker(
    contender: str, model: str, steps: int, warmup: int, launched: float, out: Path, block: int = 0
) -> None:
    """Trains once; writes the timed steps per second and the start-up time to ``out`` as JSON.

    With ``block`` > 0 the plain loop runs alongside, ``block`` steps at a time (see :class:`_PlainLoop`).
    """
    import torch

    torch.set_num_threads(1)
    # Denormal floats (Adam's second moments once the loss nears 0) slow CPU arithmetic by up to 2x,
    # and when a run meets them depends on its data order, which each framework draws its own way:
    # without this a contender's speed says more about its trajectory than about its overhead.
    torch.set_flush_denormal(True)
    widths = MODELS[model]
    clock = _Clock(warmup, steps, _sync, (lambda: _partner(widths)) if block > 0 else None, max(block, 1))
    start = time.perf_counter()  # perf_counter for intervals; wall time only to reach back to the launch
    start_wall = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        RUNNERS[contender](widths, steps, clock, Path(tmp))
    missing = {"timed_start", "timed_end", "first_step_done"} - set(clock.times)
    if missing or clock.calls < steps:
        raise RuntimeError(f"{contender} ran {clock.calls} training forward passes, expected {steps}")
    timed = steps - warmup - 1
    seconds = clock.times["timed_end"] - clock.times["timed_start"] - clock.aside[0]
    cpu_seconds = clock.cpu_times["timed_end"] - clock.cpu_times["timed_start"] - clock.aside[1]
    faults = clock.faults["timed_end"] - clock.faults["timed_start"] - clock.aside[2]
    step_seconds = [b - a for a, b in itertools.pairwise(clock.stamps)]
    result: dict[str, float] = {
        "steps_per_s": timed / seconds,
        "cpu_steps_per_s": timed / cpu_seconds,
        "median_step_per_s": 1 / statistics.median(step_seconds),
        "faults_per_step": faults / timed,
        "timed_steps": timed,
        "startup_s": (start_wall - launched) + (clock.times["first_step_done"] - start),
    }
    if clock.partner_steps:
        partner_sps = clock.partner_steps / clock.partner_usage[0]
        result["partner_steps_per_s"] = partner_sps
        result["partner_cpu_steps_per_s"] = clock.partner_steps / clock.partner_usage[1]
        result["partner_steps"] = clock.partner_steps
        result["partner_faults_per_step"] = clock.partner_usage[2] / clock.partner_steps
        result["interleaved_ratio"] = result["steps_per_s"] / partner_sps
    out.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The driver


def run_once(contender: str, model: str, steps: int, warmup: int, block: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", contender, "--model", model]
        cmd += ["--steps", str(steps), "--warmup", str(warmup), "--block", str(block), "--out", str(out)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("ML_EXP_NAME", None)
        launched = time.time()
        proc = subprocess.run(
            [*cmd, "--launched", repr(launched)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp,
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.splitlines()[-20:])
            raise RuntimeError(f"{contender} ({model}) failed with exit code {proc.returncode}:\n{tail}")
        return json.loads(out.read_text())


def available(contenders: list[str]) -> list[str]:
    import importlib.util

    kept = []
    for name in contenders:
        package = NEEDS.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            print(f"{name}: {package} is not installed, left out", file=sys.stderr)
            continue
        kept.append(name)
    return kept


def _quartiles(values: list[float]) -> str:
    """The middle half of ``values`` as ``low-high`` (the 25th to the 75th percentile)."""
    if len(values) < 2:
        return "-"
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return f"{low:.2f}-{high:.2f}"


def summarize(
    runs: dict[str, dict[str, list[dict[str, float]]]], contenders: list[str]
) -> tuple[list[str], list[list[Any]], dict[str, Any]]:
    from common import median

    columns = [
        "model / contender",
        "steps/s",
        "x plain",
        "middle half",
        "x plain in-process",
        "middle half ",
        "us/step over plain",
        "faults/step",
        "start-up s",
        "runs",
    ]
    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    for model, by_contender in runs.items():
        plain = by_contender.get("plain", [])
        plain_sps = median([r["steps_per_s"] for r in plain])
        summary[model] = {}
        for name in contenders:
            results = by_contender.get(name, [])
            sps = median([r["steps_per_s"] for r in results])
            pairs = list(zip(results, plain, strict=False))  # the runs of one round

            def ratios_of(key: str, pairs: list = pairs) -> list[float]:
                return [r[key] / p[key] for r, p in pairs]

            ratios = ratios_of("steps_per_s")
            interleaved = [r["interleaved_ratio"] for r in results if "interleaved_ratio" in r]
            extra_us = (1 / sps - 1 / plain_sps) * 1e6 if plain else float("nan")
            summary[model][name] = {
                "steps_per_s": sps,
                "ratio_to_plain": median(ratios),
                "ratio_middle_half": _quartiles(ratios),
                "interleaved_ratio": median(interleaved),
                "interleaved_middle_half": _quartiles(interleaved),
                "interleaved_ratios": interleaved,
                "median_step_ratio_to_plain": median(ratios_of("median_step_per_s")),
                "cpu_ratio_to_plain": median(ratios_of("cpu_steps_per_s")),
                "ratios": ratios,
                "us_per_step_over_plain": extra_us,
                "faults_per_step": median([r["faults_per_step"] for r in results]),
                "startup_s": median([r["startup_s"] for r in results]),
                "runs": results,
            }
            row = summary[model][name]
            rows.append(
                [
                    f"{model} / {LABELS[name]}",
                    sps,
                    row["ratio_to_plain"],
                    row["ratio_middle_half"],
                    row["interleaved_ratio"],
                    row["interleaved_middle_half"],
                    extra_us,
                    row["faults_per_step"],
                    row["startup_s"],
                    len(results),
                ]
            )
    return columns, rows, summary


def check_targets(summary: dict[str, Any]) -> dict[str, dict[str, bool]]:
    """The issue's targets these results can judge: met or not, on each ratio (between runs, in-process)."""
    met: dict[str, dict[str, bool]] = {}
    for text, model, name, bar in TARGETS:
        if model not in summary or name not in summary[model]:
            continue
        if isinstance(bar, str) and bar not in summary[model]:
            continue
        met[text] = {}
        for key, label in (("ratio_to_plain", "between runs"), ("interleaved_ratio", "in-process")):
            value = summary[model][name][key]
            floor = summary[model][bar][key] if isinstance(bar, str) else bar
            if value == value and floor == floor:  # not NaN (no partner: no in-process ratio)
                met[text][label] = bool(value >= floor)
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds (each contender once per round)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, one round")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS + EXTRA,
        default=list(CONTENDERS),
        metavar="NAME",
        help=f"which to run, in this order (default: all but {', '.join(EXTRA)}): "
        + ", ".join(CONTENDERS + EXTRA),
    )
    parser.add_argument("--no-save", action="store_true", help="print the table only (no results file)")
    parser.add_argument(
        "--no-partner", action="store_true", help="no plain loop inside each run (no in-process ratio)"
    )
    parser.add_argument("--worker", choices=CONTENDERS + EXTRA, help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--block", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.model, args.steps, args.warmup, args.launched, args.out, args.block)
        return

    from common import table, write_results

    contenders = available(args.contenders)
    repeat = 1 if args.quick else args.repeat
    steps = QUICK_STEPS if args.quick else STEPS
    runs: dict[str, dict[str, list[dict[str, float]]]] = {m: {c: [] for c in contenders} for m in args.models}
    began = time.monotonic()
    for round_ in range(repeat):
        # Each round starts one contender further on, so none is always first (right after the
        # other model's runs).
        shift = round_ % len(contenders)
        for model in args.models:
            for name in contenders[shift:] + contenders[:shift]:
                model_steps, warmup, block = steps[model]
                result = run_once(name, model, model_steps, warmup, 0 if args.no_partner else block)
                runs[model][name].append(result)
                print(
                    f"round {round_ + 1}/{repeat} {model:<4} {name:<11} {result['steps_per_s']:9.1f} steps/s"
                    f"  start-up {result['startup_s']:5.2f}s  ({time.monotonic() - began:.0f}s)",
                    file=sys.stderr,
                    flush=True,
                )
    columns, rows, summary = summarize(runs, contenders)
    print(table(columns, rows))
    targets = check_targets(summary)
    for text, by_measure in targets.items():
        verdicts = ", ".join(f"{label}: {'met' if ok else 'NOT met'}" for label, ok in by_measure.items())
        print(f"{text}: {verdicts}")
    if not args.no_save:
        write_results(
            "overhead_quick" if args.quick else "overhead",
            {
                "steps": {
                    m: {"steps": steps[m][0], "warmup": steps[m][1], "partner_block": steps[m][2]}
                    for m in args.models
                },
                "partner": not args.no_partner,
                "repeat": repeat,
                "batch_size": BATCH_SIZE,
                "models": {m: list(MODELS[m]) for m in args.models},
                "results": summary,
                "targets": targets,
            },
            peers=("lightning", "accelerate", "scikit-learn"),
        )


if __name__ == "__main__":
    main()
