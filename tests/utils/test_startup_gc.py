"""ml.utils.startup_gc: fewer collections while the ``ml`` command imports, the process's own pace after.

The ``ml`` command's side (its first module raises the threshold, ``build_objects`` puts it back
before any component is built) is tests/e2e/test_cli.py's; here, what the two functions do to a
process's collector, and that ``build_objects`` (also a launcher's, which only checks) ends the pause.
"""

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml.core.compose import build_objects, compose_config
from ml.examples.digits import DigitsMLP, DigitsMLPConfig
from ml.utils import startup_gc


@pytest.fixture(autouse=True)
def _collector_as_it_was() -> Iterator[None]:
    thresholds, frozen = gc.get_threshold(), gc.get_freeze_count()
    yield
    startup_gc._saved = None
    gc.set_threshold(*thresholds)
    if gc.get_freeze_count() > frozen:
        gc.unfreeze()


class _Node:
    """A reference cycle: freed only by the collector."""

    def __init__(self) -> None:
        self.me = self


def test_importing_collects_less_often_then_the_thresholds_return_and_the_imports_are_frozen() -> None:
    gc.set_threshold(700, 11, 12)
    startup_gc.collect_less_while_importing()
    assert gc.get_threshold() == (startup_gc.IMPORT_THRESHOLD, 11, 12)
    startup_gc.collect_less_while_importing()  # twice: still one pause, the thresholds to put back kept
    assert gc.get_threshold() == (startup_gc.IMPORT_THRESHOLD, 11, 12)

    made_while_importing = [[i] for i in range(1000)]  # tracked containers, as imports make
    garbage = weakref.ref(_Node())  # a cycle nothing refers to any more
    frozen = gc.get_freeze_count()
    startup_gc.imports_done()
    assert gc.get_threshold() == (700, 11, 12)
    assert gc.get_freeze_count() >= frozen + len(made_while_importing)
    assert garbage() is None  # collected before the freeze: frozen, it would stay for the whole run

    frozen = gc.get_freeze_count()
    startup_gc.imports_done()  # a second call: nothing left to do
    assert gc.get_freeze_count() == frozen
    assert gc.get_threshold() == (700, 11, 12)


@pytest.mark.parametrize("first", [0, 50_000], ids=["collector off", "already less often"])
def test_a_collector_set_otherwise_keeps_its_setting(first: int) -> None:
    gc.set_threshold(first, 10, 10)
    frozen = gc.get_freeze_count()
    startup_gc.collect_less_while_importing()
    assert gc.get_threshold() == (first, 10, 10)
    startup_gc.imports_done()
    assert gc.get_threshold() == (first, 10, 10)
    assert gc.get_freeze_count() == frozen  # nothing paused: the process's objects are not frozen


def test_without_the_ml_command_the_collector_is_left_alone() -> None:
    """``train_in_process`` called from a user's script (no ``ml.entry``): nothing changes."""
    gc.set_threshold(700, 10, 10)
    frozen = gc.get_freeze_count()
    startup_gc.imports_done()
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == frozen


_THRESHOLDS_SEEN: list[int] = []


class ThresholdModel(DigitsMLP):
    """A user's model that notes the collector's first threshold as it is built."""

    def __init__(self, config: DigitsMLPConfig) -> None:
        _THRESHOLDS_SEEN.append(gc.get_threshold()[0])
        super().__init__(config)


def test_every_process_builds_the_components_at_its_own_pace(tmp_path: Path) -> None:
    """``build_objects`` ends the pause before the first component: in a training process and in a
    launcher's (``mp``'s parent builds them to check the config, then waits the whole run: its
    start-up's garbage, made at 10,000, stayed there)."""
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{name: '{__name__}:ThresholdModel', hidden: 4}}\n"
        "task: {name: digits, max_steps: 1}\noptimizer: {name: sgd, lr: 0.1}\n"
        "trainer: {name: sl, exp_name: gc}\nlauncher: {name: mp}\n"
    )
    gc.set_threshold(700, 10, 10)
    startup_gc.collect_less_while_importing()
    root = compose_config([str(config)])
    assert gc.get_threshold()[0] == startup_gc.IMPORT_THRESHOLD  # composing is importing
    _THRESHOLDS_SEEN.clear()
    build_objects(root)
    assert _THRESHOLDS_SEEN == [700]
