"""Tests for swapping a component (a section rebuilt, not merged) and configs made from signatures."""

import dataclasses
import enum
import textwrap
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from ml.core.compose import ConfigError, compose_config
from ml.core.config import BaseConfig
from ml.core.registry import config_from_signature
from ml.errors import RegistryError

BASE = """\
model: {name: digits_mlp, hidden: 32}
task: {name: digits, max_steps: 100}
optimizer: {name: adamw, lr: 0.003, weight_decay: 0.05}
lr_scheduler: {name: cosine, warmup_steps: 10}
trainer: {name: sl, exp_name: swapped}
"""


@pytest.fixture
def base(tmp_path: Path) -> str:
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    return str(path)


def _section(base: str, *overrides: str, files: tuple[str, ...] = ()) -> dict[str, Any]:
    root = compose_config([base, *files], list(overrides))
    section = OmegaConf.to_container(root.optimizer)
    assert isinstance(section, dict)
    return section


SGD_DEFAULTS = {
    "name": "sgd",
    "lr": 0.01,
    "momentum": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "default_decay": True,
}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # Another name: the new component's defaults plus what the command line gives; the old
        # section's lr and weight_decay (which sgd has too) are not carried over.
        (["optimizer.name=sgd"], SGD_DEFAULTS),
        (["optimizer.name=sgd", "optimizer.lr=0.1"], {**SGD_DEFAULTS, "lr": 0.1}),
        (["optimizer.lr=0.1", "optimizer.name=sgd"], {**SGD_DEFAULTS, "lr": 0.1}),  # in any order
        (["optimizer={name: sgd, lr: 0.1}"], {**SGD_DEFAULTS, "lr": 0.1}),
        (["optimizer={name: sgd}", "optimizer.momentum=0.9"], {**SGD_DEFAULTS, "momentum": 0.9}),
        # The whole section, same component: rebuilt too (what is not given is the default again).
        (["optimizer={name: adamw, lr: 0.1}"], {"lr": 0.1, "weight_decay": 0.01}),
        (["optimizer={lr: 0.1}"], {"name": "adamw", "lr": 0.1, "weight_decay": 0.01}),
        # The same name, or no name: the section is added to, as before.
        (["optimizer.name=adamw", "optimizer.lr=0.1"], {"lr": 0.1, "weight_decay": 0.05}),
        (["optimizer.lr=0.1"], {"lr": 0.1, "weight_decay": 0.05}),
    ],
)
def test_a_command_line_swap_rebuilds_the_section(
    base: str, overrides: list[str], expected: dict[str, Any]
) -> None:
    section = _section(base, *overrides)
    assert {key: section[key] for key in expected} == expected
    if section["name"] == "sgd":  # sgd's keys only
        assert set(section) == set(SGD_DEFAULTS)


def test_the_swapped_section_is_the_new_components_only(base: str) -> None:
    assert _section(base, "optimizer.name=sgd") == SGD_DEFAULTS  # no weight_decay: 0.05, no beta1
    # Before, this failed with "Key 'beta1' not in 'SGDConfig'" (adamw's defaults were kept).
    assert _section(base, "optimizer.name=torch.optim:SGD", "optimizer.momentum=0.9")["momentum"] == 0.9


def test_a_later_file_naming_another_component_replaces_the_section(base: str, tmp_path: Path) -> None:
    other = tmp_path / "sgd.yaml"
    other.write_text("optimizer: {name: sgd, momentum: 0.9}\n")
    assert _section(base, files=(str(other),)) == {**SGD_DEFAULTS, "momentum": 0.9}
    same = tmp_path / "more.yaml"
    same.write_text("optimizer: {lr: 0.1}\n")  # the same component: files merge in order, as before
    assert _section(base, files=(str(same),))["weight_decay"] == 0.05


def test_a_swap_of_the_schedule_and_a_config_yaml_of_a_swapped_run_compose(base: str, tmp_path: Path) -> None:
    root = compose_config([base], ["lr_scheduler.name=linear_no_decay", "optimizer.name=lion"])
    assert OmegaConf.to_container(root.lr_scheduler) == {"name": "linear_no_decay", "warmup_steps": 1000}
    assert root.optimizer.weight_decay == 0.0  # lion's default, not adamw's 0.05
    # A run's config.yaml holds the swapped sections resolved: it composes as it is.
    saved = tmp_path / "run_0" / "config.yaml"
    saved.parent.mkdir()
    saved.write_text(OmegaConf.to_yaml(root))
    assert compose_config([str(saved)]) == root


