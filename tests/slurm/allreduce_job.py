"""A minimal real Horovod job: every rank allreduces (rank + 1) and writes what it saw.

``python allreduce_job.py OUT`` on N ranks writes ``OUT/rank{r}.json`` with the rank, size,
local rank, the allreduce result (must be N (N + 1) / 2) and the Slurm/MPI identity it ran
under, and prints ``rank=R size=N allreduce=S``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from hvd_yolo.comm import horovod as dist


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    ctx = dist.init(threads=1)
    total = float(dist.allreduce_sum(float(ctx.rank + 1), name="allreduce_job.sum"))
    gathered = dist.allgather_object(ctx.rank, name="allreduce_job.ranks")
    record = {"rank": ctx.rank, "size": ctx.size, "local_rank": ctx.local_rank,
              "allreduce": total, "allgather": gathered, "host": socket.gethostname(),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "slurm_procid": os.environ.get("SLURM_PROCID"),
              "ompi_rank": os.environ.get("OMPI_COMM_WORLD_RANK"),
              "pmix_rank": os.environ.get("PMIX_RANK")}
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(record))
    print(f"rank={ctx.rank} size={ctx.size} allreduce={total}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
