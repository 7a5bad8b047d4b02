"""`hvd-yolo train` forks its DataLoader workers once, while it builds the run, and keeps them
for every epoch and evaluation (hvd_yolo.data.workers: on Python before 3.12, a worker forked
while Horovod frees a finished collective's tensors can hang before its first line; a 2-rank run
that forked at every epoch and evaluation hung at its 27th epoch). Each rank prints its
children's pids at every step and every save: they must be the same throughout."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.train_runs import train_args
from tests.mpi_harness import run_job

pytestmark = pytest.mark.mpi

WORKERS_AT_EVENTS = """
import multiprocessing
import sys
from hvd_yolo.loop import events


def show(**_):
    print(f"workers={sorted(p.pid for p in multiprocessing.active_children())}", flush=True)


events.on("step", show)
events.on("save", show)
from hvd_yolo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_workers_are_forked_once_and_serve_every_epoch_and_evaluation(
        shards: Path, tmp_path: Path) -> None:
    res = run_job([sys.executable, "-c", WORKERS_AT_EVENTS, *train_args(
        shards, tmp_path / "run", "--set", f"data.val={shards}", "--set", "eval.every=1",
        size=96, epochs=3)], np=2, timeout=400)
    assert sum("mAP@0.5" in line for line in res.rank_lines(0)) == 3, res.output  # 3 evaluations
    workers = []
    for rank in (0, 1):
        seen = [line for line in res.rank_lines(rank) if line.startswith("workers=")]
        assert len(seen) >= 3 * 2 + 3, seen  # every step (3 epochs x >= 2 steps) and save
        assert len(set(seen)) == 1, seen  # never a new worker
        pids = json.loads(seen[0].split("=", 1)[1])
        assert len(pids) == 2, pids  # data.workers=1: the training and the evaluation worker
        workers += pids
    # and none outlives the run
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
