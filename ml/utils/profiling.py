"""Defines :class:`ProfileConfig` (``trainer.profile``) and :class:`StepProfiler`: torch's profiler
over chosen training steps, its trace in the run's logs, its top operators printed at the end.

The steps follow :func:`torch.profiler.schedule`: ``skip_first`` steps, then cycles of ``wait``
steps untraced, ``warmup`` steps traced and discarded (the profiler's own start-up cost stays out
of the numbers), ``active`` steps recorded; ``repeat`` cycles (0: until training ends). Steps count
from the session's start, so a resumed run profiles its own first steps again.

Each recorded cycle is written by :func:`torch.profiler.tensorboard_trace_handler` as
``<run>/logs/tensorboard/profile/rank0.<time>.pt.trace.json`` (``RunDir.profile``): the Chrome
trace format, which Perfetto (ui.perfetto.dev), chrome://tracing and TensorBoard's PyTorch profiler
plugin (``torch-tb-profiler``, under ``ml tensorboard``) open. Rank 0 alone is
profiled, as rank 0 alone writes logs. ``torch.profiler`` is imported only when profiling.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.core.config import conf_field
from ml.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class ProfileConfig:
    active: int | None = conf_field(
        None, help="Profile this many training steps per cycle (after `wait` and `warmup`); unset: off"
    )
    wait: int = conf_field(1, help="Steps left out at the start of each cycle")
    warmup: int = conf_field(1, help="Steps traced and discarded before the active ones")
    repeat: int = conf_field(1, help="Cycles of wait, warmup and active steps (0: until training ends)")
    skip_first: int = conf_field(0, help="Steps left out before the first cycle")
    record_shapes: bool = conf_field(False, help="Record the operators' input shapes")
    profile_memory: bool = conf_field(False, help="Record the memory each operator allocates")
    with_stack: bool = conf_field(False, help="Record the Python stack of each operator (slower)")
    top: int = conf_field(15, help="How many operators to print at the end, by their own time")


def check_profile_config(config: ProfileConfig) -> None:
    """Refuses counts that torch's schedule would take but that make no profile."""
    if config.active is None:
        return
    if config.active < 1:
        raise ConfigError(f"trainer.profile.active must be at least 1 (or unset: off), got {config.active}")
    for name in ("wait", "warmup", "repeat", "skip_first", "top"):
        if getattr(config, name) < 0:
            raise ConfigError(f"trainer.profile.{name} must not be negative, got {getattr(config, name)}")


class StepProfiler:
    """torch's profiler over the training steps ``config`` chooses (a context manager; call
    :meth:`step` after every training step)."""

    def __init__(self, config: ProfileConfig, folder: Path, *, cuda: bool) -> None:
        import torch.profiler as tp

        self.folder = folder
        self.top = config.top
        self.sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        self.cycles: list[Any] = []  # each recorded cycle's operator averages
        write_trace = tp.tensorboard_trace_handler(str(self.folder), worker_name="rank0")

        def on_trace_ready(prof: Any) -> None:
            write_trace(prof)
            self.cycles.append(prof.key_averages())

        activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if cuda else [])
        assert config.active is not None
        self._profile = tp.profile(
            activities=activities,
            schedule=tp.schedule(
                wait=config.wait,
                warmup=config.warmup,
                active=config.active,
                repeat=config.repeat,
                skip_first=config.skip_first,
            ),
            on_trace_ready=on_trace_ready,
            record_shapes=config.record_shapes,
            profile_memory=config.profile_memory,
            with_stack=config.with_stack,
        )

    def __enter__(self) -> "StepProfiler":
        self._profile.__enter__()
        return self

    def step(self) -> None:
        self._profile.step()

    def __exit__(self, *exc: object) -> None:
        self._profile.__exit__(*exc)  # (a cycle cut short by the end of training is written too)
        if not self.cycles:
            logger.warning(
                "trainer.profile: training ended before a profiled step; nothing was written "
                "(lower trainer.profile.skip_first/wait/warmup, or train longer)"
            )
            return
        traces = sorted(self.folder.glob("*.pt.trace.json"))
        logger.info(
            "Profiled %d cycle(s): %s (open with `ml tensorboard` or ui.perfetto.dev)\n"
            "Top operators of the last cycle, by their own time:\n%s",
            len(self.cycles),
            ", ".join(str(t) for t in traces[-3:]),
            self.cycles[-1].table(sort_by=self.sort_by, row_limit=self.top),
        )
