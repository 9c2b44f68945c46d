"""End-to-end tests of components by name through the ``ml`` command (subprocesses: the script for
the SGD run and its exact resume, the others forked from one that imported torch,
tests/forked_ml.py).

Covered: a torch optimizer and a torch schedule by import path (``config.yaml``, the rates used, an
exact resume), swapping a section on the command line (``optimizer.name=lion``: rebuilt from the
new component's defaults), the library optimizers and the original's schedules in ``--help``, an
unknown key, initial weights from an ``ml export`` file, and a user package imported from the
current directory by the ``ml`` console script (every run here uses one: ``cwd_models``).

The module's commands start as early as they can (the forked ones take turns): those needing
nothing first, the two that start from the SGD run's checkpoints as soon as it ends; each test
waits for its own.
"""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from ml.models.export import export_weights
from tests.forked_ml import run_ml
from tests.same import assert_same

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.entry"]
TIMEOUT_S = 120

USER_PACKAGE = '''\
"""A model in the folder `ml train` runs in (not installed, not on PYTHONPATH)."""

from dataclasses import dataclass

from torch import nn

from ml.core.config import conf_field
from ml.models.base import BaseModel, BaseModelConfig


@dataclass
class LinearConfig(BaseModelConfig):
    width: int = conf_field(64, help="Input features")


class Linear(BaseModel[LinearConfig]):
    def __init__(self, config: LinearConfig) -> None:
        super().__init__(config)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(config.width, 10))

    def forward(self, x):
        return self.net(x)
'''

# The model is the user package's, imported from the folder `ml` runs in.
TINY = """\
model: {name: "cwd_models:Linear"}
task:
  name: digits
  max_steps: 10
  train_dl: {batch_size: 16}
  valid_dl: {batch_size: 512}
  test_dl: {batch_size: 512}
optimizer: {name: adamw, lr: 1e-3, weight_decay: 0.05}
trainer:
  name: sl
  exp_name: tiny
  deterministic: true
  checkpoint: {save_every_n_steps: 5, only_save_most_recent: false}
logger: [{name: jsonl, write_every_n_steps: 1}]
"""
# A whole section on the command line: replaces adamw's (its weight_decay is no key of SGD's).
TORCH_SGD = 'optimizer={name: "torch.optim:SGD", lr: 0.1, momentum: 0.9}'
STEP_LR = 'lr_scheduler={name: "torch.optim.lr_scheduler:StepLR", step_size: 3, gamma: 0.5}'


