"""Fixtures that start a real local SLURM cluster (see docs/slurm_testing.md)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.slurm.cluster import LocalSlurmCluster


def _why_no_slurm() -> str | None:
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        return "slurmctld/munged not found: run `bash tools/install_slurm.sh` (slurm-wlm + munge)"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd runs jobs as any user)"
    return None


def _cluster(tmp_path_factory: pytest.TempPathFactory, nodes: int) -> Iterator[LocalSlurmCluster]:
    reason = _why_no_slurm()
    if reason is not None:
        pytest.skip(reason)
    with LocalSlurmCluster(
        tmp_path_factory.mktemp(f"slurm{nodes}n"), nodes=nodes, cpus_per_node=2
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurmCluster]:
    """A one-node cluster (2 CPUs), shared by the tests of a module."""
    yield from _cluster(tmp_path_factory, nodes=1)


@pytest.fixture(scope="module")
def slurm_cluster_2nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurmCluster]:
    """Two emulated nodes (2 CPUs each) on this host, shared by the tests of a module."""
    yield from _cluster(tmp_path_factory, nodes=2)
