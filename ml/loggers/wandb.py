"""Defines :class:`WandbLogger`, which records a run with Weights & Biases (the ``wandb`` package).

Its files go inside the run folder: ``<logs>/wandb/`` (wandb's own ``offline-run-<time>-<id>/`` or
``run-<time>-<id>/`` folders, one per session). The mode is ``mode`` from the config, else the
environment's ``WANDB_MODE``, else ``online`` when ``WANDB_API_KEY`` is set and ``offline`` when it
is not (no run is lost to a missing login; ``wandb sync <logs>/wandb`` uploads offline runs later).

What it records: the resolved config (W&B's run config, nested as in the YAML; a secret as its
``${ml.secret:NAME}`` reference, never its value), every scalar at
``state.num_steps``, strings, histograms (``wandb.Histogram``) and images (``wandb.Image``). How
the session ended: ``finished`` ends the W&B run with exit code 0; ``interrupted`` (a stop signal,
the run to be continued) marks it preempting (``run.mark_preempting()``) and ends it with exit code
1, W&B's sign of a preempted, resumable run; ``failed`` ends it with exit code 1.

A continued run continues the same W&B run: the id is kept in every checkpoint
(:meth:`WandbLogger.state_dict`) and passed to ``wandb.init(id=..., resume="allow")``. Offline,
each session writes a folder of its own with that id; ``wandb sync`` puts them together in one run.
A run stopped by a signal logged nothing past its checkpoint, so no step is in two sessions; after a
``kill -9`` the steps redone past the checkpoint are in both (with the same values, resume being exact),
and so is an evaluation of the checkpoint's step logged after it was saved (a final validation or
test): W&B cannot take logged values back (its run rewind, ``resume_from``, is an online-only
preview that cuts whole steps, the training values of the step with them).

wandb's other files stay in the run folder too: its cache (``wandb-core``'s ``core-debug-*.log`` and
``symon-debug-*.log``, the artifact cache), its data folder (artifacts being staged) and downloaded
artifacts go under ``<logs>/wandb/`` (``cache/``, ``data/``, ``artifacts/``), not ``~/.cache``,
``~/.local/share`` or ``./artifacts`` (:data:`RUN_FOLDER_DIRS`).

``wandb`` is an optional dependency, imported when the logger is initialized. Its console capture
is off (``ml`` prints its own lines), and so is its own output (``silent``): the logger says where
the run is in one line.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ml.core.config import conf_field
from ml.core.registry import register_logger
from ml.core.state import State
from ml.loggers.base import BaseLogger, BaseLoggerConfig, LogBatch, config_to_log

logger = logging.getLogger(__name__)

WANDB_DIR_NAME = "wandb"  # what wandb names the folder it makes in the `dir` it is given
MODES = ("online", "offline", "disabled")
# What wandb refuses in a project name (wandb.Settings.validate_project), checked for the entity too:
# both are parts of the run's path, <entity>/<project>/<run id>. Tags: wandb's validate_run_tags.
NAME_FORBIDDEN_CHARS = "/\\#?%:"
NAME_MAX_CHARS = 128
TAG_MAX_CHARS = 64

# Where wandb would write outside the run folder, and where it writes instead (under <logs>/wandb).
# wandb.Settings has no field for these: wandb and its service process (wandb-core, started at the
# first wandb.init of a process, with the environment of then) read them from the environment. So
# they are set in os.environ while the W&B run is open, each only if the user has not set it (a
# WANDB_CACHE_DIR of theirs wins), and put back at close(), which also ends the service so that
# the next run of this process starts one with its own folders. WANDB_CONFIG_DIR is left alone:
# wandb only reads it during a run, and it holds the user's settings (a self-hosted server's
# base_url, a default entity) that an online run must keep.
RUN_FOLDER_DIRS = {"WANDB_CACHE_DIR": "cache", "WANDB_DATA_DIR": "data", "WANDB_ARTIFACT_DIR": "artifacts"}


@dataclass
class WandbLoggerConfig(BaseLoggerConfig):
    """Config of :class:`WandbLogger`."""

    mode: str | None = conf_field(
        None,
        help="online, offline or disabled; default: $WANDB_MODE, else online with WANDB_API_KEY set, "
        "else offline",
    )
    project: str | None = conf_field(None, help="W&B project (default: trainer.exp_name)")
    entity: str | None = conf_field(None, help="W&B entity: user or team (default: wandb's)")
    run_name: str | None = conf_field(None, help="W&B run name (default: <exp_name>/<run folder>)")
    tags: list[str] = conf_field([], help="Tags of the W&B run")


def wandb_mode(configured: str | None) -> str:
    """The mode to run in: the config's, else ``$WANDB_MODE``, else by whether an API key is set."""
    mode = (
        configured
        or os.environ.get("WANDB_MODE")
        or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    )
    if mode not in MODES:
        source = "mode" if configured else "WANDB_MODE"
        raise ValueError(f"{source} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def check_names(config: WandbLoggerConfig) -> None:
    """Refuses a project, entity or tag that wandb would refuse at ``wandb.init`` (in the run).

    Raises:
        ValueError: Built into a :class:`ml.errors.ConfigError` naming the section.
    """
    for field in ("project", "entity"):
        value = getattr(config, field)
        if value is None:
            continue
        found = sorted({char for char in str(value) if char in NAME_FORBIDDEN_CHARS})
        if found:
            raise ValueError(
                f"{field} {value!r} contains {' '.join(found)}: W&B names cannot contain any of "
                f"{' '.join(NAME_FORBIDDEN_CHARS)}; use - or _ instead"
            )
        if len(str(value)) > NAME_MAX_CHARS:
            raise ValueError(
                f"{field} is {len(str(value))} characters long: W&B takes at most {NAME_MAX_CHARS}; "
                "give a shorter one"
            )
    for index, tag in enumerate(config.tags):
        if not str(tag):
            raise ValueError(f"tags[{index}] is empty: W&B refuses empty tags; remove it")
        if len(str(tag)) > TAG_MAX_CHARS:
            raise ValueError(
                f"tags[{index}] is {len(str(tag))} characters long: W&B takes at most {TAG_MAX_CHARS}; "
                "give a shorter one"
            )


def default_project(name: str) -> str:
    """The project named after the experiment when the config names none: ``exp_name`` may hold
    characters W&B refuses (``a:b`` is a fine folder name), so those become ``-``."""
    for char in NAME_FORBIDDEN_CHARS:
        name = name.replace(char, "-")
    return name[:NAME_MAX_CHARS]


def _import_wandb() -> ModuleType:
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            "The 'wandb' logger needs the wandb package: run `pip install wandb` "
            "(or install the extra, `pip install 'ml-trainer[wandb]'`), or remove {name: wandb} from "
            "the logger list"
        ) from e
    return wandb


