"""``trainer.device`` and ``$ML_DEVICE`` (ml.utils.device): parsing, precedence, the local rank's GPU,
bad input in one line before any run folder exists, and optimizer state placed where its
parameters are whatever device a checkpoint was read onto (ml.trainers.base)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ml.errors import ConfigError
from ml.trainers.base import _steps_on_cpu
from ml.trainers.sl import SupervisedLearningTrainer, SupervisedLearningTrainerConfig
from ml.utils import device as device_module
from ml.utils.device import parse_device, resolve_device

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No device override and no distributed job, unless a test sets them."""
    for name in (
        "ML_DEVICE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "RANK",
        "WORLD_SIZE",
        "SLURM_PROCID",
        "SLURM_LOCALID",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with two CUDA GPUs, as far as the device choice can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: False)


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("auto", "auto"),
        ("cpu", "cpu"),
        (" CUDA ", "cuda"),
        ("cuda:3", "cuda:3"),
        ("mps", "mps"),
        (None, "auto"),
    ],
)
def test_a_device_spec_is_parsed(spec: object, parsed: str) -> None:
    assert parse_device(spec) == parsed


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cpu:0", "cuda:1:2", "xpu", "", "0"])
def test_what_is_no_device_is_one_line_of_bad_input(spec: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_device(spec)
    assert str(error.value) == f"trainer.device must be one of auto, cpu, cuda, cuda:N, mps, got {spec!r}"


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch, no_gpu: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(device_module, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")  # asked for: the CPU, GPU or not


def test_cuda_is_the_local_rank_s_gpu(monkeypatch: pytest.MonkeyPatch, two_gpus: None) -> None:
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun's: 3 % 2 GPUs
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # named: that one
    monkeypatch.delenv("LOCAL_RANK")
    # Inside an srun step, before its variables are exported as torchrun's (ml.utils.ranks).
    for name, value in {
        "SLURM_PROCID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "1",
    }.items():
        monkeypatch.setenv(name, value)
    assert resolve_device("cuda") == torch.device("cuda", 1)


def test_one_named_gpu_for_several_processes_of_a_machine_is_refused(
    monkeypatch: pytest.MonkeyPatch, two_gpus: None
) -> None:
    """Every process took that GPU, and NCCL failed at run time ("Duplicate GPU detected")."""
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(
        ConfigError, match=r"^trainer.device=cuda:1 names one GPU for the 2 processes on this"
    ):
        resolve_device("cuda:1")
    monkeypatch.setenv("ML_DEVICE", "cuda:0")
    with pytest.raises(ConfigError, match=r"^ML_DEVICE=cuda:0 names one GPU .*use ML_DEVICE=cuda "):
        resolve_device("auto")
    monkeypatch.delenv("ML_DEVICE")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per machine: its GPU is its own to name
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU visible to each process
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_ml_device_overrides_the_config(monkeypatch: pytest.MonkeyPatch, two_gpus: None) -> None:
    monkeypatch.setenv("ML_DEVICE", "cpu")
    assert resolve_device("cuda:1") == torch.device("cpu")
    monkeypatch.setenv("ML_DEVICE", "cuda:1")
    assert resolve_device("cpu") == torch.device("cuda", 1)
    monkeypatch.setenv("ML_DEVICE", "")  # empty: not set
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("ML_DEVICE", "tpu")
    with pytest.raises(ConfigError, match=r"^ML_DEVICE must be one of .*got 'tpu'$"):
        resolve_device("cpu")


def test_a_device_the_machine_lacks_is_one_line_of_bad_input(
    monkeypatch: pytest.MonkeyPatch, two_gpus: None
) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_device("cuda:2")
    assert str(error.value) == "trainer.device=cuda:2: only 2 CUDA GPUs visible (cuda:0 to cuda:1)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=rf"^trainer\.device={spec}: .*(without CUDA|no CUDA GPU)"):
            resolve_device(spec)
    monkeypatch.setattr(device_module, "_mps_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^trainer\.device=mps: Apple's MPS is not available here"):
        resolve_device("mps")


def _trainer(tmp_path: Path, **fields: object) -> SupervisedLearningTrainer:
    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {"name": "sl", "exp_dir": str(tmp_path), **fields},
    )
    return SupervisedLearningTrainer(config)  # type: ignore[arg-type]


def test_the_trainer_takes_its_device_from_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, two_gpus: None
) -> None:
    assert SupervisedLearningTrainerConfig().device == "auto"
    assert _trainer(tmp_path, device="cpu").device == torch.device("cpu")
    assert _trainer(tmp_path, device="cuda:1").device == torch.device("cuda", 1)
    monkeypatch.setenv("ML_DEVICE", "cpu")
    assert _trainer(tmp_path, device="cuda:1").device == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"trainer\.device must be one of"):
        _trainer(tmp_path, device="gpu")  # its form is checked when the trainer is made


def test_every_optimizer_step_count_is_handed_over_on_the_cpu() -> None:
    """torch's load_state_dict leaves ``step`` where it finds it (unless fused or capturable, when it
    moves it to the parameter's device): handed over on the CPU, it lands where a fresh optimizer
    keeps it. Here every tensor is on the CPU already; tests/test_cuda.py reads one onto a GPU."""
    model = torch.nn.Linear(2, 2)
    optim = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optim.step()
    state = optim.state_dict()
    moved = _steps_on_cpu(state)
    assert moved is not state and moved["state"] is not state["state"]  # the checkpoint's dict kept
    assert moved["param_groups"] is state["param_groups"]
    for key, value in moved["state"].items():
        assert value["step"].device.type == "cpu" and torch.equal(value["step"], state["state"][key]["step"])
        assert value["exp_avg"] is state["state"][key]["exp_avg"]  # the moments: torch places them
    named = _steps_on_cpu({"g": state, "d": state})
    assert set(named) == {"g", "d"} and named["g"]["state"].keys() == state["state"].keys()
    assert _steps_on_cpu(None) is None


def _ml(run_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("ML_DEVICE", "ML_EXP_NAME")}
    return subprocess.run(
        [*ML, "train", "digits", *args],
        env={**environ, "RUN_DIR": str(run_dir), "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _missing_cuda() -> str:
    """A CUDA device this machine lacks: any, without CUDA; else one beyond the GPUs it has."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("how", ["config", "environment", "not a device"])
def test_ml_train_refuses_a_device_the_machine_lacks_before_claiming_a_run(tmp_path: Path, how: str) -> None:
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    spec = _missing_cuda()
    if how == "config":
        result, where = _ml(run_dir, f"trainer.device={spec}"), f"trainer.device={spec}: "
    elif how == "environment":
        result, where = _ml(run_dir, "trainer.device=cpu", ML_DEVICE=spec), f"ML_DEVICE={spec}: "
    else:
        result, where = _ml(run_dir, "trainer.device=gpu0"), "trainer.device must be one of"
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"ml: error: {where}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert list(run_dir.iterdir()) == []  # no run folder, not even the experiment's
