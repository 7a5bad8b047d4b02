#!/usr/bin/env python
"""Open MPI's TCP transport between simulated nodes: plain MPI_Allreduce vs Horovod's.

    .venv/bin/python benchmarks/mpi_transport.py [--link 25mbit] [--settings openmpi,links4,line]

On a 2-node simulated cluster (hvd_yolo.cluster), for each Open MPI TCP setting (keys of
cluster_bench.MPI_CONFIGS: ``openmpi`` is Open MPI's defaults, ``line`` the package's line): an
``MPI_Allreduce`` of 4 and 16 MiB fp32 through mpi4py (out of place and in place, as Horovod
calls it), then ``hvd.allreduce_`` of the same buffers (Horovod's MPI path, cycle 10 ms), each
the median of 3 calls, as a fraction of the link rate (bytes x 2(n-1)/n / time). The mpirun
line is launch.mpirun_argv's with the setting's TCP options. Prints one line per measurement
and writes benchmarks/results/cluster/mpi_transport.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cluster_bench import MPI_CONFIGS  # noqa: E402
from hvd_yolo import cluster  # noqa: E402
from hvd_yolo.launch import mpirun_argv  # noqa: E402

NAME, SUBNET = "mpitr", "198.18.9.0/24"
PROBE = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    rate, which = float(sys.argv[1]), sys.argv[2]
    out = {}
    if which == "mpi":
        from mpi4py import MPI
        c = MPI.COMM_WORLD
        rank, n = c.Get_rank(), c.Get_size()
    else:
        import torch, horovod.torch as hvd
        hvd.init()
        rank, n = hvd.rank(), hvd.size()
    for mib in (4, 16):
        a = np.ones(mib * 2**18, dtype=np.float32)
        b = np.empty_like(a)
        modes = ("out", "in") if which == "mpi" else ("horovod",)
        for mode in modes:
            ts = []
            for i in range(4):
                if which == "mpi":
                    c.Barrier()
                t0 = time.perf_counter()
                if mode == "out":
                    c.Allreduce(a, b)
                elif mode == "in":
                    c.Allreduce(MPI.IN_PLACE, a)
                else:
                    hvd.allreduce_(torch.from_numpy(a), name=f"t{mib}.{i}")
                ts.append(time.perf_counter() - t0)
            t = sorted(ts[1:])[1]
            out[f"{mode} {mib} MiB"] = a.nbytes * 2 * (n - 1) / n * 8 / t / rate
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
""")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--link", default="25mbit")
    p.add_argument("--settings", default="openmpi,links4,line",
                   help="Open MPI TCP settings to compare (keys of cluster_bench.MPI_CONFIGS)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cluster" /
                                        "mpi_transport.json"))
    args = p.parse_args()
    missing = cluster.missing_requirements()
    if missing:
        print("skipped: no simulated cluster here, missing: " + "; ".join(missing))
        return 0
    rate = cluster.rate_bps(args.link)
    hosts = ",".join(f"{cluster.hostname(NAME, k)}:1" for k in (1, 2))
    record = {"link": args.link, "load_before": os.getloadavg(), "results": {},
              "created": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    cluster.down(NAME)
    cluster.up(cluster.Spec(name=NAME, nodes=2, link=args.link, subnet=SUBNET))
    try:
        for setting in args.settings.split(","):
            for which in ("mpi", "horovod"):
                argv = mpirun_argv(2, hosts=hosts, network=SUBNET, **MPI_CONFIGS[setting]) + [
                    sys.executable, "-c", PROBE, str(rate), which]
                proc = subprocess.run(cluster.exec_argv(NAME, argv), capture_output=True,
                                      text=True, timeout=600, cwd=ROOT,
                                      env={**os.environ, "HOROVOD_CYCLE_TIME": "10",
                                           "OMP_NUM_THREADS": "1"})
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                got = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr[-500:]}
                record["results"][f"{setting} {which}"] = got
                print(f"{setting} {which}: "
                      + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in got.items()), flush=True)
    finally:
        cluster.down(NAME)
    record["load_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
