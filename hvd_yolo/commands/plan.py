"""`hvd-yolo plan`: measure this cluster, predict img/s per communication mode, recommend one.

Run it under the job's launcher on the nodes you will train on
(``mpi/mpirun.sh --hostfile H -np N plan --model yolov3 --size 416 --batch-size 8``). It measures
the four inputs of the scaling model (``hvd_yolo.scaling``) with Horovod itself: a tiny
allreduce (per-round overhead: cycle wait, negotiation and the hops), the same through MPI
alone when mpi4py is there (the per-hop latency), a large allreduce (the link's bytes per
second), and a few training steps of the model on synthetic batches (``bench train``'s code),
with overlap on and off (compute time and the share of the allreduce backward hides). Rank 0
prints each mode's predicted img/s and efficiency against one rank alone, recommends one, and
writes them with ``--json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from hvd_yolo import scaling
from hvd_yolo.cli import UsageError, write_json

MODES_TEXT = {"fp32": "fp32 gradients", "fp16": "fp16 gradients (dist.compression=fp16)",
              "powersgd": "PowerSGD (dist.compression=powersgd)",
              "local": "local SGD (dist.sync=local)",
              "local_overlap": "local SGD, averages overlapped (dist.sync=local, "
                               "dist.local_overlap=true)",
              "fp16_hier": "fp16, hierarchical allreduce (HOROVOD_HIERARCHICAL_ALLREDUCE=1)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--model", choices=("yolov3-tiny", "yolov3"), default="yolov3")
    p.add_argument("--size", type=int, default=416, help="input size in pixels (multiple of 32)")
    p.add_argument("--batch-size", type=int, default=8, help="images per rank per step")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per setting")
    p.add_argument("--link-mib", type=float, default=16.0,
                   help="size of the allreduce that measures the link (MiB)")
    p.add_argument("--powersgd-rank", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--project", default="",
                   help="also predict for these node counts, e.g. 8,64,512 (same link)")
    p.add_argument("--link", default=None,
                   help="the nodes' link rate if known (e.g. 25gbit): the measured bandwidth "
                        "is also shown as a fraction of it")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    p.add_argument("--json", dest="json_path", metavar="PATH", default=None,
                   help="write the measurements and predictions as JSON ('-': stdout only)")


def _bench_args(args: argparse.Namespace, overlap: str) -> argparse.Namespace:
    from hvd_yolo.bench import train as bench_train

    p = argparse.ArgumentParser()
    bench_train.add_arguments(p)
    return p.parse_args(["--model", args.model, "--size", str(args.size), "--batch-size",
                         str(args.batch_size), "--classes", str(args.classes), "--overlap",
                         overlap, "--iterations", str(args.steps), "--warmup", "1", "--quiet"])


def _time_allreduce(dist: Any, numel: int, reps: int, tag: str) -> float:
    """Median seconds of one Horovod allreduce of ``numel`` fp32 numbers (every rank)."""
    t = torch.ones(numel)
    dist.allreduce_(t, name=f"plan.{tag}.warm")
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        dist.allreduce_(t, name=f"plan.{tag}.{i}")
        times.append(time.perf_counter() - t0)
    return float(dist.allreduce_mean(statistics.median(times), f"plan.{tag}.t"))


def _mpi_tiny(reps: int) -> float | None:
    """Median seconds of an 8-byte MPI_Allreduce through mpi4py (None without it)."""
    try:
        import mpi4py

        mpi4py.rc.initialize = mpi4py.rc.finalize = False  # Horovod owns MPI's life cycle
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    buf, out = torch.ones(2).numpy(), torch.zeros(2).numpy()
    comm.Allreduce(buf, out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        comm.Allreduce(buf, out)
        times.append(time.perf_counter() - t0)
    return comm.allreduce(statistics.median(times)) / comm.Get_size()


def _forward_share(args: argparse.Namespace, device: torch.device) -> float:
    """Forward's share of forward + backward for this model, size and batch (this rank)."""
    from hvd_yolo.bench.common import synthetic_batch
    from hvd_yolo.bench.train import _build

    bargs = _bench_args(args, "on")
    model, loss_fn = _build(bargs, device)
    images, targets = synthetic_batch(args.batch_size, args.size, args.classes, device, 0)
    fwd, bwd = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        loss = loss_fn(model(images), targets)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        model.zero_grad()
    return fwd[-1] / (fwd[-1] + bwd[-1])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The scaling model's inputs on this job's ranks (every rank calls it)."""
    from hvd_yolo.bench import train as bench_train
    from hvd_yolo.bench.common import BenchComm, set_threads
    from hvd_yolo.comm import horovod as dist

    settings = dist.horovod_settings()
    set_threads(1)
    comm = BenchComm("horovod", args.threads, None)
    try:
        n, local = comm.size, comm.local_size
        tiny = _time_allreduce(dist, 1024, 10, "tiny")
        big_numel = int(args.link_mib * 2**20 / 4)
        big = _time_allreduce(dist, big_numel, 3, "big")
        mpi_tiny = _mpi_tiny(20)
        runs = {ov: bench_train._benchmark(_bench_args(args, ov), comm) for ov in ("off", "on")}
        fwd_share = _forward_share(args, comm.device)
    finally:
        comm.close()
    nodes = max(1, n // local)
    hops = 2 * (n - 1)
    alpha = mpi_tiny / hops if mpi_tiny and hops else 0.0
    cycle = max(0.0, tiny - hops * alpha)
    nbytes = big_numel * 4
    bw = (2 * (n - 1) / n * nbytes / max(big - cycle - hops * alpha, 1e-6)) if n > 1 else 0.0
    off, on = runs["off"], runs["on"]
    wait_off, wait_on = off["allreduce_wait_mean_s"], on["allreduce_wait_mean_s"]
    overlap = scaling.overlap_of(wait_on, wait_off)
    # Compute alone is the run without overlap (its allreduce runs after backward); with
    # overlap the same allreduce is in flight beside backward and slows it: the contention.
    compute = off["compute_time_mean_s"]
    contention = scaling.contention_of(on["compute_time_mean_s"], compute, wait_off,
                                       compute * (1 - fwd_share))
    half_cycle = float(settings.get("HOROVOD_CYCLE_TIME", 1.0)) / 2e3
    return {"world_size": n, "ranks_per_node": local, "nodes": nodes,
            "negotiation_s": max(0.0, cycle - half_cycle),
            "horovod": settings, "tiny_allreduce_s": tiny, "mpi_tiny_allreduce_s": mpi_tiny,
            "link_allreduce_s": big, "link_allreduce_bytes": nbytes, "alpha_s": alpha,
            "cycle_s": cycle, "bw_bytes_per_s": bw, "overlap": overlap, "contention": contention,
            "allreduce_wait_off_s": wait_off, "allreduce_wait_on_s": wait_on,
            "compute_s": compute, "forward_share": fwd_share,
            "params": off["parameters"], "img_per_sec_measured_fp32": on["img_per_sec_total"]}


def inputs_from(m: dict[str, Any], args: argparse.Namespace, shapes: list[tuple[int, ...]]
                ) -> scaling.Inputs:
    """The model's inputs from :func:`measure`'s record (one GPU/rank per node unless the job
    had several per node)."""
    return scaling.Inputs(
        compute_s=m["compute_s"], backward_s=m["compute_s"] * (1 - m["forward_share"]),
        params=m["params"], batch=args.batch_size, alpha_s=m["alpha_s"], cycle_s=m["cycle_s"],
        bw=m["bw_bytes_per_s"] or 1.0, overlap=m["overlap"], contention=m["contention"],
        gpus_per_node=m["ranks_per_node"],
        powersgd_bytes=4 * sum(scaling.powersgd_wire_elements(s, args.powersgd_rank)
                               for s in shapes),
        local_steps=args.local_steps)


def run(args: argparse.Namespace) -> int:
    for name in ("batch_size", "steps", "powersgd_rank", "local_steps", "classes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size % 32 or args.size < 32:
        raise UsageError(f"--size must be a positive multiple of 32, got {args.size}")
    if args.link_mib <= 0:
        raise UsageError(f"--link-mib must be > 0, got {args.link_mib}")
    try:
        project = [int(x) for x in args.project.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--project {args.project!r}: expected node counts, e.g. 8,64,512") \
            from None
    if any(x < 1 for x in project):
        raise UsageError(f"--project {args.project!r}: node counts must be >= 1")
    link_bps = None
    if args.link:
        from hvd_yolo.cluster import ClusterError, rate_bps

        try:
            link_bps = rate_bps(args.link)
        except ClusterError as exc:
            raise UsageError(f"--link: {exc}") from None
    m = measure(args)
    from hvd_yolo.comm import horovod as dist

    if dist.rank() != 0:
        return 0
    from hvd_yolo.model.yolov3 import build_model

    shapes = [tuple(p.shape) for p in build_model(args.model, args.classes).parameters()
              if p.requires_grad]
    x = inputs_from(m, args, shapes)
    if m["world_size"] == 1:
        print("plan: one rank: nothing is communicated; run it under mpirun on the nodes you "
              "will train on (every mode predicts the one-rank speed)")
    pred = scaling.predict(x, m["nodes"])
    best = scaling.recommend(pred)
    _print(args, m, x, pred, best)
    if link_bps:
        print(f"  the allreduce moved {m['bw_bytes_per_s'] * 8 / link_bps:.2f} of the "
              f"{args.link} link")
    projection = {str(k): scaling.predict(x, k) for k in project}
    for k, pk in projection.items():
        print(f"  {k} nodes: " + ", ".join(f"{mode} {v['img_per_sec']:.1f} img/s "
                                           f"({v['efficiency']:.2f})" for mode, v in pk.items()))
    write_json(args.json_path, {
        "command": "plan", "model": args.model, "size": args.size, "batch": args.batch_size,
        "measured": m, "inputs": x.to_dict(), "nodes": m["nodes"], "link_bps": link_bps,
        "modes": pred, "recommended": best, "projection": projection})
    return 0


def _print(args: argparse.Namespace, m: dict[str, Any], x: scaling.Inputs,
           pred: dict[str, dict], best: str) -> None:
    print(f"plan: {args.model} {args.size} px, batch {args.batch_size} per rank, "
          f"{m['world_size']} ranks on {m['nodes']} node(s)")
    print(f"  measured: compute {m['compute_s']:.3f} s/step (forward {m['forward_share']:.0%}), "
          f"link {m['bw_bytes_per_s'] * 8 / 1e9:.3f} Gbit/s per node, per-hop latency "
          f"{m['alpha_s'] * 1e6:.0f} us, per-round overhead {m['cycle_s'] * 1e3:.1f} ms, "
          f"overlap hides {m['overlap']:.0%} of the allreduce, a transfer beside compute "
          f"slows it by {m['contention']:.2f} s per s in flight")
    print(f"  {'mode':<14} {'img/s':>9} {'efficiency':>10} {'step s':>8}")
    for mode, v in pred.items():
        mark = "  <- recommended" if mode == best else ""
        print(f"  {mode:<14} {v['img_per_sec']:>9.2f} {v['efficiency']:>10.2f} "
              f"{v['step_s']:>8.3f}{mark}")
    print(f"recommended: {MODES_TEXT[best]}")
