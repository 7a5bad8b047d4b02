"""benchmarks/cluster_bench.py's core pinning (--comm-pin): each rank runs on the core its rank
names, and the baseline's node k on core k-1, so a baseline and a job share the cores alike."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks import cluster_bench as cb

AFFINITY = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]


@pytest.mark.parametrize("var", ["OMPI_COMM_WORLD_RANK", "HOROVOD_RANK"])
def test_a_pinned_rank_runs_on_the_core_its_rank_names(var: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMPI_COMM_WORLD_RANK",
                                                            "HOROVOD_RANK")}
    for rank in range(cb.CORES + 1):
        out = subprocess.run(cb.pinned(AFFINITY, cb.RANK_CORE), env={**env, var: str(rank)},
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == str([rank % cb.CORES]), (rank, out)


def test_job_argv_pins_the_application_only_when_asked() -> None:
    """The launcher's line is unchanged; only the application (hvd-yolo ARGS) is wrapped."""
    plain = cb.job_argv("mpi", 2, cb.hosts_of(2), ["bench", "train"])
    pinned = cb.job_argv("mpi", 2, cb.hosts_of(2), ["bench", "train"], pin=True)
    app = len(plain) - 3  # hvd-yolo bench train
    assert "taskset" not in " ".join(plain)
    assert pinned[:app] == plain[:app]
    assert pinned[app:] == cb.pinned(plain[app:], cb.RANK_CORE)
