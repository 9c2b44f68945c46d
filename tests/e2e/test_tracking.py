"""End-to-end: ``ml train`` logging to a real MLflow tracking server and to W&B offline, stopped by
SIGTERM and continued, read back with MLflow's client and wandb's own reader.

The MLflow server (``mlflow server`` on 127.0.0.1, a free port, SQLite backend store and a local
artifact folder under the test's tmp folder) is started once for the module and stopped after it.
The run uses the resume tests' task (``tests/e2e/resume_task.py``), which sends itself SIGTERM at a
chosen step; ``ml train <run>/config.yaml`` then continues it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("mlflow")
pytest.importorskip("wandb")

_BIN = Path(sys.executable).parent
ML = [str(_BIN / "ml")] if (_BIN / "ml").is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 120
MAX_STEPS = 10
SIGNAL_STEP = 5  # SIGTERM arrives during step 6's batch: the first session stops at step 6

CONFIG = """\
model: {{name: "resume_task:DropoutBNModel", hidden: 8, dropout: 0.0}}
task:
  name: "resume_task:IndexedTask"
  num_samples: 32
  max_steps: {max_steps}
  train_dl: {{batch_size: 8}}
  valid_dl: {{batch_size: 16}}
  test_dl: {{batch_size: 16}}
  signal_name: SIGTERM
  signal_phase: train
  signal_step: {signal_step}
  signal_marker: {marker}
optimizer: {{name: adamw, lr: 1e-2}}
lr_scheduler: {{name: constant}}
trainer:
  name: sl
  exp_name: tracking
  deterministic: true
  valid_every_n_steps: 4
  checkpoint: {{save_every_n_steps: 1000}}
logger:
  - {{name: jsonl, write_every_n_steps: 1}}
  - {{name: mlflow, tracking_uri: "{uri}", write_every_n_steps: 1, log_model: true, tags: {{team: vision}}}}
  - {{name: wandb, write_every_n_steps: 1}}
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite store, artifacts under tmp); its URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers: a test needs none
    log = (root / "server.log").open("w")
    # A session of its own, so that teardown ends the server and the workers it started, and no more.
    proc = subprocess.Popen(
        [
            str(_BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}):\n{(root / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.2)
        yield uri
    finally:
        # Nothing is read from the server after the tests: SIGKILL ends it and its workers at once.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def _train(args: list[str], run_dir: Path, name: str) -> None:
    env = dict(os.environ)
    for key in ("ML_EXP_NAME", "MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        env.pop(key, None)
    env["RUN_DIR"] = str(run_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    with (run_dir / f"{name}.out").open("w") as out, (run_dir / f"{name}.err").open("w") as err:
        code = subprocess.run(
            [*ML, "train", *args], env=env, stdout=out, stderr=err, timeout=TIMEOUT_S
        ).returncode
    assert code == 0, (run_dir / f"{name}.err").read_text()


def _start_wandb_reader(run_file: Path) -> subprocess.Popen[str]:
    """wandb's own reader (``wandb leet inspect --json``) of a .wandb file, started; see
    :func:`_wandb_records`."""
    return subprocess.Popen(
        [str(_BIN / "wandb"), "leet", "inspect", "--json", str(run_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def _wandb_records(reader: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """The records a reader started by :func:`_start_wandb_reader` printed."""
    try:
        out, err = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.communicate()
    assert reader.returncode == 0, err
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _history(records: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {
        r["history"]["step"]["num"]: r["history"]["item"][key]
        for r in records
        if r["type"] == "history" and key in r["history"]["item"]
    }


def test_mlflow_and_wandb_follow_a_run_stopped_by_sigterm_and_continued(
    mlflow_server: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient
    from safetensors import safe_open

    config = tmp_path / "tracking.yaml"
    config.write_text(
        CONFIG.format(
            max_steps=MAX_STEPS, signal_step=SIGNAL_STEP, marker=tmp_path / "signalled", uri=mlflow_server
        )
    )
    exp_dir = tmp_path / "tracking" / "run_0"
    _train([str(config)], tmp_path, "first")

    # Stopped by SIGTERM with a checkpoint that names both external runs.
    status = json.loads((exp_dir / "status.json").read_text())
    assert (status["state"], status["signal"]) == ("interrupted", "SIGTERM")
    stopped_at = status["step"]
    assert SIGNAL_STEP < stopped_at < MAX_STEPS
    ckpt = torch.load(exp_dir / "checkpoints" / "ckpt.pt", weights_only=True)
    mlflow_id, wandb_id = ckpt["loggers"]["mlflow"]["run_id"], ckpt["loggers"]["wandb"]["run_id"]
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(mlflow_id).info.status == "KILLED"
    assert max(m.step for m in client.get_metric_history(mlflow_id, "train/loss")) == stopped_at

    # The first session's .wandb file is complete: wandb's reader reads it while the run continues.
    (first_file,) = (exp_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    first_reader = _start_wandb_reader(first_file)
    try:
        _train([str(exp_dir / "config.yaml")], tmp_path, "second")
    except BaseException:
        first_reader.kill()
        first_reader.communicate()
        raise
    first = _wandb_records(first_reader)

    # One MLflow run for both sessions: finished, each step once, the values metrics.jsonl holds.
    run = client.get_run(mlflow_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tracking"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    records = [json.loads(line) for line in (exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["metrics"]["train/loss"] for r in records if r["phase"] == "train"}
    assert sorted(train) == list(range(1, MAX_STEPS + 1))
    history = client.get_metric_history(mlflow_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, MAX_STEPS + 1))
    assert {m.step: m.value for m in history} == pytest.approx(train)
    assert sorted(m.step for m in client.get_metric_history(mlflow_id, "valid/loss")) == [4, 8, MAX_STEPS]
    assert run.data.params["optimizer.lr"] == "0.01"
    assert run.data.params["task.max_steps"] == str(MAX_STEPS)
    assert run.data.params["logger.1.name"] == "mlflow"
    assert run.data.tags["team"] == "vision"
    assert run.data.tags["ml.run_dir"] == str(exp_dir)

    # log_model: ml export's files of the final checkpoint, as artifacts (through the server).
    downloaded = Path(client.download_artifacts(mlflow_id, "model", str(tmp_path / "download")))
    assert sorted(p.name for p in downloaded.iterdir()) == ["model.safetensors", "model.yaml"]
    with safe_open(str(downloaded / "model.safetensors"), framework="pt") as weights:
        assert weights.metadata()["ml.step"] == str(MAX_STEPS)
        final = torch.load(exp_dir / "checkpoints" / "ckpt.pt", weights_only=True)["model"]
        assert torch.equal(weights.get_tensor("net.0.weight"), final["net.0.weight"])

    # W&B, offline: a folder per session inside the run folder, one run id; read with wandb's reader.
    run_files = sorted((exp_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2 and run_files[0] == first_file
    assert all(path.name == f"run-{wandb_id}.wandb" for path in run_files)
    second = _wandb_records(_start_wandb_reader(run_files[1]))
    first_loss, second_loss = _history(first, "train/loss"), _history(second, "train/loss")
    assert sorted(first_loss) == list(range(1, stopped_at + 1))
    assert sorted(second_loss) == list(range(stopped_at + 1, MAX_STEPS + 1))
    assert {**first_loss, **second_loss} == pytest.approx(train)
    (run_record,) = [r["run"] for r in second if r["type"] == "run"]
    assert run_record["run_id"] == wandb_id
    assert run_record["config"]["update"]["optimizer"]["lr"] == 0.01
    exits = [
        [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"] for records in (first, second)
    ]
    assert exits == [[1], [0]]  # preempted (marked so), then finished
