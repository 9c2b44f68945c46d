"""Defines :class:`MlflowLogger`, which records a run in MLflow: params, metrics, tags, images, status.

Where it logs: ``tracking_uri`` (an MLflow server, ``http://host:5000``), else the environment's
``MLFLOW_TRACKING_URI``, else a SQLite store inside the run folder (``<logs>/mlflow/mlflow.db``,
artifacts in ``<logs>/mlflow/artifacts``; ``mlflow ui --backend-store-uri sqlite:///...`` shows it).
A local store named in the config would be a path outside the run folder, so the config takes
server addresses only; a shared local store is named by ``MLFLOW_TRACKING_URI``.

What it records:

- params: the resolved config, flattened (``optimizer.lr``, ``logger.0.name``), once; a secret
  (``${ml.secret:NAME}``) as its reference, never its value;
- metrics: every scalar at ``state.num_steps``; strings as tags (their latest value); images as
  artifacts under ``images/`` (MLflow's ``log_image`` with a key and a step); histograms are not
  recorded (MLflow has no such type);
- tags: ``tags`` from the config, plus ``ml.run_dir`` (the run folder);
- the status: ``FINISHED`` when the run completed, ``KILLED`` when a stop signal (SIGTERM,
  SIGUSR1, Ctrl-C: a preemption) stopped it with a checkpoint - it goes back to ``RUNNING`` when
  the run is continued - and ``FAILED`` for an error;
- with ``log_model``, once the run finished: ``ml export``'s files of the newest checkpoint
  (``model/model.safetensors`` and ``model/model.yaml``) as artifacts.

A continued run continues the same MLflow run: its id is kept in every checkpoint
(:meth:`MlflowLogger.state_dict`). A run continued from its checkpoint at step S redoes the steps
an earlier process may have logged past S (after a ``kill -9``), and the evaluations of S logged
after that checkpoint was saved (a final validation or test the kill cut off from the checkpoint
saying it was done); MLflow cannot delete metric values, so values at steps the MLflow run already
holds for that metric are not sent again: each metric has one value per step (the first
process's, which an exact resume reproduces). A run stopped by a signal saved its checkpoint at its
last step, so nothing is skipped then.

MLflow is an optional dependency, imported when the logger is initialized.
"""

import contextlib
import io
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from omegaconf import DictConfig, OmegaConf

from ml.core.config import conf_field
from ml.core.registry import register_logger
from ml.core.state import State
from ml.errors import ConfigError
from ml.loggers.base import BaseLogger, BaseLoggerConfig, LogBatch, config_to_log

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

MLFLOW_DIR_NAME = "mlflow"  # the local store's folder in the log folder
ARTIFACTS_DIR_NAME = "artifacts"  # the local store's artifacts, in its folder
SERVER_SCHEMES = ("http", "https", "databricks")
STATUS_OF_OUTCOME = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
MAX_PARAMS_PER_BATCH = 100  # MLflow's limits of one log_batch call
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000


@dataclass
class MlflowLoggerConfig(BaseLoggerConfig):
    """Config of :class:`MlflowLogger`."""

    tracking_uri: str | None = conf_field(
        None,
        help="MLflow server (http://host:5000); default: $MLFLOW_TRACKING_URI, else a SQLite store "
        "in <logs>/mlflow",
    )
    experiment_name: str | None = conf_field(None, help="MLflow experiment (default: trainer.exp_name)")
    run_name: str | None = conf_field(None, help="MLflow run name (default: <exp_name>/<run folder>)")
    tags: dict[str, str] = conf_field({}, help="Tags set on the MLflow run")
    log_model: bool = conf_field(
        False, help="Once the run finished, upload `ml export`'s safetensors and YAML as artifacts"
    )


def check_tracking_uri(uri: str | None) -> None:
    """Refuses a configured tracking URI that is not a server: a local store outside the run folder.

    Raises:
        ValueError: Built into a :class:`ml.errors.ConfigError` naming the section.
    """
    if uri is None:
        return
    if urlparse(str(uri)).scheme not in SERVER_SCHEMES:
        raise ValueError(
            f"tracking_uri must be an MLflow server (http://host:port), got {uri!r}: leave it unset for a "
            "store inside the run folder, or set MLFLOW_TRACKING_URI for a shared local one"
        )


