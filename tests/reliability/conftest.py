"""Fixtures of the fault-injection suite: how many faults to inject, and the seed that places them.

``ML_RELIABILITY_KILLS`` (default 6) and ``ML_RELIABILITY_SIGNALS`` (default 5) set the counts;
``make reliability`` runs 200 and 100. ``ML_RELIABILITY_SEED`` replays a run: without it each
session draws a fresh seed, and every test prints the one it used.
"""

import os
import secrets

import pytest

DEFAULT_KILLS = 6
DEFAULT_SIGNALS = 5


def _count(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@pytest.fixture(scope="session")
def kill_count() -> int:
    """How many times the kill test SIGKILLs its run (``ML_RELIABILITY_KILLS``, default 6)."""
    return _count("ML_RELIABILITY_KILLS", DEFAULT_KILLS)


@pytest.fixture(scope="session")
def signal_count() -> int:
    """How many SIGTERM/SIGUSR1 the signal test sends in all (``ML_RELIABILITY_SIGNALS``, default 5)."""
    return _count("ML_RELIABILITY_SIGNALS", DEFAULT_SIGNALS)


@pytest.fixture(scope="session")
def reliability_seed() -> int:
    """The seed of every random choice of the suite (``ML_RELIABILITY_SEED``, else a fresh one)."""
    value = os.environ.get("ML_RELIABILITY_SEED", "")
    if value:
        if not value.isdigit():
            raise pytest.UsageError(f"ML_RELIABILITY_SEED must be a non-negative integer, got {value!r}")
        return int(value)
    return secrets.randbelow(2**32)
