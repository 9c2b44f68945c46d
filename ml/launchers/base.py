"""Defines :class:`BaseLauncher`: starts the training function in one or more processes."""

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ml.core.config import BaseConfig, BaseObject


@dataclass
class BaseLauncherConfig(BaseConfig):
    """Config shared by all launchers."""


LauncherConfigT = TypeVar("LauncherConfigT", bound=BaseLauncherConfig)


class BaseLauncher(BaseObject[LauncherConfigT]):
    """Runs ``train_fn`` where and as often as the launcher decides; returns an exit code."""

    @abstractmethod
    def launch(self, train_fn: Callable[[], int]) -> int:
        """Starts training and returns the process exit code."""
