"""Defines the ``single`` launcher: train in this process, on one device."""

from dataclasses import dataclass

from omegaconf import DictConfig

from ml.core.registry import register_launcher
from ml.launchers.base import BaseLauncher, BaseLauncherConfig


@dataclass
class SingleLauncherConfig(BaseLauncherConfig):
    """The single-process launcher has no settings."""


@register_launcher("single")
class SingleLauncher(BaseLauncher[SingleLauncherConfig]):
    """Runs ``ml train`` in the calling process."""

    def launch(self, args: list[str], config: DictConfig) -> int:
        del config
        from ml.cli import train_command

        flags = [a for a in args if a.startswith("--")]
        configs = [a for a in args if not a.startswith("--")]
        return train_command(configs, allow_config_change="--allow-config-change" in flags)
