"""Defines :class:`BaseLauncher`: how ``ml launch`` starts training (here, many processes, a cluster)."""

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from omegaconf import DictConfig

from ml.core.config import BaseConfig, BaseObject

if TYPE_CHECKING:
    from ml.launchers.sweep import Point


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

    def launch_sweep(self, points: "list[Point]", configs: list[DictConfig], flags: list[str]) -> int:
        """Starts every point of a sweep (``ml launch -m ...``) and returns the exit code.

        By default the points run one after another, each through this launcher (``ml launch`` of
        the point's arguments in a child process); a launcher with a better way (the Slurm job
        array) overrides this.

        Args:
            points: The sweep's points (:func:`ml.launchers.sweep.expand`).
            configs: Their composed configs, in the same order (each already checked).
            flags: Command-line flags for every point (``--allow-config-change``).
        """
        from ml.launchers.sweep import run_one_after_another

        return run_one_after_another(points, "launch", flags, str(configs[0].trainer.exp_name))
