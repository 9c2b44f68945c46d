"""Python's garbage collector while the ``ml`` command starts: it collects less often until training.

Starting ``ml train`` makes about 300,000 objects that live as long as the process (torch, then
``torch._dynamo``, which torch's optimizers import when the first one is made, omegaconf, the
model). The collector runs each time 700 more objects are tracked than freed, and its full
collections walk all of them: in a 3-step ``ml train`` of digits (2 cores, measured with
``gc.callbacks``) it ran 663 young, 61 middle and 5 full collections, 0.46 s of the run's 2.2 s
of CPU (0.36 s in the full ones); with a collection every 10,000 new objects, 48 young and 4
middle, none full, 0.14 s.

The command's first module (:mod:`ml.entry`) calls :func:`collect_less_while_starting`; the
trainer calls :func:`start_up_done` before its first step, which puts the threshold back and
freezes what the start-up made (``gc.freeze``): later collections skip those objects instead of
walking them again (about 5 us a step on the tiny MLP of ``bench/overhead.py``), and forked
data-loader workers do not write into their pages.

A collection still runs every 10,000 new objects, so a start-up that makes cyclic garbage (a data
set built in a loop) is cleaned in larger batches, not left to grow. Used as a library (a trainer
in the user's own script), nothing here changes the process's collector.
"""

from __future__ import annotations

import gc

STARTUP_THRESHOLD = 10_000  # new objects between collections while starting (Python's default: 700)

_saved: tuple[int, int, int] | None = None  # the thresholds to put back, while starting


def collect_less_while_starting() -> None:
    """Raises the collector's first threshold to :data:`STARTUP_THRESHOLD` until :func:`start_up_done`.

    A process whose collector is off (threshold 0) or already collects less often keeps its setting.
    """
    global _saved
    if _saved is not None:
        return
    thresholds = gc.get_threshold()
    if 0 < thresholds[0] < STARTUP_THRESHOLD:
        _saved = thresholds
        gc.set_threshold(STARTUP_THRESHOLD, *thresholds[1:])


def start_up_done() -> None:
    """The thresholds as they were; what the start-up made frozen. Nothing if start-up changed none."""
    global _saved
    if _saved is None:
        return
    gc.set_threshold(*_saved)
    _saved = None
    gc.freeze()