def test_an_unknown_key_names_the_components_keys(base: str) -> None:
    with pytest.raises(ConfigError) as e:
        compose_config([base], ["optimizer.name=sgd", "optimizer.beta1=0.5"])
    assert str(e.value) == (
        "optimizer.beta1: Key 'beta1' not in 'SGDConfig' "
        "(sgd takes: name, lr, momentum, nesterov, weight_decay, default_decay)"
    )


def test_a_required_argument_of_an_imported_class_is_a_missing_value(base: str) -> None:
    with pytest.raises(
        ConfigError, match=r"missing required value lr_scheduler.step_size: set it in the YAML"
    ):
        compose_config([base], ["lr_scheduler.name=torch.optim.lr_scheduler:StepLR"])
    root = compose_config([base], ["lr_scheduler={name: 'torch.optim.lr_scheduler:StepLR', step_size: 5}"])
    assert OmegaConf.to_container(root.lr_scheduler) == {
        "name": "torch.optim.lr_scheduler:StepLR",
        "step_size": 5,
        "gamma": 0.1,
    }


class _Color(enum.Enum):
    RED = 1
    BLUE = 2


class _Widget:
    def __init__(
        self,
        params: list[Any],
        size: int,
        rate: "float | list[int] | object" = 0.5,
        pair: tuple[float, float] | tuple[float, float, float] = (1.0, 2.0),
        untyped=3,
        maybe: str | None = None,
        color: _Color = _Color.BLUE,
        hook: Any = print,  # no config holds a function: left out, the class keeps it
        *args: Any,
        **kwargs: Any,
    ) -> None:
        del params, size, rate, pair, untyped, maybe, color, hook, args, kwargs


def test_a_config_from_a_signature_has_its_keyword_arguments() -> None:
    config_cls = config_from_signature(_Widget, BaseConfig, skip=("params",))
    assert config_from_signature(_Widget, BaseConfig, skip=("params",)) is config_cls  # made once
    assert config_cls.__name__ == "_WidgetConfig"
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    assert list(fields) == ["name", "size", "rate", "pair", "untyped", "maybe", "color"]
    node = OmegaConf.structured(config_cls)
    assert OmegaConf.is_missing(node, "size")  # no default: required
    assert (node.rate, node.pair, node.untyped, node.maybe, node.color) == (
        0.5,
        (1.0, 2.0),
        3,
        None,
        _Color.BLUE,
    )
    merged = OmegaConf.merge(node, {"size": "4", "pair": [1, 2, 3], "maybe": "x", "color": "RED"})
    assert (merged.size, merged.pair, merged.maybe, merged.color) == (4, (1.0, 2.0, 3.0), "x", _Color.RED)
    for bad in ({"size": "big"}, {"untyped": "three"}, {"hook": 1}):
        with pytest.raises(Exception, match=r"size|untyped|hook"):
            OmegaConf.merge(node, bad)


def test_a_signature_with_the_sections_own_key_is_refused() -> None:
    class Named:
        def __init__(self, name: str = "x") -> None:
            del name

    with pytest.raises(RegistryError, match="takes an argument 'name', which its config section uses itself"):
        config_from_signature(Named, BaseConfig, skip=())


def test_yaml_sections_by_import_path_compose(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        BASE
        + textwrap.dedent("""\
        optimizer: {name: "torch.optim:SGD", lr: 0.1, momentum: 0.9}
        """).replace("optimizer: {name: adamw, lr: 0.003, weight_decay: 0.05}\n", "")
    )
    assert compose_config([str(path)]).optimizer.momentum == 0.9


def test_a_component_nested_in_a_section_is_swapped_too() -> None:
    """The gan optimizer holds one optimizer per part: naming another one for a part replaces that
    part's section (the packaged config's Adam betas would be no value for SGD), not its sibling's."""
    root = compose_config(["digits_gan"], ["optimizer.generator.name=torch.optim:SGD"])
    generator = OmegaConf.to_container(root.optimizer.generator)
    assert generator == {"name": "torch.optim:SGD"}  # its defaults come when the part is built
    assert root.optimizer.discriminator.name == compose_config(["digits_gan"]).optimizer.discriminator.name
    assert root.optimizer.discriminator == compose_config(["digits_gan"]).optimizer.discriminator
