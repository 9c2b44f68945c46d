"""ml.utils.malloc: freed tensor memory stays in the process, so steps stop page-faulting it back in.

Each measuring case runs in a fresh interpreter (malloc's settings last for the process) and counts
the minor page faults of 30 training steps of a 64-1024-1024-10 MLP on one thread, after a short
``sl`` run with ``trainer.tune_malloc`` on or off, or after ``tune_malloc()`` alone. The fallback
cases (no glibc, no ``libc.so.6``, no ``mallopt``, ``mallopt`` refusing) run here, on any platform,
with the C library made missing (``ctypes.CDLL`` raising, ``os.confstr`` gone, ...): nothing is set.
"""

import ctypes
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from ml.lr_schedulers.builtin import ConstantConfig, ConstantLRScheduler
from ml.optimizers.builtin import AdamConfig, AdamOptimizer
from ml.tasks.sl import SupervisedLearningTaskConfig
from ml.trainers.sl import SupervisedLearningTrainer, SupervisedLearningTrainerConfig
from ml.utils import malloc
from tests.tiny import TinyModel, TinyModelConfig, TinyTask

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
    reason="malloc tuning is for Linux with glibc",
)

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, resource, sys
import torch
from torch import nn

how, exp_dir = sys.argv[1], sys.argv[2]
tuned = None
if how == "call":
    from ml.utils.malloc import tune_malloc
    tuned = tune_malloc()
    again = tune_malloc()
    assert again == tuned, (tuned, again)
elif how in ("trainer_on", "trainer_off"):
    from omegaconf import OmegaConf
    from ml.lr_schedulers.builtin import ConstantConfig, ConstantLRScheduler
    from ml.optimizers.builtin import AdamConfig, AdamOptimizer
    from ml.tasks.sl import SupervisedLearningTaskConfig
    from ml.trainers.sl import SupervisedLearningTrainer, SupervisedLearningTrainerConfig
    from tests.tiny import TinyModel, TinyModelConfig, TinyTask

    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {"name": "sl", "exp_dir": exp_dir, "tune_malloc": how == "trainer_on"},
    )
    SupervisedLearningTrainer(config).train(
        TinyModel(TinyModelConfig(name="tiny")),
        TinyTask(SupervisedLearningTaskConfig(name="tiny", max_steps=2)),
        AdamOptimizer(AdamConfig(name="adam")),
        ConstantLRScheduler(ConstantConfig(name="constant")),
    )

torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
optim = torch.optim.Adam(model.parameters())
x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))

def step():
    optim.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    optim.step()

for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": tuned, "faults_per_step": faults / 30}))
"""


def _faults_per_step(how: str, tmp_path: Path) -> float:
    exp_dir = tmp_path / how
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, how, str(exp_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        # The caller's PYTHONPATH kept (where its packages may live); the CPU's page faults are
        # what is counted, so the trainer trains there too, whatever GPU the machine has.
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "ML_DEVICE": "cpu",
        },
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if how == "call":
        assert out["tuned"] is True  # glibc here: the thresholds were accepted
    return float(out["faults_per_step"])


@glibc_only
def test_tune_malloc_stops_the_page_faults_of_each_step(tmp_path: Path) -> None:
    untuned = _faults_per_step("none", tmp_path)
    tuned = _faults_per_step("call", tmp_path)
    # glibc's defaults: the step's 4 MiB gradients and 256 KiB activations come back from the OS each
    # time (~1,400-2,000 faults a step alone here, as few as ~440 during a whole suite, by chance:
    # one run in three of this test alone); tuned, the heap keeps them (0 to ~70: a few steps may
    # still grow the heap).
    assert untuned > 300, untuned
    assert tuned < min(150, untuned / 4), (tuned, untuned)


@glibc_only
def test_the_trainer_tunes_malloc_unless_told_not_to(tmp_path: Path) -> None:
    on = _faults_per_step("trainer_on", tmp_path)
    off = _faults_per_step("trainer_off", tmp_path)
    assert off > 300, (on, off)  # (see test_tune_malloc_stops_the_page_faults_of_each_step)
    assert on < min(150, off / 4), (on, off)


class _Libc:
    """A C library whose ``mallopt`` refuses every setting (as glibc does for a value out of range)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

        def mallopt(param: int, value: int) -> int:  # a function: it takes ctypes' argtypes and restype
            self.calls.append((param, value))
            return 0

        self.mallopt = mallopt


def _raise(error: type[Exception]) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error("made missing by the test")

    return fail


MISSING: dict[str, Any] = {
    "not linux": lambda mp: mp.setattr(sys, "platform", "darwin"),
    "no confstr": lambda mp: mp.delattr(os, "confstr"),
    "confstr fails": lambda mp: mp.setattr(os, "confstr", _raise(ValueError)),
    "not glibc": lambda mp: mp.setattr(os, "confstr", lambda name: None),  # musl: the name is unset
    "no libc.so.6": lambda mp: mp.setattr(ctypes, "CDLL", _raise(OSError)),
    "no mallopt": lambda mp: mp.setattr(ctypes, "CDLL", lambda name: object()),
}


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The module as in a new process (no call made yet); its log captured."""
    monkeypatch.setattr(malloc, "_tuned", None)
    caplog.set_level(logging.DEBUG, logger=malloc.__name__)
    return caplog


@pytest.mark.parametrize("missing", list(MISSING))
def test_without_glibc_s_mallopt_nothing_is_set(
    missing: str, fresh: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    MISSING[missing](monkeypatch)
    assert malloc.tune_malloc() is False
    assert malloc.tune_malloc() is False  # the first call's outcome, not looked for again
    records = [r for r in fresh.records if r.name == malloc.__name__]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.DEBUG, "malloc left as it is: no glibc with mallopt here")
    ]


def test_a_mallopt_that_refuses_is_reported(
    fresh: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    libc = _Libc()
    monkeypatch.setattr(malloc, "_glibc", lambda: libc)
    assert malloc.tune_malloc() is False
    assert libc.calls == [(malloc.M_MMAP_THRESHOLD, malloc.MMAP_THRESHOLD_BYTES)]  # stopped at the first
    assert [r.levelno for r in fresh.records if r.name == malloc.__name__] == [logging.WARNING]


def test_the_trainer_trains_without_libc(
    tmp_path: Path, fresh: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``trainer.tune_malloc`` on where the C library cannot be loaded: training runs, malloc untouched."""
    monkeypatch.setattr(ctypes, "CDLL", _raise(OSError))
    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {"name": "sl", "exp_dir": str(tmp_path), "tune_malloc": True, "valid_at_end": False},
    )
    task = TinyTask(SupervisedLearningTaskConfig(name="tiny", max_steps=2))
    SupervisedLearningTrainer(config).train(  # type: ignore[arg-type]
        TinyModel(TinyModelConfig(name="tiny")),
        task,
        AdamOptimizer(AdamConfig(name="adam")),
        ConstantLRScheduler(ConstantConfig(name="constant")),
    )
    assert malloc._tuned is False
    seen = task.seen
    assert isinstance(seen, torch.Tensor) and seen.item() > 0  # it trained
    assert "malloc left as it is" in fresh.text
