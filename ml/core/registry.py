"""Defines the explicit component registry.

A config section's ``name`` picks its component: either a name registered with one of the
``register_*`` decorators, or an import path ``package.module:ClassName`` for user code. Nothing is
discovered by walking the filesystem; the built-in components live in the modules listed in
``_BUILTIN_MODULES`` and are imported only when a name is looked up.

An import path may also name a class that is not one of ours: a ``torch.optim`` optimizer, a
``torch.optim.lr_scheduler`` schedule, one of another library's. Its config is then made from its
constructor's keyword arguments (:func:`config_from_signature`), and the kind's adapter
(``_ADAPTERS``) wraps it in a component built from that config.
"""

import dataclasses
import enum
import functools
import importlib
import inspect
import operator
import types
import typing
from collections.abc import Callable, Collection
from typing import Any, Literal, TypeVar, get_args

from omegaconf import MISSING, OmegaConf

from ml.core.config import BaseConfig, conf_field
from ml.errors import RegistryError

Kind = Literal["model", "task", "trainer", "optimizer", "lr_scheduler", "logger", "launcher"]
KINDS: tuple[Kind, ...] = get_args(Kind)

_BUILTIN_MODULES: dict[Kind, tuple[str, ...]] = {
    "model": ("ml.examples.digits", "ml.examples.classic_control", "ml.examples.digits_gan"),
    "task": ("ml.examples.digits", "ml.examples.classic_control", "ml.examples.digits_gan"),
    "trainer": ("ml.trainers.sl", "ml.trainers.rl", "ml.trainers.gan"),
    "optimizer": ("ml.optimizers.builtin", "ml.optimizers.library", "ml.optimizers.gan"),
    "lr_scheduler": ("ml.lr_schedulers.builtin", "ml.lr_schedulers.gan"),
    "logger": (
        "ml.loggers.stdout",
        "ml.loggers.jsonl",
        "ml.loggers.tensorboard",
        "ml.loggers.mlflow",
        "ml.loggers.wandb",
    ),
    "launcher": ("ml.launchers.single", "ml.launchers.torchrun", "ml.launchers.mp", "ml.launchers.slurm"),
}

# The names those modules register, known without importing them (``ml --help`` lists them without
# loading torch); a test checks this against what the modules register.
BUILTIN_NAMES: dict[Kind, tuple[str, ...]] = {
    "model": ("actor_critic_mlp", "digits_cnn", "digits_gan", "digits_mlp"),
    "task": ("classic_control", "digits", "digits_gan"),
    "trainer": ("gan", "rl", "sl"),
    "optimizer": ("adam", "adamw", "adan", "gan", "lamb", "lion", "prodigy", "sgd", "shampoo"),
    "lr_scheduler": ("constant", "cosine", "cosine_decay", "gan", "linear", "linear_no_decay"),
    "logger": ("jsonl", "mlflow", "stdout", "tensorboard", "wandb"),
    "launcher": ("mp", "single", "slurm", "torchrun"),
}

