"""`hvd-yolo bench allreduce`: allreduce bandwidth of gradient-sized buffers vs memcpy.

Buffers: the gradient sets of YOLOv3 and YOLOv3-tiny (one tensor per parameter, reduced as ONE
grouped call, as the "no overlap" training step does; Horovod fuses them into its fusion
buffer) and a sweep of single flat buffers. Each in fp32 and fp16. For each, the time per
allreduce (slowest rank), the algorithm bandwidth ``bytes / time`` and the bus bandwidth
``bytes * 2(n-1)/n / time`` (the traffic each rank's link carries in a ring allreduce, so it
is comparable across world sizes), next to this machine's memcpy bandwidth (``dst.copy_(src)``
on every rank at once, same thread count), the physical limit of a shared-memory allreduce.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from hvd_yolo.bench.common import (
    MODELS,
    BenchComm,
    launch_env,
    mean_ci95,
    set_threads,
    sync_device,
    versions,
)
from hvd_yolo.cli import UsageError, write_json

DEFAULT_SWEEP_KIB = (4, 64, 1024, 4096, 16384, 65536, 262144)
QUICK_SWEEP_KIB = (64, 1024, 16384)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--backend", choices=("horovod", "ddp"), default="horovod",
                   help="horovod (hvd.allreduce) or torch.distributed (gloo CPU / nccl GPU)")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma list of gradient sets to reduce ('' for none)")
    p.add_argument("--classes", type=int, default=80, help="classes of the models' heads")
    p.add_argument("--sizes-kib", default=",".join(str(s) for s in DEFAULT_SWEEP_KIB),
                   help="comma list of flat buffer sizes in KiB ('' for none)")
    p.add_argument("--dtypes", default="fp32,fp16", help="comma list of fp32, fp16")
    p.add_argument("--quick", action="store_true",
                   help=f"short run: sweep {','.join(map(str, QUICK_SWEEP_KIB))} KiB, "
                        "yolov3-tiny only, fewer iterations")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-iterations", type=int, default=5)
    p.add_argument("--max-iterations", type=int, default=200)
    p.add_argument("--seconds-per-case", type=float, default=1.0,
                   help="aim for this much timed allreduce per buffer (between min and max iters)")
    p.add_argument("--memcpy-mib", type=float, default=256.0, help="memcpy buffer size")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: cores // ranks on the node)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--cycle-time-ms", type=float, default=None,
                   help="sets HOROVOD_CYCLE_TIME (default: 10 on CPU, Horovod's on GPU)")
    p.add_argument("--fusion-threshold-mb", type=float, default=None,
                   help="sets HOROVOD_FUSION_THRESHOLD (default: Horovod's 128 MiB; 1 MiB gave "
                        "2.3-2.6x the bus bandwidth on a 2-core CPU, see benchmarks/NOTES.md)")
    p.add_argument("--json", dest="json_path", metavar="PATH", default=None,
                   help="write the results as JSON (rank 0; '-': stdout only)")


class _Coll(BenchComm):
    """BenchComm plus the allreduce, broadcast and barrier this benchmark times."""

    def allreduce(self, tensors: list[torch.Tensor], name: str) -> None:
        """Average ``tensors`` over ranks in one call (grouped when several)."""
        if self.backend == "horovod":
            if len(tensors) == 1:
                self._dist.allreduce_(tensors[0], name=name)
            else:
                self._dist.grouped_allreduce_(tensors, name=name)
        elif len(tensors) == 1:
            import torch.distributed as tdist

            tdist.all_reduce(tensors[0])
            tensors[0].div_(self.size)
        else:
            self._ddp.allreduce_flat_(tensors)

    def broadcast_object(self, obj: Any) -> Any:
        if self.backend == "horovod":
            return self._dist.broadcast_object(obj, name="bench.bcast")
        import torch.distributed as tdist

        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.backend == "horovod":
            self._dist.barrier()
        else:
            import torch.distributed as tdist

            tdist.barrier()


def gradient_shapes(model_name: str, classes: int) -> list[tuple[int, ...]]:
    """The shapes of ``model_name``'s trainable parameters (its gradient set), in model order."""
    from hvd_yolo.model.yolov3 import build_model

    model = build_model(model_name, classes)
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def memcpy_bandwidth(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Bytes copied per second by ``dst.copy_(src)`` (best of ``repeats``)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync_device(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync_device(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def _time_case(coll: _Coll, tensors: list[torch.Tensor], name: str,
               args: argparse.Namespace) -> dict[str, Any]:
    """Time one allreduce case; every rank runs the same number of iterations."""
    for _ in range(max(1, args.warmup)):
        coll.allreduce(tensors, name)
    sync_device(coll.device)
    t0 = time.perf_counter()
    coll.allreduce(tensors, name)
    sync_device(coll.device)
    estimate = time.perf_counter() - t0
    iters = int(min(args.max_iterations, max(args.min_iterations,
                                            args.seconds_per_case / max(estimate, 1e-6))))
    iters = coll.broadcast_object(iters)
    coll.barrier()
    times = []
    for _ in range(iters):
        sync_device(coll.device)
        t0 = time.perf_counter()
        coll.allreduce(tensors, name)
        sync_device(coll.device)
        times.append(time.perf_counter() - t0)
    return {"iterations": iters, "times_s": times}


def run(args: argparse.Namespace) -> int:
    use_cuda = {"auto": None, "cpu": False, "cuda": True}[args.device]
    if args.backend == "horovod":
        from hvd_yolo.comm.horovod import horovod_settings

        horovod_settings(args.cycle_time_ms, args.fusion_threshold_mb, use_cuda)
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in ("fp32", "fp16")]
    if bad:
        raise UsageError(f"--dtypes takes fp32 and/or fp16, got {bad}")
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise UsageError(f"unknown model(s) {bad}; choose from {list(MODELS)}")
    try:
        sizes_kib = [float(s) for s in args.sizes_kib.split(",") if s]
    except ValueError as exc:
        raise UsageError(f"--sizes-kib must be numbers: {exc}") from exc
    if args.quick:
        sizes_kib, models = list(QUICK_SWEEP_KIB), [m for m in models if m == "yolov3-tiny"]
        args.seconds_per_case = min(args.seconds_per_case, 0.3)
        args.memcpy_mib = min(args.memcpy_mib, 64.0)
    set_threads(1)
    coll = _Coll(args.backend, args.threads, use_cuda)
    try:
        result = _benchmark(args, coll, models, sizes_kib, dtypes)
    finally:
        coll.close()
    if coll.rank == 0:
        _report(result)
        write_json(args.json_path, result)
    return 0


def _benchmark(args: argparse.Namespace, coll: _Coll, models: list[str], sizes_kib: list[float],
               dtypes: list[str]) -> dict[str, Any]:
    device, n = coll.device, coll.size
    coll.barrier()
    memcpy = coll.allgather_object(memcpy_bandwidth(int(args.memcpy_mib * 2**20), device))
    memcpy_bps = statistics.fmean(memcpy)
    cases = []
    plan: list[tuple[str, list[tuple[int, ...]]]] = [
        (f"{m} gradients", gradient_shapes(m, args.classes)) for m in models]
    plan += [(f"flat {kib:g} KiB", [(max(1, int(kib * 1024) // 4),)]) for kib in sizes_kib]
    for label, shapes in plan:
        for dt in dtypes:
            dtype = torch.float16 if dt == "fp16" else torch.float32
            if label.startswith("flat"):  # same bytes in either dtype for a sweep point
                shapes_dt = [(s[0] * 4 // dtype.itemsize,) for s in shapes]
            else:  # a gradient set: same element count, so fp16 is half the bytes
                shapes_dt = shapes
            tensors = [torch.rand(s, device=device).to(dtype) for s in shapes_dt]
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            timed = _time_case(coll, tensors, f"bench.{label}.{dt}".replace(" ", "_"), args)
            slowest = [max(ts) for ts in zip(*coll.allgather_object(timed["times_s"]))]
            t_mean, t_ci = mean_ci95(slowest)
            t_med = statistics.median(slowest)
            algbw = nbytes / t_med
            busbw = algbw * 2 * (n - 1) / n
            cases.append({
                "buffer": label, "dtype": dt, "tensors": len(tensors), "bytes": nbytes,
                "iterations": timed["iterations"], "time_median_s": t_med,
                "time_mean_s": t_mean, "time_ci95_s": t_ci,
                "algbw_GBps": algbw / 1e9, "busbw_GBps": busbw / 1e9,
                "busbw_vs_memcpy": busbw / memcpy_bps if n > 1 else None,
            })
            del tensors
    return {
        "benchmark": "allreduce",
        "backend": args.backend,
        "world_size": n,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "env": launch_env(),
        "memcpy_bytes": int(args.memcpy_mib * 2**20),
        "memcpy_GBps_per_rank": [b / 1e9 for b in memcpy],
        "memcpy_GBps": memcpy_bps / 1e9,
        "op": "average",
        "cases": cases,
    }


def _report(r: dict[str, Any]) -> None:
    print(f"bench allreduce: {r['backend']} ranks={r['world_size']} device={r['device']} "
          f"threads={r['threads']}; memcpy {r['memcpy_GBps']:.2f} GB/s per rank (all at once)")
    print(f"{'buffer':<24}{'dtype':>6}{'MiB':>10}{'time ms':>11}{'algbw GB/s':>12}"
          f"{'busbw GB/s':>12}{'bus/memcpy':>11}")
    for c in r["cases"]:
        frac = "-" if c["busbw_vs_memcpy"] is None else f"{c['busbw_vs_memcpy']:.2f}"
        print(f"{c['buffer']:<24}{c['dtype']:>6}{c['bytes'] / 2**20:>10.2f}"
              f"{c['time_median_s'] * 1000:>11.3f}{c['algbw_GBps']:>12.2f}"
              f"{c['busbw_GBps']:>12.2f}{frac:>11}", flush=True)
