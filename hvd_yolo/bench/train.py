"""`hvd-yolo bench train`: synthetic training-step throughput, Horovod or torch DDP.

In the spirit of Horovod's ``pytorch_synthetic_benchmark.py``: a fixed random batch (and a few
random boxes per image for the real ``YoloLoss``), warm-up iterations, then timed iterations of
forward, backward, gradient allreduce and SGD step. Rank 0 prints img/s per rank (mean and 95%
confidence interval over the timed iterations) and the total, and writes JSON with every rank's
per-iteration times and the time each spent waiting for the allreduce.

``--overlap on``: each gradient's allreduce starts from its backward hook (Horovod's
``DistributedOptimizer``, DDP's buckets); the wait is what is left after backward
(``optimizer.synchronize()``). ``--overlap off``: all gradients are averaged after backward in
one grouped call (``hvd.grouped_allreduce``; one flat ``all_reduce`` for DDP), so its time is the
whole allreduce time; comparing the two gives the fraction that overlap hides.

Launch: ``mpirun -np N ... hvd-yolo bench train ...`` for both backends (DDP takes rank and size
from Open MPI's environment, see ``hvd_yolo.bench.ddp``), or ``torchrun`` for ``--backend ddp``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from hvd_yolo.bench.common import (
    MODELS,
    BenchComm,
    launch_env,
    mean_ci95,
    set_threads,
    sync_device,
    synthetic_batch,
    versions,
)
from hvd_yolo.cli import UsageError, write_json
from hvd_yolo.config import COMPRESSIONS, SYNCS, DistConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--backend", choices=("horovod", "ddp"), default="horovod")
    p.add_argument("--model", choices=MODELS, default="yolov3-tiny")
    p.add_argument("--size", type=int, default=320, help="input size in pixels (multiple of 32)")
    p.add_argument("--batch-size", type=int, default=8, help="images per rank per backward pass")
    p.add_argument("--accumulate", type=int, default=1,
                   help="backward passes per optimizer step (allreduce once every k)")
    p.add_argument("--classes", type=int, default=80, help="number of classes (80: COCO-sized head)")
    p.add_argument("--loss", choices=("yolo", "sumsq"), default="yolo",
                   help="yolo: the real YoloLoss on random boxes; sumsq: sum of squared outputs")
    p.add_argument("--compression", choices=COMPRESSIONS, default="none")
    p.add_argument("--overlap", choices=("on", "off"), default="on")
    p.add_argument("--sync", choices=SYNCS, default="allreduce",
                   help="local: each rank steps on its own gradients, weights averaged every "
                        "--local-steps steps (Horovod only, --overlap on)")
    p.add_argument("--local-steps", type=int, default=4, help="--sync local: steps per average")
    p.add_argument("--local-overlap", action="store_true",
                   help="--sync local: averages sent during the next period (dist.local_overlap; "
                        "time whole periods: --warmup, --iterations multiples of --local-steps)")
    p.add_argument("--powersgd-rank", type=int, default=4, help="--compression powersgd: rank r")
    p.add_argument("--powersgd-start-step", type=int, default=0,
                   help="--compression powersgd: plain allreduce before this step (warm-up "
                        "iterations count)")
    p.add_argument("--iterations", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per rank (default: cores // ranks on the node)")
    p.add_argument("--interop-threads", type=int, default=1, help="torch inter-op threads")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--cycle-time-ms", type=float, default=None,
                   help="Horovod: sets HOROVOD_CYCLE_TIME before init (default: 10 on CPU, "
                        "Horovod's 1 on GPU; an exported value is kept)")
    p.add_argument("--fusion-threshold-mb", type=float, default=None,
                   help="Horovod: sets HOROVOD_FUSION_THRESHOLD before init (default: Horovod's)")
    p.add_argument("--timeline", default=None,
                   help="Horovod: write a Chrome-trace timeline of the timed iterations here")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", metavar="PATH", default=None,
                   help="write the results as JSON (rank 0; '-': stdout only)")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")


def run(args: argparse.Namespace) -> int:
    for name in ("batch_size", "accumulate", "iterations", "classes", "local_steps",
                 "powersgd_rank"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.size % 32 or args.size < 32:
        raise UsageError(f"--size must be a positive multiple of 32, got {args.size}")
    if args.backend == "ddp" and (args.sync == "local" or args.compression == "powersgd"):
        raise UsageError("--sync local and --compression powersgd run on --backend horovod "
                         "(the DDP baseline has --compression none and fp16)")
    if args.local_overlap and args.sync != "local":
        raise UsageError("--local-overlap overlaps local SGD's averages: add --sync local")
    if args.sync == "local" and args.compression == "powersgd":
        raise UsageError("--sync local averages weights: use --compression none or fp16")
    if (args.sync == "local" or args.compression == "powersgd") and args.overlap == "off":
        raise UsageError("--sync local and --compression powersgd bring their own optimizer: "
                         "use --overlap on")
    use_cuda = {"auto": None, "cpu": False, "cuda": True}[args.device]
    if args.backend == "horovod":
        from hvd_yolo.comm import horovod as dist

        dist.horovod_settings(args.cycle_time_ms, args.fusion_threshold_mb, use_cuda)
    elif args.timeline or args.cycle_time_ms is not None or args.fusion_threshold_mb is not None:
        raise UsageError("--timeline/--cycle-time-ms/--fusion-threshold-mb are "
                         "Horovod settings; drop them with --backend ddp")
    set_threads(args.interop_threads)
    comm = BenchComm(args.backend, args.threads, use_cuda)
    try:
        result = _benchmark(args, comm)
    finally:
        comm.close()
    if comm.rank == 0:
        _report(args, result)
        write_json(args.json_path, result)
    return 0


def _build(args: argparse.Namespace, device: torch.device):
    from hvd_yolo.model.yolov3 import build_model

    torch.manual_seed(args.seed)
    model = build_model(args.model, args.classes).to(device)
    if args.loss == "yolo":
        from hvd_yolo.model.loss import YoloLoss

        crit = YoloLoss(model).to(device)

        def loss_fn(outputs, targets):
            return crit(outputs, targets)[0]
    else:
        def loss_fn(outputs, targets):
            return sum((o.float() ** 2).mean() for o in outputs)
    return model, loss_fn


def _benchmark(args: argparse.Namespace, comm: BenchComm) -> dict[str, Any]:
    device = comm.device
    model, loss_fn = _build(args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    images, targets = synthetic_batch(args.batch_size, args.size, args.classes, device,
                                      args.seed + 1000 * comm.rank)
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    k, distributed = args.accumulate, comm.size > 1
    forward_model: torch.nn.Module = model
    hvd_ext = None

    if args.backend == "horovod":
        from hvd_yolo.comm import horovod as dist

        if args.overlap == "on":
            from hvd_yolo.comm import build as build_sync

            opt = build_sync(DistConfig(
                compression=args.compression, sync=args.sync, local_steps=args.local_steps,
                local_overlap=args.local_overlap, powersgd_rank=args.powersgd_rank,
                powersgd_start_step=args.powersgd_start_step), opt, model, accumulate=k, seed=args.seed)
        else:
            hvd_ext = dist  # --overlap off: one grouped allreduce after backward
        dist.broadcast_state(model, opt.optimizer if args.overlap == "on" else opt)
        if args.overlap == "on":
            opt.start_at(0)  # after the broadcast, as the training loop (local SGD's start)
    else:
        ddp = comm._ddp
        if args.overlap == "on" and distributed:
            forward_model = ddp.wrap(model, comm.ddp_ctx, args.compression)
        else:
            ddp.broadcast_parameters(model)

    def one_iteration() -> tuple[float, float, float, float, float]:
        """(forward+backward, allreduce wait, optimizer step, process CPU, main-thread CPU) s.

        Process CPU minus main-thread CPU is what the other threads burnt (Horovod's background
        thread, MPI/Gloo progress, torch pools): the cost of busy-polling shows up there.
        """
        sync_device(device)
        c0, m0 = time.process_time(), time.thread_time()
        t0 = time.perf_counter()
        for micro in range(k):
            no_sync = (args.backend == "ddp" and args.overlap == "on" and distributed
                       and micro < k - 1)
            ctx = forward_model.no_sync() if no_sync else contextlib.nullcontext()
            with ctx:
                loss = loss_fn(forward_model(images), targets)
                (loss / k if k > 1 else loss).backward()
        sync_device(device)
        t1 = time.perf_counter()
        if args.backend == "horovod" and args.overlap == "on":
            opt.synchronize()
            # Horovod: the training loop's per-step stop/non-finite decision (queues behind all)
            dist.nonfinite_ranks(False, None, "bench.decide")
        elif args.overlap == "off" and distributed:
            grads = [p.grad for p in params]
            if args.backend == "horovod":
                hvd_ext.grouped_allreduce_(grads, "bench.grads", args.compression)
            else:
                comm._ddp.allreduce_flat_(grads, args.compression)
        sync_device(device)
        t2 = time.perf_counter()
        opt.step()  # a GradSync's step never communicates
        opt.zero_grad()
        sync_device(device)
        t3 = time.perf_counter()
        if args.backend == "horovod" and args.overlap == "on":
            opt.after_step()  # local SGD's weight average counts as communication
        t4 = time.perf_counter()
        return (t1 - t0, t2 - t1 + t4 - t3, t3 - t2, time.process_time() - c0,
                time.thread_time() - m0)

    for _ in range(args.warmup):
        one_iteration()
    if args.timeline and comm.rank == 0:
        Path(args.timeline).parent.mkdir(parents=True, exist_ok=True)
    if args.timeline and args.backend == "horovod":
        from hvd_yolo.comm import horovod as dist

        dist.start_timeline(str(Path(args.timeline).resolve()))
    rows = []
    sent_before = opt.bytes_sent if args.backend == "horovod" and args.overlap == "on" else None
    t_start = time.perf_counter()
    for i in range(args.iterations):
        rows.append(one_iteration())
        if comm.rank == 0 and not args.quiet:
            c, w, s, cpu, main = rows[-1]
            print(f"iter {i + 1}/{args.iterations}: {c + w + s:.3f} s "
                  f"(compute {c:.3f}, allreduce wait {w:.3f}, step {s:.3f}; cpu {cpu:.3f}, "
                  f"other threads {cpu - main:.3f}), "
                  f"{args.batch_size * k / (c + w + s):.2f} img/s per rank", flush=True)
    wall = time.perf_counter() - t_start
    if args.timeline and args.backend == "horovod":
        from hvd_yolo.comm import horovod as dist

        dist.stop_timeline()
    # Every rank must end with bitwise the same weights (their gradients were averaged):
    # compare a sample of every parameter tensor exactly.
    fingerprint = torch.cat([p.detach().flatten()[:: max(1, p.numel() // 16)].float().cpu()
                             for p in params]).tolist()
    sent = None if sent_before is None else (opt.bytes_sent - sent_before) / args.iterations
    per_rank = comm.allgather_object({"rows": rows, "wall": wall, "fingerprint": fingerprint})
    return _summarize(args, comm, model, per_rank, sent)


def throughput(images_per_step: int, step_times: list[float]) -> float:
    """Images per second over the timed steps: all their images over all their time. (The mean
    of each step's rate would overstate uneven steps: local SGD's three fast steps and one
    averaging step, 1.7x for k=4 at the emulated 10 GbE rate.)"""
    return images_per_step * len(step_times) / sum(step_times)


def _summarize(args: argparse.Namespace, comm: BenchComm, model: torch.nn.Module,
               per_rank: list[dict[str, Any]], sent: float | None = None) -> dict[str, Any]:
    imgs = args.batch_size * args.accumulate
    n_iter = args.iterations
    # One optimizer step is as slow as its slowest rank: per-iteration time = max over ranks.
    step_times = [max(r["rows"][i][0] + r["rows"][i][1] + r["rows"][i][2] for r in per_rank)
                  for i in range(n_iter)]
    mean = throughput(imgs, step_times)
    _, ci = mean_ci95([imgs / t for t in step_times])
    total_imgs = imgs * n_iter * comm.size
    wall = max(r["wall"] for r in per_rank)
    waits = [[row[1] for row in r["rows"]] for r in per_rank]
    wait_mean = statistics.fmean(w for ws in waits for w in ws)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bytes_per_value = 2 if args.compression == "fp16" else 4
    ddp_wait_hidden = args.backend == "ddp" and args.overlap == "on" and comm.size > 1
    return {
        "benchmark": "train",
        "backend": args.backend,
        "model": args.model,
        "size": args.size,
        "batch": args.batch_size,
        "accumulate": args.accumulate,
        "classes": args.classes,
        "loss": args.loss,
        "compression": args.compression,
        "overlap": args.overlap,
        "sync": args.sync,
        "local_steps": args.local_steps if args.sync == "local" else None,
        "local_overlap": args.local_overlap if args.sync == "local" else None,
        "powersgd_rank": args.powersgd_rank if args.compression == "powersgd" else None,
        "powersgd_start_step": (args.powersgd_start_step if args.compression == "powersgd"
                                else None),
        "iterations": n_iter,
        "warmup": args.warmup,
        "world_size": comm.size,
        "local_size": comm.local_size,
        "device": str(comm.device),
        "threads": {"intra_op": torch.get_num_threads(),
                    "inter_op": torch.get_num_interop_threads()},
        "versions": versions(),
        "env": launch_env(),
        "parameters": n_params,
        "gradient_tensors": sum(1 for p in model.parameters() if p.requires_grad),
        # What one rank sends into the allreduce per optimizer step (0 on one rank): counted
        # by PowerSGD's and local SGD's optimizers over the timed steps (local SGD: its
        # averages amortised over them), else parameters x bytes per value.
        "allreduce_bytes_per_step": (0 if comm.size == 1 else sent if sent is not None
                                     else n_params * bytes_per_value),
        "allreduce_bytes_counted": sent is not None and comm.size > 1,
        "img_per_sec_per_rank": mean,
        "img_per_sec_per_rank_ci95": ci,
        "img_per_sec_total": mean * comm.size,
        "img_per_sec_total_wall": total_imgs / wall,
        "step_time_mean_s": statistics.fmean(step_times),
        "compute_time_mean_s": statistics.fmean(row[0] for r in per_rank for row in r["rows"]),
        # CPU seconds per step burnt by threads other than the training thread (mean of ranks).
        "other_threads_cpu_mean_s": statistics.fmean(row[3] - row[4] for r in per_rank
                                                     for row in r["rows"]),
        "process_cpu_mean_s": statistics.fmean(row[3] for r in per_rank for row in r["rows"]),
        # Time in optimizer.synchronize() (overlap on) or the grouped allreduce (overlap off).
        # DDP with overlap waits inside backward: not separable, reported as null.
        "allreduce_wait_mean_s": None if ddp_wait_hidden else wait_mean,
        "allreduce_wait_fraction": None if ddp_wait_hidden else wait_mean / statistics.fmean(
            step_times),
        "per_iteration": [
            {"rank": rank, "compute_s": [row[0] for row in r["rows"]],
             "allreduce_wait_s": [row[1] for row in r["rows"]],
             "step_s": [row[2] for row in r["rows"]],
             "process_cpu_s": [row[3] for row in r["rows"]],
             "main_thread_cpu_s": [row[4] for row in r["rows"]]}
            for rank, r in enumerate(per_rank)
        ],
        "step_time_s": step_times,
        # Largest difference between rank 0's weights and any rank's (sampled); 0 when in sync.
        "weights_max_abs_diff": max(max(abs(a - b) for a, b in zip(r["fingerprint"],
                                                                   per_rank[0]["fingerprint"]))
                                    for r in per_rank),
        "timeline": args.timeline,
    }


def _report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    wait = r["allreduce_wait_mean_s"]
    wait_s = "n/a (inside backward)" if wait is None else f"{wait * 1000:.1f} ms/step"
    print(f"bench train: {r['backend']} {r['model']} {r['size']}px batch {r['batch']}x"
          f"{r['accumulate']} compression={r['compression']} overlap={r['overlap']} "
          f"sync={r['sync']} ranks={r['world_size']} threads={r['threads']['intra_op']}")
    print(f"img/s per rank: {r['img_per_sec_per_rank']:.2f} +- "
          f"{r['img_per_sec_per_rank_ci95']:.2f} (95% CI)")
    print(f"img/s total ({r['world_size']} ranks): {r['img_per_sec_total']:.2f}; "
          f"allreduce wait {wait_s}; {r['allreduce_bytes_per_step'] / 2**20:.1f} MiB "
          f"allreduced per step", flush=True)
