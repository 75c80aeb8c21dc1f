"""Fixtures for the Slurm launch tests: one real one-node cluster per session (tests/launch/slurm)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node Slurm cluster; skips (with the reason and the daemons' logs) only where Slurm
    cannot start. Stopped at the end of the session, even after failures."""
    from tests.launch.slurm.cluster import SlurmCluster, SlurmUnavailable

    cluster = SlurmCluster()
    try:
        cluster.__enter__()
    except SlurmUnavailable as e:
        pytest.skip(f"Slurm cannot start here: {e}")
    try:
        yield cluster
    finally:
        cluster.__exit__(None, None, None)
