"""Tests for :mod:`ml.loggers.mlflow` against MLflow's own SQLite store, read back with its client.

(The same logger against a real ``mlflow server``, through ``ml train`` stopped and continued, is in
``tests/e2e/test_tracking.py``.)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ml.core.compose import build_component
from ml.core.state import State
from ml.errors import ConfigError
from ml.loggers.base import LogBatch
from ml.loggers.mlflow import MlflowLogger, MlflowLoggerConfig, flatten_config

mlflow_tracking = pytest.importorskip("mlflow.tracking")

CONFIG = OmegaConf.create(
    {
        "model": {"name": "digits_cnn", "channels": 8},
        "optimizer": {"name": "adamw", "lr": 0.001},
        "trainer": {"name": "sl", "exp_name": "digits"},
        "logger": [{"name": "mlflow", "tags": {}}],
    }
)


def _logger(**settings: object) -> MlflowLogger:
    return MlflowLogger(MlflowLoggerConfig(name="mlflow", write_every_n_seconds=None, **settings))  # type: ignore[arg-type]


def _write(logger: MlflowLogger, step: int, phase: str = "train", **scalars: float) -> None:
    state = State()
    state.num_steps = step
    state.set_phase(phase)  # type: ignore[arg-type]
    logger.write(state, LogBatch(scalars={f"{phase}/{k}": v for k, v in scalars.items()}))


def test_the_config_takes_servers_only_and_says_how_to_name_a_local_store() -> None:
    for uri in ("file:///tmp/mlruns", "/tmp/mlruns", "sqlite:///mlflow.db", "mlruns"):
        node = OmegaConf.structured(MlflowLoggerConfig(name="mlflow", tracking_uri=uri))
        with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
            build_component("logger[0]", "logger", node)
    assert _logger(tracking_uri="http://127.0.0.1:5000").config.tracking_uri == "http://127.0.0.1:5000"


def test_a_local_tracking_uri_is_refused_before_the_run_folder_is_made(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("ML_EXP_NAME", "MLFLOW_TRACKING_URI")}
    env["RUN_DIR"] = str(tmp_path / "runs")
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "ml"),
            "train",
            "digits",
            "logger=[{name: mlflow, tracking_uri: /tmp/x}]",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "tracking_uri must be an MLflow server" in result.stderr
    assert not (tmp_path / "runs" / "digits").exists()


def test_flatten_config_names_every_leaf() -> None:
    flat = flatten_config({"a": {"b": 1, "c": [True, {"d": None}]}, "e": {}, "f": []})
    assert flat == {"a.b": "1", "a.c.0": "True", "a.c.1.d": "None", "e": "{}", "f": "[]"}


def test_default_store_in_the_run_folder_params_metrics_images_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_folder = tmp_path / "run_0"
    logger = _logger(tags={"team": "vision"})
    logger.initialize(run_folder / "logs")
    logger.on_resume(State())  # a new run: nothing to continue
    # config.yaml keeps a secret as its reference; the logger is given the config resolved.
    (run_folder / "config.yaml").write_text("task:\n  data_token: ${ml.secret:DATA_TOKEN}\n")
    logger.log_config(OmegaConf.merge(CONFIG, {"task": {"data_token": "s3cr3t-value"}}))
    for step in (1, 2, 3):
        _write(logger, step, loss=1.0 / step)
    state = State()
    state.num_steps = 3
    state.set_phase("valid")
    grid = torch.arange(12, dtype=torch.uint8).view(1, 3, 4)
    logger.write(
        state, LogBatch(scalars={"valid/loss": 0.4}, strings={"task/note": "hi"}, images={"valid/grid": grid})
    )
    run_id = logger.state_dict()["run_id"]
    logger.on_session_end("finished")
    logger.close()

    store = run_folder / "logs" / "mlflow"
    assert logger.tracking_uri == f"sqlite:///{store / 'mlflow.db'}"
    client = mlflow_tracking.MlflowClient(tracking_uri=logger.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "digits"
    assert run.info.run_name == "digits/run_0"
    assert run.data.params["optimizer.lr"] == "0.001"
    assert run.data.params["logger.0.name"] == "mlflow"
    assert run.data.params["task.data_token"] == "${ml.secret:DATA_TOKEN}"
    assert not any("s3cr3t" in value for value in run.data.params.values())
    assert (run.data.tags["team"], run.data.tags["task/note"]) == ("vision", "hi")
    assert run.data.tags["ml.run_dir"] == str(run_folder)
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any(p.startswith("images/valid~grid+step+3+") and p.endswith(".png") for p in images), images
    # Every file the store made is inside the run folder.
    assert run.info.artifact_uri.startswith((store / "artifacts").as_uri())
    assert any((store / "artifacts").rglob("*.png"))


def test_a_continued_run_keeps_one_value_per_step_and_its_status_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first process logged steps 1-5 and was killed (-9) after its checkpoint at step 3: the
    next one continues the same MLflow run from step 3, redoing 4 and 5; no step gets two values."""
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # a shared store named by the environment
    first = _logger()
    first.initialize(tmp_path / "run_0" / "logs")
    first.log_config(CONFIG)
    for step in range(1, 6):
        _write(first, step, loss=float(step))
    saved = first.state_dict()  # what the checkpoint at step 3 holds; then kill -9: no close
    assert not (tmp_path / "run_0" / "logs" / "mlflow").exists()  # the environment's store is used

    client = mlflow_tracking.MlflowClient(tracking_uri=uri)
    second = _logger()
    second.initialize(tmp_path / "run_0" / "logs")
    second.load_state_dict(saved)
    resumed = State()
    resumed.num_steps = 3
    second.on_resume(resumed)
    assert client.get_run(saved["run_id"]).info.status == "RUNNING"
    changed = OmegaConf.merge(CONFIG, {"optimizer": {"lr": 0.5}, "task": {"max_steps": 9}})
    second.log_config(changed)  # MLflow's params cannot change: only the new key is added
    for step in range(4, 8):
        _write(second, step, loss=10.0 * step)
    second.on_session_end("interrupted")
    second.close()
    run = client.get_run(saved["run_id"])
    assert run.info.status == "KILLED"
    assert (run.data.params["optimizer.lr"], run.data.params["task.max_steps"]) == ("0.001", "9")
    history = client.get_metric_history(saved["run_id"], "train/loss")
    assert sorted((m.step, m.value) for m in history) == [
        (1, 1),
        (2, 2),
        (3, 3),
        (4, 4),
        (5, 5),
        (6, 60),
        (7, 70),
    ]

    third = _logger()
    third.initialize(tmp_path / "run_0" / "logs")
    third.load_state_dict(saved)
    resumed.num_steps = 7
    third.on_resume(resumed)
    third.log_config(changed)
    third.on_session_end("failed")
    third.close()
    assert client.get_run(saved["run_id"]).info.status == "FAILED"
    assert len(client.search_runs([run.info.experiment_id])) == 1

    # A checkpoint naming a run this store does not have (another tracking URI then): a new run.
    lost = _logger()
    lost.initialize(tmp_path / "run_0" / "logs")
    lost.load_state_dict({"run_id": "0" * 32})
    lost.on_resume(resumed)
    lost.log_config(CONFIG)
    assert lost.state_dict()["run_id"] not in ("0" * 32, saved["run_id"])
    lost.close()


