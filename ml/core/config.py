"""Defines :class:`BaseConfig`, :class:`BaseObject`, :func:`conf_field` and the ``ml.*`` resolvers.

Every component (model, task, optimizer, scheduler, trainer, logger, launcher) has one config
dataclass. Configs are layered with OmegaConf: structured defaults, then YAML files, then
``key=value`` overrides. A component is constructed from its (validated) config and keeps both the
typed config and the raw OmegaConf node it came from.
"""

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf

__all__ = ["MISSING", "BaseConfig", "BaseObject", "ConfigT", "conf_field", "register_resolvers"]

_T = TypeVar("_T")

EXP_NAME_ENV = "ML_EXP_NAME"


def conf_field(default: Any = MISSING, *, help: str | None = None) -> Any:  # noqa: A002
    """Declares a config dataclass field with a default and a help text.

    Mutable defaults (lists, dicts, dataclass instances) are copied for every new config, so two
    configs never share one object.

    Args:
        default: The default value; ``MISSING`` makes the field required.
        help: One line describing the field, shown by ``ml train --help``.

    Returns:
        A ``dataclasses.field`` carrying the help text in its metadata.
    """
    metadata = {"help": help or ""}
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class BaseConfig:
    """The config every component shares: ``name`` selects the component."""

    name: str = conf_field(MISSING, help="Registered name, or `package.module:ClassName`")

    @classmethod
    def resolve(cls, config: "BaseConfig") -> None:
        """Runs post-construction resolution (a no-op unless a subclass needs one)."""
        del config


ConfigT = TypeVar("ConfigT", bound=BaseConfig)


class BaseObject(Generic[ConfigT]):
    """A component built from a config.

    Attributes:
        config: The config, typed as the component's config dataclass.
        raw_config: The same config as an OmegaConf node (for saving and diffing).
    """

    def __init__(self, config: ConfigT) -> None:
        if isinstance(config, DictConfig):
            raw = config
        elif dataclasses.is_dataclass(config):
            raw = OmegaConf.structured(config)
        else:
            raise TypeError(f"{type(self).__name__} expects a config dataclass, got {type(config).__name__}")
        missing = _unimplemented(type(self))
        if missing:
            raise TypeError(f"{type(self).__name__} does not implement {', '.join(missing)}")
        self.config: ConfigT = config
        self.raw_config: DictConfig = raw


def _unimplemented(cls: type) -> list[str]:
    """Abstract methods a class leaves unimplemented (checked here since nn.Module is not an ABC)."""
    return sorted(
        name for name in dir(cls) if getattr(getattr(cls, name, None), "__isabstractmethod__", False)
    )


def _exp_name_resolver(default: str | None = None) -> str:
    """``${ml.exp_name:X}``: the experiment name.

    The ``ml`` command sets it from the config file names (``ML_EXP_NAME``); otherwise ``X`` is
    used, and ``run`` when ``X`` is null.
    """
    env = os.environ.get(EXP_NAME_ENV)
    if env:
        return env
    return str(default) if default not in (None, "") else "run"


def _secret_resolver(name: str) -> str:
    """``${ml.secret:NAME}``: the environment variable ``NAME``, kept out of saved configs.

    Unlike ``${oc.env:NAME}``, whose value is written into ``config.yaml`` and every checkpoint,
    a secret stays there as its reference and is read from the environment again when the run
    continues (see :func:`ml.core.compose.config_to_save`).
    """
    value = os.environ.get(str(name))
    if value is None:
        raise ValueError(f"the config refers to the secret {name}: set the environment variable {name}")
    return value


def task_steps(
    max_steps: int | None, max_samples: int | None, num_envs: int | None, num_env_steps: int | None
) -> int | None:
    """``${ml.task_steps:...}``: a task's length in optimizer steps (a schedule's default length).

    For a reinforcement-learning task, the iterations until ``task.max_steps`` or ``task.max_samples``
    ends the run, whichever comes first (each iteration steps every environment of every process
    ``num_env_steps`` times); else ``task.max_steps``, or null.
    """
    by_samples = None
    if max_samples is not None and num_envs and num_env_steps:
        per_iteration = int(num_envs) * int(num_env_steps) * max(1, int(os.environ.get("WORLD_SIZE", "1")))
        by_samples = math.ceil(int(max_samples) / per_iteration)
    if max_steps is None:
        return by_samples
    return int(max_steps) if by_samples is None else min(int(max_steps), by_samples)


def _abs_path_resolver(path: str) -> str:
    """``${ml.abs_path:P}``: ``P`` with ``~`` expanded, made absolute."""
    return str(Path(str(path)).expanduser().resolve())


def _cpu_count_resolver(max_count: int | None = None) -> int:
    """``${ml.cpu_count:N}``: the CPUs this process may use, at most ``N`` when given."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    return count if max_count is None else max(1, min(count, int(max_count)))


def register_resolvers() -> None:
    """Registers the ``ml.*`` OmegaConf resolvers (idempotent)."""
    for name, fn in (
        ("ml.exp_name", _exp_name_resolver),
        ("ml.secret", _secret_resolver),
        ("ml.task_steps", task_steps),
        ("ml.abs_path", _abs_path_resolver),
        ("ml.cpu_count", _cpu_count_resolver),
    ):
        if OmegaConf.has_resolver(name):
            continue
        if hasattr(OmegaConf, "register_resolver"):  # OmegaConf >= 2.4
            OmegaConf.register_resolver(name, fn)
        else:
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
