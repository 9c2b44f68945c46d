"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.slurm_cluster import SlurmCluster, ensure_slurm_installed


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
