"""Keeps freed tensor memory in the process for the next step (Linux with glibc).

A training step frees and reallocates the same buffers every time: activations, gradients, the
optimizer's temporaries. With glibc's default settings, blocks from a few hundred KiB up get their own
``mmap`` and go back to the OS when freed, and the top of the heap is trimmed once more than a few
MiB of it is free. The next step then page-faults the same memory back in, zeroing every page. For a
64-1024-1024-1024-10 MLP on one CPU thread that is ~3,000 page faults and a third of the step's time
(``bench/overhead.py``'s big model: 30-38 steps/s with the defaults, 48 with this).

:func:`tune_malloc` sets the two thresholds once, for the whole process (and the processes it forks):

* ``M_MMAP_THRESHOLD`` 32 MiB: smaller blocks come from the heap, which keeps them when freed
  (32 MiB is the ceiling glibc's own adaptive threshold would grow to);
* ``M_TRIM_THRESHOLD`` 1 GiB: the heap's free top is handed back only past that.

The cost is memory the process holds between steps, up to its peak use (+19 MB of peak resident
memory on that model). Setting them also turns off glibc's adaptive thresholds, like the
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` environment variables would. PyTorch's
own CPU launcher (``torch.backends.xeon.run_cpu``) goes further and preloads jemalloc or tcmalloc
for the same reason. ``trainer.tune_malloc=false`` leaves malloc as it is.

This module is the one place that reaches malloc through ``ctypes``. Where it cannot (not
Linux, not glibc, no ``libc.so.6`` to load, no ``mallopt`` in it, ``mallopt`` refusing a setting),
:func:`tune_malloc` changes nothing, says so in the log and returns False; training goes on with
malloc's defaults, only slower for the larger models.

Measured again with ``python bench/fast_paths.py malloc`` (the 64-1024-1024-1024-10 MLP's whole
training step with torch's default Adam, one thread, each setting in two fresh interpreters; two
runs): 3,500-4,400 minor page faults a step with glibc's defaults, 20-28 tuned; 39-45 steps/s
untuned, 54-61 tuned (1.35-1.41x).
"""

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30

_tuned: bool | None = None  # the outcome of the first call: the settings last for the process


def _glibc() -> ctypes.CDLL | None:
    """The C library, if it is glibc (musl and others have no ``mallopt`` of this kind)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"; unset or an error elsewhere
    except (ValueError, OSError, AttributeError):
        return None
    if not version or not version.startswith("glibc"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc() -> bool:
    """Sets glibc's mmap and trim thresholds (see the module docstring); whether they are set.

    Does nothing, and says so in the debug log, where the C library is not glibc. Later calls return
    the first call's outcome.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    libc = _glibc()
    mallopt = getattr(libc, "mallopt", None)  # None: not glibc, or one without it
    if mallopt is None:
        logger.debug("malloc left as it is: no glibc with mallopt here")
        _tuned = False
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    _tuned = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and (
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    )
    if _tuned:
        logger.debug(
            "malloc: mmap threshold %d MiB, trim threshold %d MiB (trainer.tune_malloc)",
            MMAP_THRESHOLD_BYTES >> 20,
            TRIM_THRESHOLD_BYTES >> 20,
        )
    else:
        logger.warning("could not set glibc's malloc thresholds; memory is handed back to the OS as freed")
    return _tuned
