"""Tests for :mod:`ml.core.registry`: registered names, import paths, config inference, errors."""

import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ml.core import registry
from ml.core.config import BaseConfig, BaseObject, conf_field
from ml.core.registry import (
    KINDS,
    RegistryError,
    config_class_of,
    lookup,
    register_model,
    register_optimizer,
    registered_names,
)
from ml.models.base import BaseModel, BaseModelConfig


@pytest.fixture(autouse=True)
def _restore_registry() -> Iterator[None]:
    """Registrations made by a test do not leak into other tests."""
    for kind in KINDS:
        registry._import_builtins(kind)
    saved = {kind: dict(entries) for kind, entries in registry._REGISTRY.items()}
    yield
    for kind, entries in saved.items():
        registry._REGISTRY[kind].clear()
        registry._REGISTRY[kind].update(entries)


@dataclass
class _ToyConfig(BaseModelConfig):
    width: int = conf_field(3, help="Toy width")


class _ToyModel(BaseModel[_ToyConfig]):
    pass


@dataclass
class _OtherConfig(BaseConfig):
    depth: int = conf_field(1, help="Depth")


def test_builtin_names_resolve() -> None:
    from ml.examples.digits import DigitsMLP, DigitsMLPConfig
    from ml.optimizers.builtin import AdamConfig, AdamOptimizer, AdamWConfig, AdamWOptimizer

    assert lookup("optimizer", "adam") == (AdamOptimizer, AdamConfig)
    assert lookup("optimizer", "adamw") == (AdamWOptimizer, AdamWConfig)  # explicit config class
    assert lookup("model", "digits_mlp") == (DigitsMLP, DigitsMLPConfig)
    assert {"adam", "adamw", "sgd"} <= set(registered_names("optimizer"))
    assert {"stdout", "jsonl"} <= set(registered_names("logger"))
    assert "sl" in registered_names("trainer")
    assert "single" in registered_names("launcher")


def test_the_static_list_of_builtin_names_matches_what_the_modules_register() -> None:
    """``ml --help`` prints BUILTIN_NAMES without importing the modules: it must not go stale."""
    for kind in KINDS:
        built_in = {
            name
            for name, (cls, _) in registry._REGISTRY[kind].items()
            if cls.__module__ in registry._BUILTIN_MODULES[kind]
        }
        assert set(registry.BUILTIN_NAMES[kind]) == built_in, kind


def test_register_and_lookup_infers_the_config_class() -> None:
    decorated = register_model("toy_model_for_tests")(_ToyModel)
    assert decorated is _ToyModel
    assert lookup("model", "toy_model_for_tests") == (_ToyModel, _ToyConfig)
    assert "toy_model_for_tests" in registered_names("model")
    # Registering the same class again (e.g. a module imported twice by path) is harmless.
    register_model("toy_model_for_tests")(_ToyModel)
    assert lookup("model", "toy_model_for_tests") == (_ToyModel, _ToyConfig)


def test_registering_a_different_class_under_a_taken_name_raises() -> None:
    register_model("toy_model_for_tests")(_ToyModel)

    class _Impostor(BaseModel[_ToyConfig]):
        pass

    with pytest.raises(RegistryError, match="'toy_model_for_tests' is already registered to _ToyModel"):
        register_model("toy_model_for_tests")(_Impostor)
    assert lookup("model", "toy_model_for_tests")[0] is _ToyModel
    with pytest.raises(RegistryError, match="'adam' is already registered"):
        register_optimizer("adam")(_Impostor)


def test_register_rejects_a_config_that_is_not_a_base_config_dataclass() -> None:
    @dataclass
    class _Plain:
        x: int = 1

    with pytest.raises(TypeError, match="is not a BaseConfig dataclass"):
        register_model("toy_bad_config", _Plain)(_ToyModel)
    assert "toy_bad_config" not in registered_names("model")


def test_unknown_name_lists_the_registered_ones() -> None:
    with pytest.raises(RegistryError) as info:
        lookup("optimizer", "adamx")
    message = str(info.value)
    assert "unknown optimizer 'adamx'" in message
    assert "registered: adam, adamw, adan, gan, lamb, lion, prodigy, sgd, shampoo" in message
    assert "package.module:ClassName" in message


def _write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user module on sys.path defining components that are not registered anywhere."""
    name = "ml_registry_test_user_module"
    _write_module(
        tmp_path,
        name,
        """
        from dataclasses import dataclass

        from ml.core.config import BaseConfig, BaseObject, conf_field
        from ml.models.base import BaseModel, BaseModelConfig


        @dataclass
        class MyConfig(BaseModelConfig):
            width: int = conf_field(7, help="Width")


        class MyModel(BaseModel[MyConfig]):
            pass


        @dataclass
        class AnnotatedConfig(BaseConfig):
            depth: int = conf_field(2, help="Depth")


        class Annotated(BaseObject):
            def __init__(self, config: AnnotatedConfig) -> None:
                super().__init__(config)


        class NoConfig:
            pass


        NOT_A_CLASS = 3
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_import_path_resolves_and_infers_the_config_from_generic_base(user_module: str) -> None:
    cls, config_cls = lookup("model", f"{user_module}:MyModel")
    module = sys.modules[user_module]
    assert cls is module.MyModel
    assert config_cls is module.MyConfig
    assert config_cls().width == 7


def test_import_path_infers_the_config_from_init_annotation(user_module: str) -> None:
    cls, config_cls = lookup("task", f"{user_module}:Annotated")
    assert config_cls is sys.modules[user_module].AnnotatedConfig
    assert cls(config_cls(name="x")).config.depth == 2


def test_import_path_errors(user_module: str) -> None:
    with pytest.raises(RegistryError, match="cannot import module 'no_such_module_for_ml_tests'"):
        lookup("model", "no_such_module_for_ml_tests:Thing")
    with pytest.raises(RegistryError, match=f"module '{user_module}' has no class 'Missing'"):
        lookup("model", f"{user_module}:Missing")
    with pytest.raises(RegistryError, match="has no class 'NOT_A_CLASS'"):
        lookup("model", f"{user_module}:NOT_A_CLASS")
    with pytest.raises(RegistryError, match=r"cannot tell the config dataclass of .*NoConfig"):
        lookup("model", f"{user_module}:NoConfig")


def test_import_path_of_a_registered_class_uses_its_registered_config() -> None:
    from ml.optimizers.builtin import AdamWConfig, AdamWOptimizer

    assert lookup("optimizer", "ml.optimizers.builtin:AdamWOptimizer") == (AdamWOptimizer, AdamWConfig)


def test_config_class_of_prefers_a_subclass_annotation_over_an_inherited_generic_base() -> None:
    @dataclass
    class _WiderConfig(_ToyConfig):
        extra: int = conf_field(1, help="Extra")

    class _WiderModel(_ToyModel):
        def __init__(self, config: _WiderConfig) -> None:
            super().__init__(config)

    class _PlainSubclass(_ToyModel):
        pass

    assert config_class_of(_ToyModel) is _ToyConfig
    assert config_class_of(_WiderModel) is _WiderConfig
    assert config_class_of(_PlainSubclass) is _ToyConfig


def test_config_class_of_without_any_config_raises() -> None:
    class _Bare(BaseObject):
        pass

    with pytest.raises(RegistryError, match="cannot tell the config dataclass"):
        config_class_of(_Bare)

    class _Direct(BaseObject[_OtherConfig]):
        pass

    assert config_class_of(_Direct) is _OtherConfig
