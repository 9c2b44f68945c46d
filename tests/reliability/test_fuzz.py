"""Property tests (hypothesis) of the config diff and of the config parser, in process.

- :func:`ml.trainers.base.diff_configs` on random nested dicts and lists of scalars (``None``,
  booleans, integers, floats, strings, bytes, ``???`` missing values, interpolations) built with
  ``OmegaConf.create``: a config's diff with itself is empty, the two sides never hold the same
  line, every changed leaf is reported (itself or an ancestor), and no pair raises.
- :func:`ml.core.compose.compose_config` on random YAML text and on structured override strings:
  it returns a config or raises ``ConfigError`` (exit code 2 in ``ml``), never another exception.

Every test sets ``max_examples`` and ``deadline``: ``ML_RELIABILITY_EXAMPLES`` examples per diff test
(100; ``make reliability``: 300) and half as many per parser test. The example database is off
(nothing is written to the working tree), so each run draws fresh examples.
"""

import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ml.core.compose import ConfigError, compose_config
from ml.trainers.base import diff_configs
from tests.e2e.test_cli import USER_CONFIG, USER_MODULE, USER_TASK

MISSING = "???"
EXAMPLES = int(os.environ.get("ML_RELIABILITY_EXAMPLES", "") or 50)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a first OmegaConf or import call may be slow; the budget is max_examples
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no "explain" pass over a failure
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PARSER_FUZZ = settings(FUZZ, max_examples=max(1, EXAMPLES // 2))

# ---------------------------------------------------------------------------------------------
# Random configs

# Plain keys keep paths unambiguous (no key looks like a path: no ".", "[", "]" or "="); the
# tests that need no path reasoning also get odd keys.
PLAIN_KEYS = st.one_of(
    st.text(alphabet="abcxyz_0", min_size=1, max_size=4),
    st.sampled_from(["model", "lr", "name", "0"]),
    st.integers(min_value=-2, max_value=3),
)
ODD_KEYS = st.one_of(PLAIN_KEYS, st.text(alphabet="ab.[]0 =$", min_size=1, max_size=4), st.just("a.b"))
STRINGS = st.one_of(
    st.text(alphabet="abc 01?.-:", max_size=6),
    st.sampled_from(
        ["", MISSING, "null", "None", "1", "1.0", "True", "true", "${a}", "x${b}y", "${oc.env:HOME}"]
    ),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    STRINGS,
    st.binary(max_size=3),
)
NAN_SCALARS = st.one_of(SCALARS, st.just(math.nan))


def _configs(
    scalars: st.SearchStrategy[Any] = SCALARS, keys: st.SearchStrategy[Any] = PLAIN_KEYS
) -> st.SearchStrategy[Any]:
    """Plain top-level dicts or lists (what ``OmegaConf.create`` takes) of nested dicts, lists, scalars."""
    trees = st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
        max_leaves=10,
    )
    return st.dictionaries(keys, trees, max_size=4) | st.lists(trees, max_size=4)


@st.composite
def _edited(draw: st.DrawFn, value: Any) -> Any:
    """``value`` with random edits: scalars replaced (by a random one, or by the same written as
    a string, as when a YAML value gets quoted), keys and list items dropped or added."""
    if isinstance(value, dict):
        out = {k: draw(_edited(v)) for k, v in value.items() if draw(st.integers(0, 9)) != 0}
        if draw(st.integers(0, 9)) == 0:
            out[draw(PLAIN_KEYS)] = draw(SCALARS)
        return out
    if isinstance(value, list):
        items = [draw(_edited(v)) for v in value]
        if items and draw(st.integers(0, 9)) == 0:
            items.pop()
        if draw(st.integers(0, 9)) == 0:
            items.append(draw(SCALARS))
        return items
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return draw(SCALARS)
    if choice == 1:
        return str(value)
    return value


@st.composite
def _config_pairs(draw: st.DrawFn) -> tuple[Any, Any]:
    """Two configs: unrelated, or the second an edit of the first (so that paths meet)."""
    first = draw(_configs())
    second = draw(_edited(first)) if draw(st.booleans()) else draw(_configs())
    return first, second


def _create(data: Any) -> DictConfig | ListConfig:
    """``OmegaConf.create(data)``; data OmegaConf itself refuses (e.g. keys 0 and '0') is skipped."""
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException:
        reject()


def _child(path: str, key: Any) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))


