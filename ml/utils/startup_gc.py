"""Python's garbage collector while the ``ml`` command imports torch: it collects less often.

Importing torch makes about 200,000 objects that live as long as the process, and
``torch._dynamo`` (which torch's optimizers import when the first one is made) as many again. The
collector runs each time 700 more objects are tracked than freed, and its full collections walk
every object made so far: importing torch, then ``torch._dynamo``, spent 0.45 s of 2.1 s in the
collector (measured with ``gc.callbacks``, 2 cores), 0.35 s of it in ``torch._dynamo``'s import,
where every full collection walked torch's objects again.

So the command's first module (:mod:`ml.entry`) calls :func:`collect_less_while_importing`: a
collection every 10,000 new objects while the config is composed (which imports torch, ml and
the modules of the user's components). :func:`imports_done`, which
:func:`ml.core.compose.build_objects` calls before it builds any component (in every process that
builds them: one that trains, and a launcher's, which builds them to check the config), puts the
thresholds back, collects once, and freezes what is left (``gc.freeze``): later collections,
those during ``torch._dynamo``'s import among them, skip torch's objects (0.21-0.24 s in the
collector for both imports then, 0.08 s of it the one collection). A 3-step ``ml train`` of digits took 2.92 s
of CPU before and 2.34 s after (whole process, median of 8 interleaved runs): 0.16 s less
collecting while it runs, and 0.4 s less in the interpreter's exit (after the last ``atexit``
hook), whose teardown collections skip frozen objects.

What the user's code builds (the model, the data sets) is collected at Python's own pace and never
frozen: a start-up that makes cyclic garbage does not grow its peak memory, and garbage made later
is freed. Used as a library (a trainer in the user's own script), nothing here changes the
process's collector.
"""

from __future__ import annotations

import gc

IMPORT_THRESHOLD = 10_000  # new objects between collections while importing (Python's default: 700)

_saved: tuple[int, int, int] | None = None  # the thresholds to put back, while importing


def collect_less_while_importing() -> None:
    """Raises the collector's first threshold to :data:`IMPORT_THRESHOLD` until :func:`imports_done`.

    A process whose collector is off (threshold 0) or already collects less often keeps its setting.
    """
    global _saved
    if _saved is not None:
        return
    thresholds = gc.get_threshold()
    if 0 < thresholds[0] < IMPORT_THRESHOLD:
        _saved = thresholds
        gc.set_threshold(IMPORT_THRESHOLD, *thresholds[1:])


def imports_done() -> None:
    """The thresholds as they were; one collection, then what is left frozen. Nothing if
    :func:`collect_less_while_importing` changed nothing."""
    global _saved
    if _saved is None:
        return
    gc.set_threshold(*_saved)
    _saved = None
    gc.collect()  # the imports' own garbage is freed, not frozen
    gc.freeze()
