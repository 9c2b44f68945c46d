"""ml.utils.startup_gc: fewer collections while the ``ml`` command starts, the process's own pace after.

The ``ml`` command's side (its first module raises the threshold, the trainer puts it back before
the first step) is tests/e2e/test_cli.py's; here, what the two functions do to a process's collector.
"""

import gc
from collections.abc import Iterator

import pytest

from ml.utils import startup_gc


@pytest.fixture(autouse=True)
def _collector_as_it_was() -> Iterator[None]:
    thresholds, frozen = gc.get_threshold(), gc.get_freeze_count()
    yield
    startup_gc._saved = None
    gc.set_threshold(*thresholds)
    if gc.get_freeze_count() > frozen:
        gc.unfreeze()


def test_start_up_collects_less_often_then_the_thresholds_return_and_its_objects_are_frozen() -> None:
    gc.set_threshold(700, 11, 12)
    startup_gc.collect_less_while_starting()
    assert gc.get_threshold() == (startup_gc.STARTUP_THRESHOLD, 11, 12)
    startup_gc.collect_less_while_starting()  # twice (a sweep's point, a second trainer): still one pause
    assert gc.get_threshold() == (startup_gc.STARTUP_THRESHOLD, 11, 12)

    made_while_starting = [[i] for i in range(1000)]  # tracked containers, as start-up makes
    frozen = gc.get_freeze_count()
    startup_gc.start_up_done()
    assert gc.get_threshold() == (700, 11, 12)
    assert gc.get_freeze_count() >= frozen + len(made_while_starting)

    frozen = gc.get_freeze_count()
    startup_gc.start_up_done()  # a second session of the process: nothing left to do
    assert gc.get_freeze_count() == frozen
    assert gc.get_threshold() == (700, 11, 12)


@pytest.mark.parametrize("first", [0, 50_000], ids=["collector off", "already less often"])
def test_a_collector_set_otherwise_keeps_its_setting(first: int) -> None:
    gc.set_threshold(first, 10, 10)
    frozen = gc.get_freeze_count()
    startup_gc.collect_less_while_starting()
    assert gc.get_threshold() == (first, 10, 10)
    startup_gc.start_up_done()
    assert gc.get_threshold() == (first, 10, 10)
    assert gc.get_freeze_count() == frozen  # nothing paused: the process's objects are not frozen


def test_a_trainer_in_the_users_own_process_leaves_its_collector_alone() -> None:
    """The trainer calls start_up_done in every session; without the ml command it changes nothing."""
    gc.set_threshold(700, 10, 10)
    frozen = gc.get_freeze_count()
    startup_gc.start_up_done()
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == frozen
