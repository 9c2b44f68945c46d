"""Defines :class:`BaseLauncher`: how ``ml launch`` starts training (here, many processes, a cluster)."""

from abc import abstractmethod
from dataclasses import dataclass
from typing import TypeVar

from omegaconf import DictConfig

from ml.core.config import BaseConfig, BaseObject


@dataclass
class BaseLauncherConfig(BaseConfig):
    """Config shared by all launchers."""


LauncherConfigT = TypeVar("LauncherConfigT", bound=BaseLauncherConfig)


class BaseLauncher(BaseObject[LauncherConfigT]):
    """Starts ``ml train`` on the command line's configs, where and as often as the launcher decides."""

    @abstractmethod
    def launch(self, args: list[str], config: DictConfig) -> int:
        """Starts training and returns the exit code of ``ml launch``.

        Args:
            args: The config files and ``key=value`` overrides given to ``ml launch``.
            config: Those composed (not yet resolved: ``trainer.exp_dir`` may still be unset).
        """
