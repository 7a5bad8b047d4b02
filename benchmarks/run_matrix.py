#!/usr/bin/env python
"""Run the benchmark matrix and write benchmarks/results/{*.json, RESULTS.md, scaling.png}.

    .venv/bin/python benchmarks/run_matrix.py            # full matrix, ~15 min on 2 cores
    .venv/bin/python benchmarks/run_matrix.py --quick    # smoke run, ~3 min
    .venv/bin/python benchmarks/run_matrix.py --report-only   # re-make RESULTS.md/PNG
    .venv/bin/python benchmarks/run_matrix.py --models yolov3 --iterations 10 --no-data \
        --no-allreduce --merge    # re-measure a subset, keep the other runs' results

Training throughput (`hvd-yolo bench train`) for each model at np in --nps (1 thread per rank,
so the work per rank is the same at every np: weak scaling), Horovod and torch DDP, fp32/fp16
gradients, with and without overlap; allreduce bandwidth (`hvd-yolo bench allreduce`) for both
backends; data loading (`hvd-yolo bench data`) shards vs files. Every multi-rank job uses the
tests' Open MPI line (tests/mpi_harness.py: `mpirun_argv`), DDP included (it takes rank/size
from Open MPI's environment). Ratios (efficiency, Horovod/DDP, fp16/fp32, overlap) compare runs
of one invocation, so run it on a quiet machine. Each run has a timeout; a failed run is
reported in RESULTS.md and the rest goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_report  # noqa: E402
from tests.mpi_harness import mpirun_argv  # noqa: E402

VENV_BIN = Path(sys.executable).parent
HVD_YOLO = str(VENV_BIN / "hvd-yolo") if (VENV_BIN / "hvd-yolo").exists() else "hvd-yolo"

# Horovod settings measured to be best on a 2-core CPU machine (benchmarks/NOTES.md).
DEFAULT_CYCLE_TIME_MS = 10.0


@dataclass
class Job:
    """One benchmark process (or mpirun job)."""

    name: str
    np: int
    argv: list[str]  # hvd-yolo arguments
    timeout: float
    mpi: bool = True
    meta: dict[str, Any] = field(default_factory=dict)


def _model_plan(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [dict(model="yolov3-tiny", size=256, batch=4, iterations=4, warmup=1, full=True)]
    return [
        dict(model="yolov3-tiny", size=320, batch=8, iterations=8, warmup=2, full=True),
        dict(model="yolov3", size=416, batch=2, iterations=4, warmup=1, full=False),
    ]


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """The list of runs, ordered so that runs that are compared follow each other."""
    nps = sorted({int(n) for n in args.nps.split(",")})
    top = nps[-1]
    jobs: list[Job] = []
    hvd_knobs = ["--cycle-time-ms", str(args.cycle_time_ms)]
    if args.fusion_threshold_mb is not None:
        hvd_knobs += ["--fusion-threshold-mb", str(args.fusion_threshold_mb)]
    for m in _model_plan(args.quick):
        if args.models and m["model"] not in args.models.split(","):
            continue
        if args.iterations:
            m = {**m, "iterations": args.iterations}
        base = ["bench", "train", "--model", m["model"], "--size", str(m["size"]),
                "--batch-size", str(m["batch"]), "--iterations", str(m["iterations"]),
                "--warmup", str(m["warmup"]), "--threads", str(args.threads), "--quiet"]
        tag = f"{m['model']}_{m['size']}"
        # generous per-run timeout: startup plus 4x the expected step time
        timeout = 180 + (m["iterations"] + m["warmup"]) * (40 if m["model"] == "yolov3" else 10)

        def add(np: int, backend: str, comp: str, overlap: str, extra: list[str] | None = None,
                suffix: str = "", _m=m, _base=base, _tag=tag, _timeout=timeout) -> None:
            knobs = hvd_knobs if backend == "horovod" and extra is None else (extra or [])
            mode = "overlap" if overlap == "on" else "nooverlap"
            name = f"train_{_tag}_np{np}_{backend}_{comp}_{mode}{suffix}"
            jobs.append(Job(name, np, _base + ["--backend", backend, "--compression", comp,
                                               "--overlap", overlap] + knobs, _timeout,
                            meta=dict(kind="train", model=_m["model"], size=_m["size"],
                                      settings="stock" if suffix else "tuned")))

        for np in nps:
            if np == 1:
                add(1, "horovod", "none", "on")
                continue
            add(np, "horovod", "none", "on")
            if not args.no_ddp:
                add(np, "ddp", "none", "on")
            if np != top:
                continue
            if m["full"]:
                add(np, "horovod", "fp16", "on")
                if not args.no_ddp:
                    add(np, "ddp", "fp16", "on")
                add(np, "horovod", "none", "off")
                if not args.no_ddp:
                    add(np, "ddp", "none", "off")
                if not args.quick:
                    add(np, "horovod", "fp16", "off")
                    if not args.no_ddp:
                        add(np, "ddp", "fp16", "off")
                    # Horovod with its stock settings (1 ms cycle), to show what tuning buys.
                    add(np, "horovod", "none", "on", extra=[], suffix="_stock")
            else:
                add(np, "horovod", "fp16", "on")
                add(np, "horovod", "none", "off")
    if top > 1 and not args.no_allreduce:
        ar = ["bench", "allreduce"] + (["--quick"] if args.quick else [])
        ar += ["--threads", str(args.threads)]
        for backend in ("horovod",) + (() if args.no_ddp else ("ddp",)):
            knobs = hvd_knobs if backend == "horovod" else []
            jobs.append(Job(f"allreduce_np{top}_{backend}", top,
                            ar + ["--backend", backend] + knobs, 300 if args.quick else 420,
                            meta=dict(kind="allreduce")))
        if args.fusion_threshold_mb is None:
            # Horovod's 128 MiB fusion buffer streams every pass of Open MPI's shared-memory
            # allreduce through DRAM; 1 MiB pieces stay in cache (benchmarks/NOTES.md).
            jobs.append(Job(f"allreduce_np{top}_horovod_fusion1MiB", top,
                            ar + ["--backend", "horovod", "--sizes-kib", ""] + hvd_knobs
                            + ["--fusion-threshold-mb", "1"], 300 if args.quick else 420,
                            meta=dict(kind="allreduce")))
    if not args.no_data:
        data = ["bench", "data", "--images", "64" if args.quick else "256", "--workers", "0,1",
                "--passes", "1" if args.quick else "2"]
        jobs.append(Job("data", 1, data, 300, mpi=False, meta=dict(kind="data")))
    return jobs


def _data_bench_available() -> bool:
    return (ROOT / "hvd_yolo" / "bench" / "data.py").exists()


def run_job(job: Job, out_dir: Path, extra_mpi: list[str], dry: bool) -> dict[str, Any]:
    json_path = out_dir / f"{job.name}.json"
    cmd = [HVD_YOLO, *job.argv, "--json", str(json_path)]
    argv = (mpirun_argv(job.np) + extra_mpi + ["-x", "OMP_NUM_THREADS"] + cmd) if job.mpi else cmd
    relative = [a.replace(f"{ROOT}/", "") for a in argv]  # no build-machine paths in results
    record: dict[str, Any] = {"name": job.name, "np": job.np, "argv": relative, **job.meta}
    if dry:
        print(shlex.join(argv))
        return record
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    json_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=job.timeout, env=env,
                              cwd=ROOT, start_new_session=True)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = -1
        output = f"TIMEOUT after {job.timeout:.0f} s\n{exc.stdout or ''}{exc.stderr or ''}"
    record["seconds"] = time.perf_counter() - t0
    record["returncode"] = rc
    if rc == 0 and json_path.exists():
        record["result_file"] = json_path.name
    else:
        record["error"] = "\n".join(str(output).strip().splitlines()[-15:])
    (out_dir / f"{job.name}.log").write_text(str(output))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (~3 min)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--nps", default="1,2", help="rank counts (default 1,2; up to the core count)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--models", default="", help="comma list to restrict the training models")
    p.add_argument("--cycle-time-ms", type=float, default=DEFAULT_CYCLE_TIME_MS,
                   help=f"HOROVOD_CYCLE_TIME for the Horovod runs (default {DEFAULT_CYCLE_TIME_MS})")
    p.add_argument("--fusion-threshold-mb", type=float, default=None,
                   help="HOROVOD_FUSION_THRESHOLD for the Horovod runs (default: Horovod's 128)")
    p.add_argument("--mpirun-arg", action="append", default=[],
                   help="extra argument for mpirun (repeat), e.g. --mpirun-arg=--bind-to ...")
    p.add_argument("--iterations", type=int, default=0,
                   help="timed iterations of every training run (default: per model, 8 or 4)")
    p.add_argument("--merge", action="store_true",
                   help="keep the existing matrix.json's other runs (replace same-named ones)")
    p.add_argument("--no-ddp", action="store_true", help="skip the DDP baseline")
    p.add_argument("--no-allreduce", action="store_true")
    p.add_argument("--no-data", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--report-only", action="store_true",
                   help="re-make RESULTS.md and the plot from the JSON in --out")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_report(out_dir)
        return 0
    if not args.no_data and not _data_bench_available():
        print("run_matrix: hvd_yolo/bench/data.py not found: skipping the data-loader benchmark")
        args.no_data = True
    jobs = plan_jobs(args)
    t_start = time.perf_counter()
    records = []
    for i, job in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {job.name} ...", end=" ", flush=True)
        rec = run_job(job, out_dir, args.mpirun_arg, args.dry_run)
        records.append(rec)
        if not args.dry_run:
            status = "ok" if "error" not in rec else f"FAILED (rc {rec['returncode']})"
            print(f"{status} in {rec['seconds']:.0f} s", flush=True)
    if args.dry_run:
        return 0
    merged_from = None
    if args.merge and (out_dir / "matrix.json").exists():
        old = json.loads((out_dir / "matrix.json").read_text())
        mine = {r["name"] for r in records}
        records = [r for r in old["runs"] if r["name"] not in mine] + records
        merged_from = {k: old.get(k) for k in ("created", "seconds", "machine")}
    manifest = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": time.perf_counter() - t_start,
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(),
                    "cores": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()},
        "launch": shlex.join(mpirun_argv(2) + args.mpirun_arg),
        "threads_per_rank": args.threads,
        "horovod_settings": {"HOROVOD_CYCLE_TIME": args.cycle_time_ms,
                             "HOROVOD_FUSION_THRESHOLD_MB": args.fusion_threshold_mb},
        "runs": records,
        "merged_into": merged_from,  # --merge: the earlier invocation whose other runs are kept
    }
    (out_dir / "matrix.json").write_text(json.dumps(manifest, indent=1) + "\n")
    write_report(out_dir)
    failed = [r["name"] for r in records if "error" in r]
    print(f"done in {manifest['seconds'] / 60:.1f} min; {len(records) - len(failed)} ok"
          + (f", FAILED: {', '.join(failed)}" if failed else "")
          + f"; see {out_dir / 'RESULTS.md'}")
    return 1 if failed else 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
