"""Defines :class:`TensorboardLogger`, which writes TensorBoard event files.

Events go to ``<log_directory>/tensorboard/<phase>/``, one ``SummaryWriter`` per phase (created on
the phase's first write), so TensorBoard shows ``train``, ``valid`` and ``test`` as separate runs
that can be overlaid. Scalars, strings, histograms and images are all written at
``state.num_steps``; the run's config is written once as YAML text (a secret as its
``${ml.secret:NAME}`` reference). TensorBoard is an optional dependency: it is imported only when
the logger is initialized, so importing this module costs nothing without it.

A run that continues from its checkpoint at step S redoes the steps after S, whose events the
earlier process may already have written, and the evaluations of step S the checkpoint does not
cover (logged after it was saved). The writers of the continued run are therefore created with
``purge_step=S + 1``, or ``S`` for a phase redone at S: their event files start with a marker at
which TensorBoard discards the events of that step and later that come before it, in that phase's
folder only, so every scalar keeps one value per step.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from ml.core.config import conf_field
from ml.core.registry import register_logger
from ml.core.state import State
from ml.loggers.base import BaseLogger, BaseLoggerConfig, LogBatch, config_to_log

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TENSORBOARD_DIR_NAME = "tensorboard"
CONFIG_TAG = "config"


@dataclass
class TensorboardLoggerConfig(BaseLoggerConfig):
    """Config of :class:`TensorboardLogger`.

    Attributes:
        flush_every_n_seconds: How often the writers flush pending events to disk.
    """

    flush_every_n_seconds: int = conf_field(
        30, help="Seconds between flushes of pending events to the event files (0: after every write)"
    )


def _summary_writer_class() -> type["SummaryWriter"]:
    """Imports ``SummaryWriter``, failing with install instructions when TensorBoard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "The 'tensorboard' logger needs the tensorboard package: run `pip install tensorboard` "
            "(or install the extra, `pip install 'ml-trainer[tensorboard]'`), "
            "or remove {name: tensorboard} from the logger list"
        ) from e
    return SummaryWriter


@register_logger("tensorboard")
class TensorboardLogger(BaseLogger[TensorboardLoggerConfig]):
    """Writes scalars, strings, histograms and images to TensorBoard event files, one folder per phase.

    Args:
        config: The logger's config.
    """

    def __init__(self, config: TensorboardLoggerConfig) -> None:
        super().__init__(config)
        self._writer_cls: type[SummaryWriter] | None = None
        self._writers: dict[str, SummaryWriter] = {}
        # Set by on_resume_from, for the writers created after it: the step, and the phases purged
        # from it (others from the next one).
        self._resumed_at: tuple[int, frozenset[str]] | None = None
        self._redone_phases: frozenset[str] = frozenset()  # see on_resume_from

    def initialize(self, log_directory: Path) -> None:
        super().initialize(log_directory)
        # Imported here, not at module level, so a missing TensorBoard fails when the logger is
        # configured, with a message saying what to install.
        self._writer_cls = _summary_writer_class()

    def writer(self, phase: str) -> "SummaryWriter":
        """The phase's writer, created (with its folder) on first use."""
        writer = self._writers.get(phase)
        if writer is None:
            if self.log_directory is None or self._writer_cls is None:
                raise RuntimeError("TensorboardLogger used before initialize(log_directory)")
            log_dir = self.log_directory / TENSORBOARD_DIR_NAME / phase
            # TensorBoard's writer thread would spin with flush_secs=0: every write flushes instead.
            purge_step = None
            if self._resumed_at is not None:
                step, redone_phases = self._resumed_at
                purge_step = step if phase in redone_phases else step + 1
            writer = self._writer_cls(
                log_dir=str(log_dir),
                flush_secs=self.config.flush_every_n_seconds or 3600,
                purge_step=purge_step,
            )
            self._writers[phase] = writer
        return writer

    def on_resume_from(self, state: State, redone_phases: frozenset[str]) -> None:
        """:meth:`on_resume` (which a subclass may extend), purging the events of the step too in
        ``redone_phases``."""
        self._redone_phases = redone_phases
        try:
            self.on_resume(state)
        finally:
            self._redone_phases = frozenset()

    def on_resume(self, state: State) -> None:
        """Makes TensorBoard discard the events after ``state.num_steps`` that are already on disk,
        and those of the step in the phases :meth:`on_resume_from` names (called alone: none).

        Each phase's writer, created on its first write from now on, is given ``purge_step``: for a
        run resumed at step S, S for a phase in ``redone_phases`` and S + 1 for the others; none for
        a new run (no checkpoint and no events yet). Writers that already exist are closed first so
        that they are created again with it.
        """
        self.close()
        folder = None if self.log_directory is None else self.log_directory / TENSORBOARD_DIR_NAME
        if state.num_steps > 0 or (folder is not None and any(folder.glob("*/events.out.tfevents.*"))):
            self._resumed_at = (state.num_steps, self._redone_phases)
        else:
            self._resumed_at = None

    def log_config(self, config: DictConfig) -> None:
        """Writes the resolved config as YAML text (tag ``config``) in the ``train`` folder."""
        text = OmegaConf.to_yaml(config_to_log(config, self.log_directory))  # secrets as references
        # Markdown (which TensorBoard's text tab renders) would reflow plain YAML.
        self.writer("train").add_text(CONFIG_TAG, f"```yaml\n{text}```", global_step=0)

    def write(self, state: State, batch: LogBatch) -> None:
        writer = self.writer(state.phase)
        step = state.num_steps
        for name, value in batch.scalars.items():
            writer.add_scalar(name, value, global_step=step)
        for name, text in batch.strings.items():
            writer.add_text(name, text, global_step=step)
        for name, values in batch.histograms.items():
            finite = _finite_values(values)
            # TensorBoard cannot bin an empty array or one with NaN/inf; such a histogram is
            # skipped rather than failing the run.
            if finite.numel() > 0:
                writer.add_histogram(name, finite, global_step=step)
        for name, image in batch.images.items():  # uint8 (C, H, W): written as is (no rescaling)
            writer.add_image(name, image, global_step=step, dataformats="CHW")
        if self.config.flush_every_n_seconds == 0:
            writer.flush()

    def flush(self) -> None:
        """Writes pending events of every writer to disk now."""
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.flush()
            writer.close()
        self._writers.clear()


def _finite_values(values: torch.Tensor) -> torch.Tensor:
    flat = values.detach().float().cpu().flatten()
    return flat[torch.isfinite(flat)]