def _nodes(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, value)`` of every node, containers included; ``???`` values count as absent."""
    if isinstance(value, str) and value == MISSING:
        return
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _nodes(item, _child(path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _nodes(item, _child(path, i))


def _changed_leaves(mine: Any, other: Any) -> Iterator[tuple[str, Any]]:
    """The leaves of ``mine`` (scalars, and containers without a present child) that ``other``
    lacks: no node at that path, a scalar of another type or value, or (for an empty container)
    no container of the same type."""
    nodes, others = dict(_nodes(mine)), dict(_nodes(other))
    parents = {parent for path in nodes for parent in _ancestors_or_self(path) if parent != path}
    for path, value in nodes.items():
        if isinstance(value, (dict, list)):
            if path in parents:
                continue  # has a present child: not a leaf
            if path in others and type(others[path]) is type(value):
                continue
        elif path in others and _same(value, others[path]):
            continue
        yield path, value


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


def _ancestors_or_self(path: str) -> set[str]:
    """``path`` and every prefix of it that ends before a ``.`` or ``[`` (the root ``""`` too)."""
    found = {"", path}
    for i, char in enumerate(path):
        if char in ".[" and i > 0:
            found.add(path[:i])
    return found


def _reported(lines: list[str], path: str) -> bool:
    return any(line.startswith(f"{p}=") for line in lines for p in _ancestors_or_self(path))


@FUZZ
@given(_configs(NAN_SCALARS, ODD_KEYS))
def test_diff_of_a_config_with_itself_is_empty(data: Any) -> None:
    """Proves ``diff_configs(c, c)`` and ``diff_configs(c, copy of c)`` report nothing, for any
    nesting of dicts, lists and scalars (NaN, ``???`` and None included)."""
    config = _create(data)
    assert diff_configs(config, config) == ([], [])
    assert diff_configs(config, _create(data)) == ([], [])


@FUZZ
@given(_config_pairs())
def test_diff_sides_are_disjoint_and_name_every_changed_leaf(pair: tuple[Any, Any]) -> None:
    """Proves that for any two configs (unrelated, or one an edit of the other), no line is on
    both sides of the diff (a change must look like one), and every leaf whose value or type
    differs, or that only one side has, is reported on its side, itself or through an ancestor
    (``path=... (dict)``); no pair raises."""
    first, second = pair
    a, b = _create(first), _create(second)
    removed, added = diff_configs(a, b)
    assert not set(removed) & set(added), (removed, added)
    plain_a = OmegaConf.to_container(a, resolve=False)
    plain_b = OmegaConf.to_container(b, resolve=False)
    for path, value in _changed_leaves(plain_a, plain_b):
        assert _reported(removed, path), f"{path}={value!r} missing from {removed}"
    for path, value in _changed_leaves(plain_b, plain_a):
        assert _reported(added, path), f"{path}={value!r} missing from {added}"


@FUZZ
@given(
    _configs(NAN_SCALARS, ODD_KEYS), _configs(NAN_SCALARS, ODD_KEYS), st.sampled_from([None, "", "trainer"])
)
def test_diff_never_raises(first: Any, second: Any, prefix: str | None) -> None:
    """Proves ``diff_configs`` returns two lists of strings for any pair of configs, a DictConfig
    against a ListConfig and a ``prefix`` included."""
    removed, added = diff_configs(_create(first), _create(second), prefix)
    assert all(isinstance(line, str) for line in removed + added)


def test_the_diff_properties_catch_a_hidden_change() -> None:
    """Proves the leaf check of the property test is not vacuous: a changed nested leaf, a key
    only one side has, and a type change are all found in an actual diff."""
    a = _create({"m": {"h": 8, "l": [1, 2]}, "x": 1})
    b = _create({"m": {"h": 4, "l": [1, 2, 3]}, "x": 1.0, "y": {"z": None}})
    removed, added = diff_configs(a, b)
    assert _reported(removed, "m.h") and _reported(added, "m.h")
    assert _reported(added, "m.l[2]") and not _reported(removed, "m.l[2]")
    assert _reported(removed, "x") and _reported(added, "x")
    assert _reported(added, "y.z")
    assert not _reported(removed + added, "m.l[0]")


# ---------------------------------------------------------------------------------------------
# The config parser

SECTION_NAMES = ["model", "task", "optimizer", "lr_scheduler", "trainer", "logger", "launcher"]
FIELD_NAMES = ["name", "hidden", "max_steps", "lr", "train_dl", "batch_size", "checkpoint", "exp_dir", "seed"]
# Component names: registered ones, and import paths into modules that are safe to import.
COMPONENT_NAMES = [
    "digits_mlp",
    "adam",
    "sl",
    "jsonl",
    "nope",
    "",
    ":",
    ":X",
    ".x:Y",
    "..:Y",
    "ml:",
    "ml.core.compose:ConfigError",
    "ml.core.compose:compose_config",
    "ml.trainers.sl:NoSuchClass",
    "no_such_module_fuzz:X",
    f"{USER_MODULE}:SumSignTask",
    "builtins:int",
    "ml.optimizers.builtin:AdamOptimizer",
]
VALUE_TEXTS = [
    "1",
    "-1",
    "0",
    "1e400",
    "nan",
    "abc",
    "null",
    "???",
    "[1,2",
    "[1, 2]",
    "{a: 1}",
    "{",
    "}",
    "'q'",
    '"',
    "${nope}",
    "${model.name}",
    "${oc.env:NO_SUCH_ENV_FUZZ}",
    "${oc.decode:'[1'}",
    "${ml.exp_name:}",
    "a: b",
    "- x",
    "&a *a",
    "!!python/object:os.system",
    "\t",
    "",
]


def _key_paths() -> st.SearchStrategy[str]:
    segment = st.one_of(
        st.sampled_from(SECTION_NAMES + FIELD_NAMES),
        st.text(alphabet="ab_.[]0 =$", min_size=0, max_size=3),
    )
    return st.lists(segment, min_size=1, max_size=4).map(".".join)


def _overrides() -> st.SearchStrategy[str]:
    value = st.one_of(
        st.sampled_from(VALUE_TEXTS + COMPONENT_NAMES),
        st.text(max_size=8).filter(lambda t: "\x00" not in t),
        st.integers().map(str),
        st.floats().map(str),
    )
    structured = st.builds(lambda k, v: f"{k}={v}", _key_paths(), value)
    named = st.builds(
        lambda s, n: f"{s}.name={n}", st.sampled_from(SECTION_NAMES), st.sampled_from(COMPONENT_NAMES)
    )
    return st.one_of(structured, named, st.text(max_size=12).filter(lambda t: "\x00" not in t))


def _yaml_documents() -> st.SearchStrategy[str]:
    """YAML dumped from random section trees (cut short, or with a character replaced), deeply
    nested brackets, and arbitrary text."""
    leaf = st.one_of(SCALARS, st.sampled_from(COMPONENT_NAMES))
    section = st.dictionaries(
        st.sampled_from(FIELD_NAMES) | st.text(alphabet="abz_", min_size=1, max_size=3),
        st.recursive(
            leaf,
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(FIELD_NAMES), c, max_size=3),
            max_leaves=6,
        ),
        max_size=4,
    )
    doc = st.dictionaries(
        st.sampled_from(SECTION_NAMES) | st.text(alphabet="abz", min_size=1, max_size=2),
        section | leaf,
        max_size=6,
    )

    def dump(tree: dict[str, Any], flow: bool) -> str:
        try:
            return yaml.safe_dump(tree, default_flow_style=flow, allow_unicode=True)
        except yaml.YAMLError:
            return ""

    dumped = st.builds(dump, doc, st.booleans())
    mutated = st.builds(
        lambda text, at, char: text[:at] + char + text[at + 1 :],
        dumped,
        st.integers(min_value=0, max_value=200),
        st.sampled_from(["\t", "[", "{", ":", "-", "'", '"', "&", "*", "!", "%", "\n", " "]),
    )
    cut = st.builds(lambda text, at: text[:at], dumped, st.integers(min_value=0, max_value=200))
    printable = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
    nested = st.builds(  # few depths: each try at a deep one is slow, and so would be shrinking it
        lambda depth, opener: "model: " + opener * depth + "\n",
        st.sampled_from([2, 50, 1200, 5000]),
        st.sampled_from(["[", "{a: ", "[{x: "]),
    )
    return st.one_of(
        dumped, mutated, cut, nested, st.text(alphabet=printable, max_size=60), st.just(USER_CONFIG)
    )


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A folder for the fuzzed files; the user module of tests/e2e/test_cli.py is importable meanwhile."""
    with tempfile.TemporaryDirectory(prefix="ml_fuzz_") as folder:
        lib = Path(folder) / "lib"
        lib.mkdir()
        (lib / f"{USER_MODULE}.py").write_text(USER_TASK)
        sys.path.insert(0, str(lib))
        try:
            yield Path(folder)
        finally:
            sys.path.remove(str(lib))
            sys.modules.pop(USER_MODULE, None)


def _compose_or_config_error(configs: list[str], overrides: list[str]) -> None:
    try:
        root = compose_config(configs, overrides)
    except ConfigError:
        return
    assert isinstance(root, DictConfig)


@PARSER_FUZZ
@given(text=_yaml_documents() | st.binary(max_size=40), overrides=st.lists(_overrides(), max_size=2))
def test_compose_of_random_yaml_returns_a_config_or_raises_config_error(
    scratch: Path, text: str | bytes, overrides: list[str]
) -> None:
    """Proves ``compose_config`` on any config file (dumped trees, trees cut short or with a bad
    character, deep nesting, arbitrary text, arbitrary bytes) plus random overrides either returns
    a DictConfig or raises ConfigError, never another exception."""
    path = scratch / "fuzz.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    _compose_or_config_error([str(path)], overrides)


@PARSER_FUZZ
@given(overrides=st.lists(_overrides(), min_size=1, max_size=4))
def test_compose_of_random_overrides_returns_a_config_or_raises_config_error(
    scratch: Path, overrides: list[str]
) -> None:
    """Proves ``compose_config`` on a valid config (USER_CONFIG of tests/e2e/test_cli.py) with any
    ``key=value`` overrides (section and field paths, odd keys, YAML fragments, interpolations,
    component names and import paths) returns a DictConfig or raises ConfigError, never another
    exception."""
    path = scratch / "user.yaml"
    if not path.exists():
        path.write_text(USER_CONFIG)
    _compose_or_config_error([str(path)], ["task.threshold=0", *overrides])


def test_the_parser_property_holds_for_known_bad_inputs(scratch: Path) -> None:
    """Proves the property's pass condition is reachable both ways: a valid config returns a
    DictConfig, and a typo'd key, a bad override and bad YAML each raise ConfigError."""
    path = scratch / "known.yaml"
    path.write_text(USER_CONFIG)
    assert isinstance(compose_config([str(path)], ["task.threshold=0"]), DictConfig)
    for overrides in (["task.threshold=0", "optimizer.lrr=1"], ["=1"], ["task.threshold=[1"]):
        with pytest.raises(ConfigError):
            compose_config([str(path)], overrides)
    path.write_text("model: {name: [\n")
    with pytest.raises(ConfigError):
        compose_config([str(path)], [])
    with pytest.raises(OmegaConfBaseException):  # not ml's to catch: a malformed interpolation
        OmegaConf.create({"a": "${"})