# Kinds whose foreign classes (a torch optimizer, a torch schedule) get a component around them:
# ``module:function`` taking the class and returning ``(component class, config class)``, or None
# when the class is not of that kind. Imported only then (they import torch).
_ADAPTERS: dict[Kind, str] = {
    "optimizer": "ml.optimizers.imported:adapt",
    "lr_scheduler": "ml.lr_schedulers.imported:adapt",
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
        try:
            return cls, config_class_of(cls)
        except RegistryError:
            adapted = _adapt(kind, cls)
            if adapted is None:
                raise
            return adapted
    if name not in _REGISTRY[kind]:
        _import_builtins(kind)
    if name not in _REGISTRY[kind]:
        choices = ", ".join(sorted(_REGISTRY[kind])) or "none"
        raise RegistryError(
            f"unknown {kind} {name!r}; registered: {choices} (or use `package.module:ClassName`)"
        )
    return _REGISTRY[kind][name]


def _adapt(kind: Kind, cls: type) -> tuple[type, type[BaseConfig]] | None:
    """The kind's adapter around a foreign class (see ``_ADAPTERS``), or None."""
    if kind not in _ADAPTERS:
        return None
    module_name, _, function = _ADAPTERS[kind].partition(":")
    adapt: Callable[[type], tuple[type, type[BaseConfig]] | None] = getattr(
        importlib.import_module(module_name), function
    )
    return adapt(cls)


_SIGNATURE_CONFIGS: dict[tuple[type, type[BaseConfig]], type[BaseConfig]] = {}
_PLAIN = (bool, int, float, str)


def config_from_signature(cls: type, base: type[BaseConfig], skip: Collection[str]) -> type[BaseConfig]:
    """A config dataclass (a subclass of ``base``) with one field per keyword argument of ``cls()``.

    Each field's default is the argument's; an argument without one is required (``???``). Its
    type is the annotation's where OmegaConf can check it (``float | Tensor`` counts as ``float``),
    else the default's type, else any value. An argument whose default a config cannot hold (an
    object, a function) is left out: the class keeps its own default. ``skip`` (``params``,
    ``optimizer``) and ``*args``/``**kwargs`` are left out too.

    Raises:
        RegistryError: ``cls`` takes an argument named ``name`` (the section's own key).
    """
    key = (cls, base)
    if key in _SIGNATURE_CONFIGS:
        return _SIGNATURE_CONFIGS[key]
    try:
        try:  # annotations written as strings, evaluated
            signature = inspect.signature(cls, eval_str=True)
        except Exception:  # unresolvable forward references: left as strings, the defaults give the types
            signature = inspect.signature(cls)
    except (TypeError, ValueError) as e:
        raise RegistryError(f"cannot read the arguments of {cls.__module__}.{cls.__qualname__}: {e}") from e
    parameters = list(signature.parameters.values())
    where = f"{cls.__module__}.{cls.__qualname__}"
    fields: list[tuple[str, Any, Any]] = []
    for p in parameters:
        if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            continue
        if p.name in {f.name for f in dataclasses.fields(base)}:
            raise RegistryError(f"{where} takes an argument {p.name!r}, which its config section uses itself")
        default = MISSING if p.default is p.empty else p.default
        field_type = _field_type(p.annotation, default)
        if field_type is not None:
            help_text = f"`{p.name}` of {where}" + (" (required)" if default is MISSING else "")
            fields.append((p.name, field_type, conf_field(default, help=help_text)))
    config_cls = dataclasses.make_dataclass(f"{cls.__name__}Config", fields, bases=(base,))
    config_cls.__module__ = cls.__module__
    config_cls.__doc__ = f"The keyword arguments of {where}, from its signature."
    _SIGNATURE_CONFIGS[key] = config_cls
    return config_cls


def _field_type(annotation: Any, default: Any) -> Any:
    """The type a config field of this annotation and default gets, or None if no config holds it."""
    candidates: list[Any] = []
    if annotation is not inspect.Parameter.empty and not isinstance(annotation, str):
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            # Keep the plain types: `float | Tensor` -> float. A union of containers (`tuple[float,
            # float] | tuple[float, float, float]`) is left to the default's type: OmegaConf takes
            # one as a type but checks values against it unreliably.
            members = [m for m in get_args(annotation) if m is not type(None)]
            kept = [m for m in members if m in _PLAIN]
            if kept and not any(typing.get_origin(m) or m in (tuple, list, dict) for m in members):
                candidates.append(functools.reduce(operator.or_, kept))
        else:
            candidates.append(annotation)
    if isinstance(default, tuple) and default and all(type(v) in _PLAIN for v in default):
        candidates.append(tuple[type(default[0]), ...])  # type: ignore[misc]
    if default is not MISSING and default is not None:
        candidates.append(type(default))
    candidates.append(Any)
    for candidate in candidates:
        if default is None and candidate is not Any:
            candidate = candidate | None
        if _holds(candidate, default):
            return candidate
    return None


def _holds(field_type: Any, default: Any) -> bool:
    """Whether OmegaConf takes a field of ``field_type`` with ``default`` (checked by trying it)."""
    if default is not MISSING and not isinstance(
        default, (*_PLAIN, tuple, list, dict, enum.Enum, type(None))
    ):
        return False
    try:
        probe = dataclasses.make_dataclass("Probe", [("value", field_type, conf_field(default))])
        OmegaConf.structured(probe)
    except Exception:  # OmegaConf refuses the type or the default
        return False
    return True


def build(kind: Kind, config: Any) -> Any:
    """Constructs the component a (validated) config section names."""
    cls, _ = lookup(kind, config.name)
    return cls(config)