def flatten_config(config: Any, prefix: str = "") -> dict[str, str]:
    """``{"optimizer.lr": "0.001", "logger.0.name": "stdout", ...}``: every leaf of a resolved config."""
    if isinstance(config, dict):
        items: list[tuple[Any, Any]] = list(config.items())
    elif isinstance(config, list):
        items = list(enumerate(config))
    else:
        return {prefix: str(config)}
    flat: dict[str, str] = {}
    for key, value in items:
        flat.update(flatten_config(value, f"{prefix}.{key}" if prefix else str(key)))
    if not items and prefix:  # an empty section still says it is empty
        flat[prefix] = "{}" if isinstance(config, dict) else "[]"
    return flat


def _mlflow_client_class() -> type["MlflowClient"]:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise ImportError(
            "The 'mlflow' logger needs the mlflow package: run `pip install mlflow` "
            "(or install the extra, `pip install 'ml-trainer[mlflow]'`), or remove {name: mlflow} from "
            "the logger list"
        ) from e
    return MlflowClient


def _create_local_store(uri: str, artifacts: Path) -> None:
    """Creates the run folder's SQLite store (if new) with its default artifact root inside it.

    MLflow's client opens a store with the default artifact root ``./mlruns``, which puts the
    artifacts of the store's built-in "Default" experiment (made with the store) in the current
    directory. Made here first, the store's "Default" keeps them in ``artifacts/0``.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(uri, artifacts.as_uri())
    store.engine.dispose()  # the client opens its own connection


def _check_inside_local_store(experiment: Any, local_store: Path) -> None:
    """Refuses an experiment of the run folder's store whose artifacts would go outside it (a store
    made by an older version, whose "Default" experiment points at ``./mlruns``).

    Raises:
        ConfigError: Naming the experiment and the fix.
    """
    location = urlparse(str(experiment.artifact_location))
    path = Path(unquote(location.path)) if location.scheme in ("", "file") else None
    if path is None or not path.resolve().is_relative_to(local_store.resolve()):
        raise ConfigError(
            f"MLflow experiment {experiment.name!r} of the store in {local_store} keeps its artifacts at "
            f"{experiment.artifact_location}, outside the run folder: set logger experiment_name to "
            "another name"
        )


@register_logger("mlflow")
class MlflowLogger(BaseLogger[MlflowLoggerConfig]):
    """Records the run in MLflow (see the module docstring). Master only, like every logger.

    Args:
        config: The logger's config.
    """

    def __init__(self, config: MlflowLoggerConfig) -> None:
        super().__init__(config)
        check_tracking_uri(config.tracking_uri)  # bad input is refused before the run folder exists
        self.client: MlflowClient | None = None
        self.tracking_uri: str | None = None
        self.run_id: str | None = None  # from the checkpoint, or once the run is created
        self._resumed = False
        self._logged_steps: dict[str, int] = {}  # metric -> the last step the MLflow run already has
        self._outcome = "finished"
        self._local_store: Path | None = None

    def initialize(self, log_directory: Path) -> None:
        super().initialize(log_directory)
        client_class = _mlflow_client_class()
        uri = self.config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            self._local_store = Path(log_directory) / MLFLOW_DIR_NAME
            self._local_store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{self._local_store / 'mlflow.db'}"
            _create_local_store(uri, self._local_store / ARTIFACTS_DIR_NAME)
        self.tracking_uri = uri
        self.client = client_class(tracking_uri=uri)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id is not None else {}

    def load_state_dict(self, state: Any) -> None:
        run_id = state.get("run_id")
        if isinstance(run_id, str) and run_id:
            self.run_id = run_id

    def on_resume(self, state: State) -> None:
        """Reopens the checkpoint's MLflow run (``RUNNING`` again) and reads which steps it holds."""
        if self.run_id is None or self.client is None:
            return
        from mlflow.exceptions import MlflowException

        client = self.client
        try:
            run = client.get_run(self.run_id)
        except MlflowException as e:  # another tracking URI than the earlier session's, or deleted
            logger.warning(
                "MLflow run %s not found at %s (%s): starting a new one", self.run_id, self.tracking_uri, e
            )
            self.run_id = None
            return
        client.update_run(self.run_id, status="RUNNING")
        self._resumed = True
        # The last step of each metric; values up to it are not sent again (see the module docstring).
        for key in run.data.metrics:
            history = client.get_metric_history(self.run_id, key)
            if history:
                self._logged_steps[key] = max(metric.step for metric in history)
        logger.info(
            "Continuing MLflow run %s at %s (step %d)", self.run_id, self.tracking_uri, state.num_steps
        )

    def _start_run(self, config: DictConfig | None) -> str:
        """The MLflow run to log to: the one continued, else a new one in the experiment."""
        if self.run_id is not None:
            return self.run_id
        if self.client is None or self.log_directory is None:
            raise RuntimeError("MlflowLogger used before initialize(log_directory)")
        run_folder = self.log_directory.parent  # the log folder is a child of the run's (RunDir.logs)
        exp_name = None if config is None else OmegaConf.select(config, "trainer.exp_name")
        experiment_name = self.config.experiment_name or exp_name or run_folder.parent.name
        experiment = self.client.get_experiment_by_name(str(experiment_name))
        if experiment is not None:
            experiment_id = experiment.experiment_id
            if self._local_store is not None:
                _check_inside_local_store(experiment, self._local_store)
        elif self._local_store is not None:  # its artifacts stay in the run folder too
            artifacts = (self._local_store / ARTIFACTS_DIR_NAME).as_uri()
            experiment_id = self.client.create_experiment(str(experiment_name), artifact_location=artifacts)
        else:
            experiment_id = self.client.create_experiment(str(experiment_name))
        tags = {**dict(self.config.tags), "ml.run_dir": str(run_folder)}
        run_name = self.config.run_name or f"{experiment_name}/{run_folder.name}"
        run = self.client.create_run(experiment_id, tags=tags, run_name=run_name)
        self.run_id = run.info.run_id
        logger.info("MLflow run %s at %s", self.run_id, self.tracking_uri)
        return self.run_id

    def log_config(self, config: DictConfig) -> None:
        """Logs the resolved config as params (a continued run adds only the keys it lacks:
        MLflow's params cannot change, and what changed is in ``config_changes.log``)."""
        from mlflow.entities import Param

        run_id = self._start_run(config)
        assert self.client is not None
        flat = flatten_config(config_to_log(config, self.log_directory))  # secrets as their references
        if self._resumed:
            have = self.client.get_run(run_id).data.params
            flat = {key: value for key, value in flat.items() if key not in have}
        params = [Param(key, value[:MAX_PARAM_LENGTH]) for key, value in flat.items()]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[start : start + MAX_PARAMS_PER_BATCH])

    def write(self, state: State, batch: LogBatch) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self._start_run(None)
        assert self.client is not None
        step = state.num_steps
        now_ms = int(time.time() * 1000)
        metrics = [
            Metric(name, value, now_ms, step)
            for name, value in batch.scalars.items()
            if step > self._logged_steps.get(name, -1)
        ]
        tags = [RunTag(name, text[:MAX_PARAM_LENGTH]) for name, text in batch.strings.items()]
        for start in range(0, max(len(metrics), 1), MAX_METRICS_PER_BATCH):
            chunk = metrics[start : start + MAX_METRICS_PER_BATCH]
            if chunk or (tags and start == 0):
                self.client.log_batch(run_id, metrics=chunk, tags=tags if start == 0 else [])
        for name, image in batch.images.items():
            # (C, H, W) uint8 -> (H, W, C), as MLflow takes arrays; grey images as (H, W).
            array = image.permute(1, 2, 0).numpy()
            self.client.log_image(
                run_id, array[:, :, 0] if array.shape[2] == 1 else array, key=name, step=step
            )

    def on_session_end(self, outcome: str) -> None:
        self._outcome = outcome

    def _log_model(self, run_id: str) -> None:
        """Uploads what ``ml export`` writes for the newest checkpoint, under ``model/``."""
        from ml.tools.export import main as export

        assert self.client is not None and self.log_directory is not None
        with tempfile.TemporaryDirectory(prefix="ml-mlflow-") as folder:
            weights = Path(folder) / "model.safetensors"
            with contextlib.redirect_stdout(io.StringIO()) as said:
                export([str(self.log_directory.parent), "-o", str(weights)])
            logger.info("%s", said.getvalue().strip())
            self.client.log_artifacts(run_id, folder, artifact_path="model")

    def close(self) -> None:
        """Uploads the model if asked and the run finished, then ends the MLflow run with its status."""
        if self.client is None or self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None  # closed once, whatever fails below
        try:
            if self.config.log_model and self._outcome == "finished":
                self._log_model(run_id)
        except Exception as e:  # the training is done and saved: `ml export` can still be run by hand
            logger.warning("Could not upload the model to MLflow run %s: %s: %s", run_id, type(e).__name__, e)
        finally:
            status = STATUS_OF_OUTCOME.get(self._outcome, "FAILED")
            self.client.set_terminated(run_id, status=status)
            logger.info("MLflow run %s ended: %s", run_id, status)
