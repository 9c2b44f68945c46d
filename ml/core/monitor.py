"""Defines which way a metric improves, and early stopping by a metric (torch-free).

One rule, shared by ``ml runs`` (the best value of a run), the checkpoints kept for being the best
(``trainer.checkpoint.monitor``) and early stopping (``trainer.early_stopping.monitor``), unless a
``mode`` (``min`` or ``max``) says otherwise. It reads the words of the metric's last name
(``valid/clean/reward_model_loss``: ``reward``, ``model``, ``loss``): a word of an error
(``loss``, ``error``, ``mse``, ``perplexity``, ...) makes it lower-is-better, whatever else it
says; else a word of a score (``acc``/``accuracy``, ``return``, ``reward``, ``f1``, ``auc``,
``iou``, ``precision``, ``recall``, ``bleu``, ``map``, ...) makes it higher-is-better; anything
else is lower-is-better, like a loss.

A run's ``config.yaml`` may set the mode of the metrics it monitors (:func:`configured_modes`); what
reports a run's best value afterwards (``ml runs``) follows that mode, as its best checkpoint and
its early stopping did (:func:`mode_for`), so one rule decides both.
"""

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ml.errors import ConfigError

logger = logging.getLogger(__name__)

LOWER_IS_BETTER = frozenset(
    {
        "loss",
        "error",
        "err",
        "mse",
        "mae",
        "rmse",
        "nll",
        "perplexity",
        "ppl",
        "cer",
        "wer",
        "fid",
        "distance",
    }
)
HIGHER_IS_BETTER = frozenset(
    {"acc", "accuracy", "return", "reward", "f1", "auc", "auroc", "iou", "miou", "precision", "recall",
     "bleu", "rouge", "map", "dice", "r2", "top1", "top5"}
)  # fmt: skip
MODES = ("min", "max")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (the module's rule)."""
    words = set(re.split(r"[^a-z0-9]+", metric.lower().rsplit("/", 1)[-1]))
    if words & LOWER_IS_BETTER:
        return False
    return bool(words & HIGHER_IS_BETTER) or any(word.startswith("acc") for word in words)


def mode_of(metric: str, mode: str | None, where: str) -> str:
    """``mode`` checked (``min`` or ``max``), or the metric's own direction when it is None.

    Raises:
        ConfigError: ``mode`` is neither (``where`` names the config key).
    """
    if mode is None:
        return "max" if higher_is_better(metric) else "min"
    if mode not in MODES:
        raise ConfigError(f"{where} must be min or max (or unset: from the metric's name), got {mode!r}")
    return mode


# The trainer's config sections that name a monitored metric (``monitor``) and its ``mode``; where both
# set a mode for one metric, the checkpoint's counts: it decides which checkpoint is the run's best.
MONITOR_SECTIONS = ("checkpoint", "early_stopping")


def configured_modes(config: Any) -> dict[str, str]:
    """The modes a run's config (its ``config.yaml``, as plain data) sets explicitly: metric to
    ``min``/``max``, from ``trainer.<section>.monitor`` and ``.mode`` of :data:`MONITOR_SECTIONS`.

    A mode that is unset or not ``min``/``max`` is left out: the metric's name decides then, as it
    did in the run (the trainer refuses a run with another mode before it trains).
    """
    trainer = config.get("trainer") if isinstance(config, Mapping) else None
    modes: dict[str, str] = {}
    for section in MONITOR_SECTIONS:
        settings = trainer.get(section) if isinstance(trainer, Mapping) else None
        if not isinstance(settings, Mapping):
            continue
        metric, mode = settings.get("monitor"), settings.get("mode")
        if isinstance(metric, str) and mode in MODES:
            modes.setdefault(metric, mode)
    return modes


def mode_for(metric: str, modes: Mapping[str, str]) -> str:
    """Which way ``metric`` improves in a run whose config set ``modes`` (:func:`configured_modes`):
    the mode set for it, else its name's (:func:`higher_is_better`)."""
    return mode_of(metric, modes.get(metric), "mode")


def is_better(value: float, than: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` improves on ``than`` by more than ``min_delta`` (NaN never improves)."""
    if math.isnan(value):
        return False
    if than is None or math.isnan(than):
        return True
    return value < than - min_delta if mode == "min" else value > than + min_delta


@dataclass
class EarlyStopping:
    """Counts evaluations without improvement of one metric; says when patience has run out.

    Args:
        monitor: The metric, as logged (``valid/loss``).
        mode: ``min`` or ``max``.
        patience: Evaluations in a row without improvement after which training stops.
        min_delta: An improvement must exceed this.
    """

    monitor: str
    mode: str
    patience: int
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad_evaluations: int = 0  # in a row, since the best

    def update(self, value: float, step: int) -> None:
        """Takes the metric's value of the evaluation at ``step``."""
        if is_better(value, self.best, self.mode, self.min_delta):
            self.best, self.best_step, self.bad_evaluations = value, step, 0
        else:
            self.bad_evaluations += 1

    @property
    def should_stop(self) -> bool:
        return self.bad_evaluations >= self.patience

    @property
    def reason(self) -> str:
        """Why training stopped, in one line (for the log and ``status.json``)."""
        by = f" by more than {self.min_delta:g}" if self.min_delta else ""
        best = f"{self.best:.6g} at step {self.best_step}" if self.best is not None else "none"
        return (
            f"early stopping: {self.monitor} did not improve{by} in {self.bad_evaluations} evaluations "
            f"(patience {self.patience}; best {best})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "bad_evaluations": self.bad_evaluations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues the count of a checkpoint's run; one of another metric or direction starts over
        (its best would be the worst; a checkpoint from before ``mode`` was kept is taken as alike)."""
        if state.get("monitor") != self.monitor or state.get("mode", self.mode) != self.mode:
            if state.get("best") is not None:
                logger.info(
                    "Early stopping starts over: the checkpoint's count was for %s (%s), not %s (%s)",
                    state.get("monitor"),
                    state.get("mode", "min or max"),
                    self.monitor,
                    self.mode,
                )
            return
        best = state.get("best")
        self.best = None if best is None else float(best)
        step = state.get("best_step")
        self.best_step = None if step is None else int(step)
        self.bad_evaluations = int(state.get("bad_evaluations", 0))