def test_the_default_experiment_of_the_run_folders_store_keeps_its_artifacts_in_the_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's client makes a new store's built-in "Default" experiment with artifacts at
    ./mlruns (the current directory): experiment_name: Default put images and the model there."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run_folder = tmp_path / "run_0"
    logger = _logger(experiment_name="Default")
    logger.initialize(run_folder / "logs")
    logger.log_config(CONFIG)
    state = State()
    state.num_steps = 1
    state.set_phase("valid")
    logger.write(state, LogBatch(images={"valid/grid": torch.zeros(1, 2, 2, dtype=torch.uint8)}))
    run_id = logger.state_dict()["run_id"]
    logger.close()

    assert list(cwd.iterdir()) == []
    store = run_folder / "logs" / "mlflow"
    client = mlflow_tracking.MlflowClient(tracking_uri=logger.tracking_uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "Default"
    assert run.info.artifact_uri.startswith((store / "artifacts").as_uri())
    assert any((store / "artifacts").rglob("*.png"))


def test_an_experiment_of_the_run_folders_store_with_artifacts_outside_it_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store made without the artifact root (as before): its "Default" points at ./mlruns."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "run_0" / "logs" / "mlflow"
    store.mkdir(parents=True)
    old = mlflow_tracking.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    assert old.get_experiment_by_name("Default").artifact_location == str(tmp_path / "mlruns" / "0")
    logger = _logger(experiment_name="Default")
    logger.initialize(store.parent)
    with pytest.raises(ConfigError, match=r"experiment 'Default' .* outside the run folder: set logger"):
        logger.log_config(CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_0"]
    other = _logger()  # an experiment the logger makes keeps its artifacts in the store
    other.initialize(store.parent)
    other.log_config(CONFIG)
    assert other.state_dict()["run_id"]
    other.close()
