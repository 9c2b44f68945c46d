"""Defines the ``single`` launcher: train in this process, on one device."""

from collections.abc import Callable
from dataclasses import dataclass

from ml.core.registry import register_launcher
from ml.launchers.base import BaseLauncher, BaseLauncherConfig


@dataclass
class SingleLauncherConfig(BaseLauncherConfig):
    """The single-process launcher has no settings."""


@register_launcher("single")
class SingleLauncher(BaseLauncher[SingleLauncherConfig]):
    """Runs training directly in the calling process."""

    def launch(self, train_fn: Callable[[], int]) -> int:
        return train_fn()
