"""Defines the explicit component registry.

A config section's ``name`` picks its component: either a name registered with one of the
``register_*`` decorators, or an import path ``package.module:ClassName`` for user code. Nothing is
discovered by walking the filesystem; the built-in components live in the modules listed in
``_BUILTIN_MODULES`` and are imported only when a name is looked up.
"""

import dataclasses
import importlib
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args

from ml.core.config import BaseConfig
from ml.errors import RegistryError

Kind = Literal["model", "task", "trainer", "optimizer", "lr_scheduler", "logger", "launcher"]
KINDS: tuple[Kind, ...] = get_args(Kind)

_BUILTIN_MODULES: dict[Kind, tuple[str, ...]] = {
    "model": ("ml.examples.digits", "ml.examples.classic_control"),
    "task": ("ml.examples.digits", "ml.examples.classic_control"),
    "trainer": ("ml.trainers.sl", "ml.trainers.rl"),
    "optimizer": ("ml.optimizers.builtin",),
    "lr_scheduler": ("ml.lr_schedulers.builtin",),
    "logger": (
        "ml.loggers.stdout",
        "ml.loggers.jsonl",
        "ml.loggers.tensorboard",
        "ml.loggers.mlflow",
        "ml.loggers.wandb",
    ),
    "launcher": ("ml.launchers.single", "ml.launchers.torchrun", "ml.launchers.slurm"),
}

# The names those modules register, known without importing them (``ml --help`` lists them without
# loading torch); a test checks this against what the modules register.
BUILTIN_NAMES: dict[Kind, tuple[str, ...]] = {
    "model": ("actor_critic_mlp", "digits_cnn", "digits_mlp"),
    "task": ("classic_control", "digits"),
    "trainer": ("rl", "sl"),
    "optimizer": ("adam", "adamw", "sgd"),
    "lr_scheduler": ("constant", "cosine", "linear"),
    "logger": ("jsonl", "mlflow", "stdout", "tensorboard", "wandb"),
    "launcher": ("single", "slurm", "torchrun"),
}

_REGISTRY: dict[Kind, dict[str, tuple[type, type[BaseConfig]]]] = {kind: {} for kind in KINDS}

_C = TypeVar("_C", bound=type)


def config_class_of(cls: type) -> type[BaseConfig]:
    """Finds the config dataclass a component class is built from.

    It is the first ``BaseConfig`` subclass among the class's generic arguments
    (``class MyModel(BaseModel[MyConfig])``) or the annotation of ``__init__``'s ``config``.

    Raises:
        RegistryError: If neither names a config dataclass.
    """
    for klass in cls.__mro__:
        # Each class's own generic bases only: getattr would find an ancestor's and shadow a
        # subclass's narrower ``__init__`` annotation.
        for base in klass.__dict__.get("__orig_bases__", ()):
            for arg in get_args(base):
                if isinstance(arg, type) and issubclass(arg, BaseConfig):
                    return arg
        init = klass.__dict__.get("__init__")
        if init is not None:
            try:
                hint = typing.get_type_hints(init).get("config")
            except Exception:  # unresolvable forward references: try the next class
                hint = None
            if isinstance(hint, type) and issubclass(hint, BaseConfig):
                return hint
    raise RegistryError(
        f"cannot tell the config dataclass of {cls.__module__}.{cls.__qualname__}: "
        "subclass e.g. BaseModel[MyConfig] or annotate __init__(self, config: MyConfig)"
    )


def _register(kind: Kind) -> Callable[..., Callable[[_C], _C]]:
    def register(name: str, config_cls: type[BaseConfig] | None = None) -> Callable[[_C], _C]:
        def decorator(cls: _C) -> _C:
            cfg = config_cls or config_class_of(cls)
            if not (dataclasses.is_dataclass(cfg) and issubclass(cfg, BaseConfig)):
                raise TypeError(f"{cfg!r} is not a BaseConfig dataclass")
            existing = _REGISTRY[kind].get(name)
            if existing is not None and existing[0] is not cls:
                raise RegistryError(f"{kind} {name!r} is already registered to {existing[0].__qualname__}")
            _REGISTRY[kind][name] = (cls, cfg)
            return cls

        return decorator

    register.__doc__ = f"Registers a {kind} class under ``name`` (config class inferred if not given)."
    return register


register_model = _register("model")
register_task = _register("task")
register_trainer = _register("trainer")
register_optimizer = _register("optimizer")
register_lr_scheduler = _register("lr_scheduler")
register_logger = _register("logger")
register_launcher = _register("launcher")


def _import_builtins(kind: Kind) -> None:
    for module in _BUILTIN_MODULES[kind]:
        importlib.import_module(module)


def registered_names(kind: Kind) -> list[str]:
    """The names registered for ``kind``, built-ins included."""
    _import_builtins(kind)
    return sorted(_REGISTRY[kind])


def lookup(kind: Kind, name: str) -> tuple[type, type[BaseConfig]]:
    """Returns ``(component class, config class)`` for a config section's ``name``.

    Raises:
        RegistryError: The name is unknown, or the import path cannot be imported.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        if not all(part.isidentifier() for part in module_name.split(".")) or not attr.isidentifier():
            raise RegistryError(f"{kind} {name!r}: expected `package.module:ClassName`")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise RegistryError(f"{kind} {name!r}: cannot import module {module_name!r} ({e})") from e
        cls = getattr(module, attr, None)
        if not isinstance(cls, type):
            raise RegistryError(f"{kind} {name!r}: module {module_name!r} has no class {attr!r}")
        for registered_cls, cfg in _REGISTRY[kind].values():
            if registered_cls is cls:
                return cls, cfg
        return cls, config_class_of(cls)
    if name not in _REGISTRY[kind]:
        _import_builtins(kind)
    if name not in _REGISTRY[kind]:
        choices = ", ".join(sorted(_REGISTRY[kind])) or "none"
        raise RegistryError(
            f"unknown {kind} {name!r}; registered: {choices} (or use `package.module:ClassName`)"
        )
    return _REGISTRY[kind][name]


def build(kind: Kind, config: Any) -> Any:
    """Constructs the component a (validated) config section names."""
    cls, _ = lookup(kind, config.name)
    return cls(config)