def ml(
    *args: str | Path, cwd: Path, run_dir: Path | None = None, fresh: bool = False
) -> subprocess.CompletedProcess[str]:
    """``ml ARGS`` in ``cwd`` to completion, with no ``PYTHONPATH``: forked from a process that
    imported torch (tests/forked_ml.py), or with ``fresh`` the script in a new interpreter (the two
    runs an exact resume compares must not share one's hash seed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUN_DIR", "ML_EXP_NAME", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RUN_DIR=str(run_dir or cwd / "runs"))
    if not fresh:
        return run_ml([str(a) for a in args], env, cwd, TIMEOUT_S)
    return subprocess.run(
        [*ML, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def _bad_input(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit code 2 and one line naming the problem."""
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ml: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the runs start in: the config, and the user package ``cwd_models``."""
    root = tmp_path_factory.mktemp("components")
    (root / "tiny.yaml").write_text(TINY)
    (root / "cwd_models").mkdir()
    (root / "cwd_models" / "__init__.py").write_text(USER_PACKAGE)
    return root


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    """Runs the module's ``ml`` commands side by side, each in a thread waiting on its process (the
    forked ones take turns, tests/forked_ml.py)."""
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


@pytest.fixture(scope="module")
def independent(
    home: Path, pool: ThreadPoolExecutor, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Future]:
    """The commands that need no run of this module, started at once (before the SGD run)."""
    (home / "bad.safetensors").write_bytes(b"not a safetensors file")
    unknown_run_dir = tmp_path_factory.mktemp("unknown_key")
    return {
        "overview": pool.submit(ml, "--help", cwd=home),
        "fields": pool.submit(ml, "train", "tiny.yaml", "optimizer.name=torch.optim:SGD", "--help", cwd=home),
        "unknown_key": pool.submit(
            ml,
            "train",
            "tiny.yaml",
            'optimizer={name: "torch.optim:SGD", momentm: 0.9}',
            cwd=home,
            run_dir=unknown_run_dir,
        ),
        "unknown_key_run_dir": unknown_run_dir,
        "bad_weights": pool.submit(
            ml,
            "train",
            "tiny.yaml",
            "trainer.checkpoint.load_from_ckpt_path=bad.safetensors",
            cwd=home,
            run_dir=tmp_path_factory.mktemp("bad_weights"),  # not the SGD run's folder
        ),
    }


@pytest.fixture(scope="module")
def sgd_run(home: Path, independent: dict[str, Future]) -> Path:
    """10 steps with torch.optim.SGD and StepLR by import path (checkpoints at 5 and 10)."""
    del independent  # started first, to run beside this one
    _ok(ml("train", "tiny.yaml", TORCH_SGD, STEP_LR, cwd=home, fresh=True))
    return home / "runs" / "tiny" / "run_0"


@pytest.fixture(scope="module")
def from_sgd_run(
    sgd_run: Path, home: Path, pool: ThreadPoolExecutor, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path | Future]:
    """The two runs that start from the SGD run's checkpoints, started together as soon as it ends.

    - ``resumed``: the SGD run as it was at step 5 (its folder copied, the later checkpoint gone,
      the link back), continued to step 10.
    - ``initial``: a new run with initial weights from the SGD run's weights at step 10 exported by
      ``ml export``'s code, lion by name instead of adamw (``optimizer.name=lion``) at lr 0, and the
      cosine_decay schedule, for 2 steps.
    """
    resumed_run_dir = tmp_path_factory.mktemp("resumed")
    run = resumed_run_dir / "tiny" / "run_0"
    shutil.copytree(sgd_run, run, symlinks=True)
    (run / "checkpoints" / "ckpt.10.pt").unlink()
    (run / "checkpoints" / "ckpt.pt").unlink()
    (run / "checkpoints" / "ckpt.pt").symlink_to("ckpt.5.pt")

    ckpt = _load(sgd_run / "checkpoints" / "ckpt.10.pt")  # what `ml export` writes, written by its code
    export_weights(ckpt["model"], ckpt["config"], home / "sgd.safetensors", step=10)
    # optimizer.name=lion swaps adamw's section for lion's defaults (lion has a weight_decay too:
    # not carried over); with lr 0 lion changes nothing, so the weights are the export's.
    initial = (
        "train",
        "tiny.yaml",
        "optimizer.name=lion",
        "optimizer.lr=0",
        "lr_scheduler.name=cosine_decay",
        "task.max_steps=2",
        f"trainer.checkpoint.load_from_ckpt_path={home / 'sgd.safetensors'}",
        "trainer.exp_name=initial",
    )
    return {
        "resumed_run": run,
        "resumed": pool.submit(
            ml, "train", run / "config.yaml", cwd=home, run_dir=resumed_run_dir, fresh=True
        ),
        "initial": pool.submit(ml, *initial, cwd=home),
    }


def test_the_ml_command_imports_a_package_of_the_current_directory(sgd_run: Path) -> None:
    # `cwd_models` lives only in the folder the command ran in: not installed, not on PYTHONPATH
    # (ml() removes it). The console script found it there, as `python -m` would.
    config = yaml.safe_load((sgd_run / "config.yaml").read_text())
    assert config["model"] == {"name": "cwd_models:Linear", "width": 64}
    assert (sgd_run / "checkpoints" / "ckpt.10.pt").is_file()


def test_a_torch_optimizer_and_schedule_by_import_path_train_as_configured(sgd_run: Path) -> None:
    config = yaml.safe_load((sgd_run / "config.yaml").read_text())
    # The sections as given, completed with the classes' own defaults; nothing of adamw's is left.
    assert config["optimizer"] == {
        "name": "torch.optim:SGD",
        **{"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False},
        **{"maximize": False, "foreach": None, "differentiable": False, "fused": None},
    }
    assert config["lr_scheduler"] == {"name": "torch.optim.lr_scheduler:StepLR", "step_size": 3, "gamma": 0.5}
    rates = [r["metrics"]["trainer/lr"] for r in _records(sgd_run) if r["phase"] == "train"]
    assert rates == [0.1] * 3 + [0.05] * 3 + [0.025] * 3 + [0.0125]  # StepLR's, from the first update
    ckpt = _load(sgd_run / "checkpoints" / "ckpt.10.pt")
    assert ckpt["optim"]["param_groups"][0]["momentum"] == 0.9
    assert ckpt["lr"]["torch_scheduler"]["last_epoch"] == 9


def test_a_run_with_imported_components_resumes_exactly(sgd_run: Path, from_sgd_run: dict) -> None:
    # The run as it was at step 5 (its folder copied, the later checkpoint gone), continued.
    run = from_sgd_run["resumed_run"]
    result = _ok(from_sgd_run["resumed"].result())
    assert "Resumed from" in result.stderr and "at step 5" in result.stderr
    resumed, uninterrupted = (
        _load(run / "checkpoints" / "ckpt.10.pt"),
        _load(sgd_run / "checkpoints" / "ckpt.10.pt"),
    )
    for key in ("model", "optim", "lr"):
        assert_same(resumed[key], uninterrupted[key], key)


def test_initial_weights_from_an_export_and_a_swap_by_name(
    home: Path, from_sgd_run: dict, independent: dict[str, Future]
) -> None:
    # The SGD run's weights at step 10, exported by `ml export`'s code; lion at lr 0 for 2 steps.
    exported = safetensors.torch.load_file(home / "sgd.safetensors")
    result = _ok(from_sgd_run["initial"].result())
    run = home / "runs" / "initial" / "run_0"
    assert f"Initial weights loaded from {home / 'sgd.safetensors'}" in result.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["optimizer"] == {
        **{"name": "lion", "lr": 0.0, "weight_decay": 0.0, "default_decay": True, "beta1": 0.9, "beta2": 0.99}
    }
    assert config["lr_scheduler"]["name"] == "cosine_decay" and config["lr_scheduler"]["min_decay"] == 1e-4
    trained = _load(run / "checkpoints" / "ckpt.2.pt")
    assert_same(trained["model"], exported, "model")
    assert trained["optim"]["state"]  # lion did step (its momentum exists), by zero

    # A file that is no safetensors file (bad.safetensors) is refused.
    _bad_input(independent["bad_weights"].result(), "bad.safetensors is not a safetensors file")


def test_help_lists_the_components_and_an_imported_classs_arguments(independent: dict[str, Future]) -> None:
    overview = _ok(independent["overview"].result()).stdout
    assert "adam, adamw, adan, gan, lamb, lion, prodigy, sgd, shampoo" in overview
    assert "constant, cosine, cosine_decay, gan, linear, linear_no_decay" in overview
    fields = _ok(independent["fields"].result()).stdout
    assert "optimizer: torch.optim:SGD  (SGDConfig)" in fields
    assert "optimizer.momentum: float = 0.0\n      `momentum` of torch.optim.sgd.SGD" in fields


def test_an_unknown_key_of_an_imported_class_names_its_keys(independent: dict[str, Future]) -> None:
    _bad_input(
        independent["unknown_key"].result(),
        "optimizer.momentm: Key 'momentm' not in 'SGDConfig'. Did you mean: 'momentum'? "
        "(torch.optim:SGD takes: name, lr, momentum,",
    )
    assert list(independent["unknown_key_run_dir"].iterdir()) == []  # refused before anything was made
