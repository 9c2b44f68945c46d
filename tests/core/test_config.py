"""Tests for :mod:`ml.core.config`: conf_field, BaseObject and the ``ml.*`` resolvers."""

import dataclasses
import os
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from ml.core.config import EXP_NAME_ENV, MISSING, BaseConfig, BaseObject, conf_field


@dataclass
class _Inner:
    width: int = conf_field(4, help="Inner width")
    tags: list[str] = conf_field(["a"], help="Inner tags")


@dataclass
class _Config(BaseConfig):
    sizes: list[int] = conf_field([1, 2], help="Layer sizes")
    extra: dict[str, int] = conf_field({"k": 1}, help="Extra settings")
    inner: _Inner = conf_field(_Inner(), help="A nested block")
    rate: float = conf_field(0.5)
    required: int = conf_field(MISSING, help="Must be set")


def test_conf_field_copies_mutable_defaults() -> None:
    first, second = _Config(name="x", required=1), _Config(name="y", required=2)
    first.sizes.append(3)
    first.extra["k"] = 99
    first.inner.width = 100
    first.inner.tags.append("b")
    assert second.sizes == [1, 2]
    assert second.extra == {"k": 1}
    assert second.inner == _Inner(width=4, tags=["a"])
    assert first.sizes is not second.sizes
    assert first.inner is not second.inner
    assert first.inner.tags is not second.inner.tags
    # The default object given to conf_field itself is never handed out either.
    assert _Config(name="z", required=3).inner.tags == ["a"]


def test_conf_field_help_metadata() -> None:
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(_Config)}
    assert helps["sizes"] == "Layer sizes"
    assert helps["inner"] == "A nested block"
    assert helps["rate"] == ""  # no help given: an empty string, not a missing key
    assert helps["name"] == "Registered name, or `package.module:ClassName`"
    assert {f.name: f.metadata["help"] for f in dataclasses.fields(_Inner)}["width"] == "Inner width"


def test_conf_field_missing_makes_a_required_field() -> None:
    node = OmegaConf.structured(_Config)
    assert OmegaConf.is_missing(node, "required")
    assert OmegaConf.is_missing(node, "name")
    assert node.rate == 0.5
    with pytest.raises(MissingMandatoryValue):
        _ = node.required


class _Thing(BaseObject[_Config]):
    def run(self) -> int:
        return self.config.required * 2


def test_base_object_keeps_config_and_raw_config_from_a_dataclass() -> None:
    config = _Config(name="thing", required=21)
    thing = _Thing(config)
    assert thing.config is config
    assert thing.run() == 42
    assert isinstance(thing.raw_config, DictConfig)
    assert thing.raw_config.name == "thing"
    assert thing.raw_config.required == 21
    assert thing.raw_config.inner.width == 4
    assert OmegaConf.get_type(thing.raw_config) is _Config


def test_base_object_keeps_a_dict_config_node_as_both() -> None:
    node = OmegaConf.merge(OmegaConf.structured(_Config), {"name": "thing", "required": 5})
    assert isinstance(node, DictConfig)
    thing = _Thing(node)  # type: ignore[arg-type]
    assert thing.raw_config is node
    assert thing.config is node
    assert thing.run() == 10
    with pytest.raises(Exception, match="not_a_field"):
        node.not_a_field = 1  # the structured node still validates writes


def test_base_object_rejects_a_non_config() -> None:
    with pytest.raises(TypeError, match="expects a config dataclass"):
        _Thing({"name": "thing"})  # type: ignore[arg-type]


class _AbstractThing(BaseObject[_Config]):
    @abstractmethod
    def step(self) -> None: ...

    @abstractmethod
    def reset(self) -> None: ...


class _HalfThing(_AbstractThing):
    def step(self) -> None:
        return None


class _WholeThing(_HalfThing):
    def reset(self) -> None:
        return None


def test_base_object_refuses_unimplemented_abstract_methods() -> None:
    config = _Config(name="thing", required=1)
    with pytest.raises(TypeError, match="_HalfThing does not implement reset"):
        _HalfThing(config)  # type: ignore[abstract]
    with pytest.raises(TypeError, match="reset, step"):
        _AbstractThing(config)  # type: ignore[abstract]
    assert _WholeThing(config).config is config


def _resolve(expression: str) -> object:
    return OmegaConf.create({"value": expression}).value


def test_exp_name_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EXP_NAME_ENV, raising=False)
    assert _resolve("${ml.exp_name:digits}") == "digits"
    assert _resolve("${ml.exp_name:null}") == "run"
    assert _resolve("${ml.exp_name:}") == "run"
    monkeypatch.setenv(EXP_NAME_ENV, "from_env")
    assert _resolve("${ml.exp_name:digits}") == "from_env"  # the environment wins over the argument
    assert _resolve("${ml.exp_name:null}") == "from_env"
    monkeypatch.setenv(EXP_NAME_ENV, "")
    assert _resolve("${ml.exp_name:digits}") == "digits"  # an empty variable counts as unset


def test_exp_name_resolver_in_a_trainer_like_config(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass
    class _WithName(BaseConfig):
        exp_name: str = conf_field("${ml.exp_name:null}", help="Experiment name")

    monkeypatch.delenv(EXP_NAME_ENV, raising=False)
    node = OmegaConf.structured(_WithName(name="t"))
    assert node.exp_name == "run"
    monkeypatch.setenv(EXP_NAME_ENV, "named")
    assert node.exp_name == "named"  # resolved when read, not when the node was built


def test_abs_path_resolver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _resolve("${ml.abs_path:data/x.txt}") == str(tmp_path.resolve() / "data" / "x.txt")
    assert _resolve("${ml.abs_path:'~/y'}") == str((tmp_path / "home" / "y").resolve())
    assert _resolve("${ml.abs_path:/a/../b}") == "/b"


def test_cpu_count_resolver() -> None:
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert _resolve("${ml.cpu_count:}") == available
    assert _resolve("${ml.cpu_count:1}") == 1
    assert _resolve("${ml.cpu_count:100000}") == available
    assert _resolve("${ml.cpu_count:0}") == 1  # never fewer than one
    assert _resolve("${ml.cpu_count:null}") == available


def test_resolvers_are_registered_once() -> None:
    from ml.core.config import register_resolvers

    register_resolvers()  # again: no "resolver already registered" error
    for name in ("ml.exp_name", "ml.abs_path", "ml.cpu_count"):
        assert OmegaConf.has_resolver(name)
