"""The `slurm_cluster` fixture: a real single-node Slurm (munged, slurmctld, slurmd) for the session.

It writes slurm.conf into a temporary directory, starts the daemons on free ports with a private
munge socket, waits until `sinfo` says idle, and stops them by PID at the end (tests/slurm/cluster.py).
Skipped, with the reason, when the Slurm/munge binaries are missing or we are not root.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.slurm.cluster import LocalSlurm, missing_binaries


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm/munge binaries missing ({', '.join(missing)}); "
                    "install slurmd slurmctld slurm-client munge (scripts/setup.sh does, as root)")
    if os.geteuid() != 0:
        pytest.skip("a private Slurm needs root (slurmd runs jobs as root, munged runs as the munge user)")
    # Not under pytest's tmp dir: that is private to root (0700) and munged runs as the munge user.
    root = Path(tempfile.mkdtemp(prefix="me-slurm-"))
    root.chmod(0o755)
    cluster = LocalSlurm(root, cpus=8)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
