"""Shared pytest fixtures, and the device markers.

- ``@pytest.mark.cuda``: needs a CUDA GPU; skipped unless ``torch.cuda.is_available()``.
- ``@pytest.mark.cpu``: the test pins CPU numbers or CPU code paths (exact losses, page faults, the
  direct fused-Adam call): it runs with ``ML_DEVICE=cpu``, which every trainer it makes and every
  subprocess that inherits the environment obey, whatever GPU the machine has. Unmarked tests run
  on the device ``auto`` picks (a GPU where there is one), so that the suite exercises it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.slurm_cluster import SlurmCluster, ensure_slurm_installed


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips the ``cuda`` tests on a machine without a usable CUDA GPU."""
    del config
    wanting = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not wanting:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in wanting:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _device_marker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """``@pytest.mark.cpu``: ``ML_DEVICE=cpu`` for the test and the subprocesses it starts."""
    if request.node.get_closest_marker("cpu") is not None:
        monkeypatch.setenv("ML_DEVICE", "cpu")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A real one-node Slurm cluster for the whole session (installs slurm-wlm if needed, else skips).

    Pass ``slurm_cluster.env`` to sbatch/squeue/scontrol/scancel, or use its helpers (``submit``,
    ``wait_for_state``, ...). Both daemons and every job process are gone after the session.
    """
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster needs root (slurmd launches jobs as root)")
    reason = ensure_slurm_installed()
    if reason is not None:
        pytest.skip(reason)
    with SlurmCluster() as cluster:
        yield cluster