@register_logger("wandb")
class WandbLogger(BaseLogger[WandbLoggerConfig]):
    """Records the run with Weights & Biases (see the module docstring). Master only.

    Args:
        config: The logger's config.
    """

    def __init__(self, config: WandbLoggerConfig) -> None:
        super().__init__(config)
        if config.mode is not None:
            wandb_mode(config.mode)  # a bad mode is refused before the run folder exists
        check_names(config)  # so are names wandb.init would refuse
        self._wandb: ModuleType | None = None
        self.run: Any = None  # the wandb Run of this session, once started
        self.run_id: str | None = None  # from the checkpoint, or once the run is started
        self._outcome = "finished"
        self._set_env: list[str] = []  # the WANDB_* variables this logger set (RUN_FOLDER_DIRS)

    def initialize(self, log_directory: Path) -> None:
        super().initialize(log_directory)
        self._wandb = _import_wandb()

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id is not None else {}

    def load_state_dict(self, state: Any) -> None:
        run_id = state.get("run_id")
        if isinstance(run_id, str) and run_id:
            self.run_id = run_id

    def _start_run(self, config: DictConfig | None) -> Any:
        if self.run is not None:
            return self.run
        if self._wandb is None or self.log_directory is None:
            raise RuntimeError("WandbLogger used before initialize(log_directory)")
        wandb = self._wandb
        run_folder = self.log_directory.parent  # the log folder is a child of the run's (RunDir.logs)
        exp_name = None if config is None else OmegaConf.select(config, "trainer.exp_name")
        project = self.config.project or default_project(str(exp_name or run_folder.parent.name))
        mode = wandb_mode(self.config.mode)
        # wandb makes <dir>/wandb/ itself; the folder it is given must exist.
        self.log_directory.mkdir(parents=True, exist_ok=True)
        for name, folder in RUN_FOLDER_DIRS.items():
            if name not in os.environ:
                os.environ[name] = str(self.log_directory / WANDB_DIR_NAME / folder)
                self._set_env.append(name)
        self.run = wandb.init(
            dir=str(self.log_directory),
            mode=mode,
            project=str(project),
            entity=self.config.entity,
            name=self.config.run_name or f"{project}/{run_folder.name}",
            id=self.run_id,
            resume="allow",
            tags=list(self.config.tags) or None,
            config=None if config is None else config_to_log(config, self.log_directory),
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run_id = self.run.id
        logger.info("W&B run %s (%s) in %s", self.run_id, mode, self.run.dir)
        return self.run

    def log_config(self, config: DictConfig) -> None:
        """Starts the W&B run with the resolved config (a continued run's config is updated)."""
        if self.run is None:
            self._start_run(config)
        else:
            self.run.config.update(config_to_log(config, self.log_directory), allow_val_change=True)

    def write(self, state: State, batch: LogBatch) -> None:
        run = self._start_run(None)
        wandb = self._wandb
        assert wandb is not None
        data: dict[str, Any] = dict(batch.scalars)
        data.update(batch.strings)
        for name, values in batch.histograms.items():
            finite = values[values.isfinite()]
            if finite.numel() > 0:  # as TensorBoard's: no bins for nothing or NaN
                data[name] = wandb.Histogram(finite.numpy())
        for name, image in batch.images.items():
            data[name] = wandb.Image(image.permute(1, 2, 0).numpy())  # (C, H, W) -> (H, W, C)
        if data:
            run.log(data, step=state.num_steps)

    def on_session_end(self, outcome: str) -> None:
        self._outcome = outcome

    def close(self) -> None:
        """Ends the W&B run (its files are complete then), with the session's outcome."""
        run, self.run = self.run, None
        if run is None:
            return
        try:
            if self._outcome == "interrupted":
                run.mark_preempting()
            run.finish(exit_code=0 if self._outcome == "finished" else 1)
            wandb = self._wandb
            if wandb is not None and getattr(wandb, "run", None) is None:  # no other W&B run uses it
                wandb.teardown()  # wandb-core ends; the next run's starts with the next run's folders
        finally:
            for name in self._set_env:
                os.environ.pop(name, None)
            self._set_env.clear()
