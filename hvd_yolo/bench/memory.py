"""`hvd-yolo bench memory`: what an input size costs one rank: peak memory and img/s.

For each model, input size, batch and activation-checkpointing mode (``model.checkpoint``), a
fresh process builds the model in training mode, runs ``--warmup`` forward+backward passes
(the real ``YoloLoss`` on random boxes, as ``bench train``) and then ``--iterations`` timed ones,
and reports the activation peak of the timed passes, their img/s and their process CPU seconds
per image (on a shared CPU machine the CPU time is the steadier measure of the recomputation's
cost). ``--rounds`` repeats the whole list, alternating the configurations (none, backbone, all,
none, ...), and reports medians.

Activation peak: memory a pass needs above what exists before it (weights, gradients, the batch):
- CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the passes;
- CPU: the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) minus
  its resident set before the passes, after the warm-up's freed memory went back to the system
  (``malloc_trim``), so memory glibc kept from the warm-up does not hide the pass's; allocator
  fragmentation counts, as it does for the real process. glibc keeps freed blocks below its
  (adaptive, up to 32 MiB) mmap threshold for reuse, so this peak is above the live tensors';
  ``--malloc mmap`` runs the process with ``MALLOC_MMAP_THRESHOLD_=131072``: every freed block
  of 128 KiB or more goes back to the system at once, and the resident peak follows the live
  tensors (what CUDA's ``max_memory_allocated`` counts), at the price of a page fault per
  allocation (its img/s is not the default's).
Per rank: that peak plus what training keeps between steps, 4 fp32 copies of the parameters
(weights, gradients, momentum, EMA), as ``hvd-yolo train`` does. Data parallelism does not
change it; Horovod adds its fusion buffer (``HOROVOD_FUSION_THRESHOLD``, 128 MiB) on top.
``--budget-gb G``: the largest batch whose per-rank peak fits in G GiB, by doubling then
bisecting the batch, each probe measured in its own process (a probe that runs out of memory,
CUDA OOM or killed, does not fit). Run it without mpirun: it measures one rank.

Over 350 lines on purpose: one job, peak memory and img/s per input size; the measurement, its
fresh process per configuration and the budget search share one spec and one result format,
and split, each part would need the others.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from itertools import product
from typing import Any

from hvd_yolo.cli import RunError, UsageError

MODELS = ("yolov3", "yolov3-tiny")
CHECKPOINTS = ("none", "backbone", "all")
STATE_COPIES = 4  # weights, gradients, momentum, EMA (fp32)
MIB = 2**20
MMAP_THRESHOLD = 128 * 1024  # --malloc mmap: glibc's MALLOC_MMAP_THRESHOLD_


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _names(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{','.join(bad) or text!r}: choose from "
                                             f"{','.join(choices)}")
        return values
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", type=_names(MODELS), default=list(MODELS),
                   help="comma-separated (default yolov3,yolov3-tiny)")
    p.add_argument("--sizes", type=_ints, default=[320, 416, 608],
                   help="input sizes, multiples of 32 (default 320,416,608)")
    p.add_argument("--batch-size", type=_ints, default=[1],
                   help="images per pass, comma-separated (default 1)")
    p.add_argument("--checkpoint", type=_names(CHECKPOINTS), default=["none", "backbone"],
                   help="model.checkpoint modes, comma-separated (default none,backbone)")
    p.add_argument("--classes", type=int, default=80, help="number of classes (80: COCO's head)")
    p.add_argument("--iterations", type=int, default=2, help="timed passes per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the list, alternating configurations; medians are reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--malloc", choices=("default", "mmap"), default="default",
                   help="CPU: glibc's default allocator settings, or every block >= 128 KiB "
                        "mmapped, so the peak follows the live tensors (see above)")
    p.add_argument("--budget-gb", type=float, default=None, metavar="G",
                   help="also find the largest batch whose per-rank peak fits in G GiB")
    p.add_argument("--max-batch", type=int, default=256, help="largest batch --budget-gb tries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", metavar="PATH", default=None,
                   help="write the results as JSON ('-': stdout only)")


# ----------------------------------------------------------------------------- one configuration
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RunError(f"bench memory: /proc/self/status has no {key}")


class MemoryProbe:
    """The activation peak of the passes between ``start()`` and ``peak_bytes()``."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.device, self.base = torch, device, 0
        self.method = ("cuda max_memory_allocated" if device.type == "cuda"
                       else "VmHWM - VmRSS after malloc_trim")
        if device.type != "cuda" and os.environ.get("MALLOC_MMAP_THRESHOLD_"):
            self.method += f", MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
            self.base = self.torch.cuda.memory_allocated(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # the warm-up's freed memory goes back
        except (OSError, AttributeError):
            pass  # not glibc: nothing is kept that trim would return
        self.base = _status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS now
        except OSError as e:
            raise RunError(f"bench memory: cannot reset the peak resident set through "
                           f"/proc/self/clear_refs ({e.strerror or e}); Linux >= 4.0 needed") from None

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
            return self.torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process (a fresh one: see ``_run_worker``)."""
    import torch

    from hvd_yolo.bench.common import synthetic_batch
    from hvd_yolo.model.loss import YoloLoss
    from hvd_yolo.model.yolov3 import build_model

    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"], spec["classes"], checkpoint=spec["checkpoint"])
    model = model.to(device).train()
    crit = YoloLoss(model).to(device)
    images, targets = synthetic_batch(spec["batch"], spec["size"], spec["classes"], device,
                                      spec["seed"] + 1)
    for p in model.parameters():  # gradients exist before the measured passes, as in training
        p.grad = torch.zeros_like(p)

    def one_pass() -> tuple[float, float]:
        """(wall, process CPU) seconds of one forward+backward."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss, _ = crit(model(images), targets)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        model.zero_grad(set_to_none=False)
        return dt, dc

    for _ in range(spec["warmup"]):
        one_pass()
    probe = MemoryProbe(device)
    probe.start()
    times = [one_pass() for _ in range(spec["iterations"])]
    peak = probe.peak_bytes()
    params = sum(p.numel() for p in model.parameters())
    return {"iteration_s": [t for t, _ in times], "cpu_s": [c for _, c in times],
            "activation_peak_mb": peak / MIB,
            "state_mb": STATE_COPIES * 4 * params / MIB, "parameters": params,
            "memory_method": probe.method}


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """``measure(spec)`` in a fresh process; ``{"oom": ...}`` when it ran out of memory."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    if spec.get("malloc") == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    proc = subprocess.run([sys.executable, "-m", "hvd_yolo.bench.memory", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if proc.returncode in (-9, 137):  # the kernel's OOM killer
        return {"oom": "killed (SIGKILL: out of memory?)"}
    tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
    raise RunError(f"bench memory: {spec['model']} {spec['size']}px batch {spec['batch']} "
                   f"checkpoint={spec['checkpoint']} failed (exit {proc.returncode}):\n{tail}")


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        result = measure(spec)
    except Exception as e:  # CUDA OOM: the probe does not fit
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            result = {"oom": str(e).splitlines()[0]}
        else:
            raise
    print(json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------- the benchmark
def _check(args: argparse.Namespace) -> None:
    bad = [s for s in args.sizes if s < 32 or s % 32]
    if bad:
        raise UsageError(f"--sizes {','.join(map(str, bad))}: input sizes must be positive "
                         f"multiples of 32")
    for name in ("iterations", "rounds", "classes", "max_batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.batch_size) < 1:
        raise UsageError(f"--batch-size must be >= 1, got {min(args.batch_size)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.budget_gb is not None and args.budget_gb <= 0:
        raise UsageError(f"--budget-gb must be > 0, got {args.budget_gb}")


def _device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def run(args: argparse.Namespace) -> int:
    from hvd_yolo.bench.common import versions

    _check(args)
    base = {"classes": args.classes, "iterations": args.iterations, "warmup": args.warmup,
            "seed": args.seed, "device": _device(args.device), "malloc": args.malloc,
            "threads": args.threads or len(os.sched_getaffinity(0))}
    load_before = os.getloadavg()
    keys = list(product(args.models, args.sizes, args.batch_size, args.checkpoint))
    raw: dict[tuple, list[dict[str, Any]]] = {k: [] for k in keys}
    for r, key in product(range(args.rounds), keys):  # A B C A B C: configurations alternate
        model, size, batch, ckpt = key
        res = _run_worker(dict(base, model=model, size=size, batch=batch, checkpoint=ckpt))
        raw[key].append(res)
        print(f"round {r + 1}/{args.rounds} {_line(key, _row(key, raw[key]))}", flush=True)
    rows = [_row(k, raw[k]) for k in keys]
    _relative(rows)
    result = {"benchmark": "memory", "device": base["device"], "threads": base["threads"],
              "malloc": args.malloc,
              "rounds": args.rounds, "iterations": args.iterations, "warmup": args.warmup,
              "classes": args.classes, "versions": versions(), "rows": rows,
              "load_average": {"before": load_before, "after": os.getloadavg()}}
    if args.budget_gb is not None:
        result["budget"] = {"gb": args.budget_gb, "largest_batch": [
            _largest_batch(args, base, m, s, c)
            for m, s, c in product(args.models, args.sizes, args.checkpoint)]}
    _report(result)
    from hvd_yolo.cli import write_json

    write_json(args.json_path, result)
    return 0


def _row(key: tuple, runs: list[dict[str, Any]]) -> dict[str, Any]:
    model, size, batch, ckpt = key
    row: dict[str, Any] = {"model": model, "size": size, "batch": batch, "checkpoint": ckpt}
    ok = [r for r in runs if "oom" not in r]
    if not ok:
        return dict(row, oom=runs[-1]["oom"])
    act = statistics.median(r["activation_peak_mb"] for r in ok)
    rates = [batch / statistics.median(r["iteration_s"]) for r in ok]
    cpu = [statistics.median(r["cpu_s"]) / batch for r in ok]
    return dict(row, activation_peak_mb=act, state_mb=ok[0]["state_mb"],
                peak_per_rank_mb=ok[0]["state_mb"] + act, img_per_sec=statistics.median(rates),
                cpu_s_per_img=statistics.median(cpu),
                activation_peak_mb_rounds=[r["activation_peak_mb"] for r in ok],
                img_per_sec_rounds=rates, iteration_s=[r["iteration_s"] for r in ok],
                cpu_s=[r["cpu_s"] for r in ok],
                memory_method=ok[0]["memory_method"])


def _relative(rows: list[dict[str, Any]]) -> None:
    """Against checkpoint=none at the same model, size and batch: time cost, memory saved."""
    ref = {(r["model"], r["size"], r["batch"]): r for r in rows
           if r["checkpoint"] == "none" and "oom" not in r}
    for r in rows:
        base = ref.get((r["model"], r["size"], r["batch"]))
        if base is None or "oom" in r:
            continue
        r["time_overhead"] = base["img_per_sec"] / r["img_per_sec"] - 1
        r["cpu_overhead"] = r["cpu_s_per_img"] / base["cpu_s_per_img"] - 1
        r["activation_saving"] = 1 - r["activation_peak_mb"] / base["activation_peak_mb"]


def _largest_batch(args: argparse.Namespace, base: dict[str, Any], model: str, size: int,
                   ckpt: str) -> dict[str, Any]:
    """Doubling, then bisection, on measured per-rank peaks (one untimed-warm-up probe each)."""
    budget_mb = args.budget_gb * 1024
    probes: list[dict[str, Any]] = []

    def fits(batch: int) -> bool:
        res = _run_worker(dict(base, model=model, size=size, batch=batch, checkpoint=ckpt,
                               iterations=1))
        peak = None if "oom" in res else res["state_mb"] + res["activation_peak_mb"]
        ok = peak is not None and peak <= budget_mb
        probes.append({"batch": batch, "peak_per_rank_mb": peak, "fits": ok})
        print(f"budget {args.budget_gb} GiB: {model} {size}px checkpoint={ckpt} batch {batch}: "
              f"{'out of memory' if peak is None else f'{peak:.0f} MiB'} "
              f"{'fits' if ok else 'does not fit'}", flush=True)
        return ok

    lo, hi = 0, None
    batch = 1
    while hi is None:
        if fits(batch):
            lo = batch
            if batch >= args.max_batch:
                break
            batch = min(2 * batch, args.max_batch)
        else:
            hi = batch
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"model": model, "size": size, "checkpoint": ckpt, "batch": lo,
            "capped": hi is None, "probes": probes}


def _line(key: tuple, row: dict[str, Any]) -> str:
    model, size, batch, ckpt = key
    head = f"{model:<11} {size:>4}px batch {batch:<3} checkpoint={ckpt:<8}"
    if "oom" in row:
        return f"{head} out of memory ({row['oom']})"
    return (f"{head} activations {row['activation_peak_mb']:8.0f} MiB, per rank "
            f"{row['peak_per_rank_mb']:8.0f} MiB, {row['img_per_sec']:7.2f} img/s, "
            f"{row['cpu_s_per_img']:6.2f} CPU s/img")


def _report(result: dict[str, Any]) -> None:
    print(f"bench memory: {result['device']}, {result['threads']} threads, malloc "
          f"{result['malloc']}, medians of "
          f"{result['rounds']} round(s), {result['iterations']} timed pass(es) each")
    for r in result["rows"]:
        key = (r["model"], r["size"], r["batch"], r["checkpoint"])
        extra = ""
        if "time_overhead" in r and r["checkpoint"] != "none":
            extra = (f"  vs none: {r['time_overhead']:+.0%} time ({r['cpu_overhead']:+.0%} "
                     f"CPU), "
                     f"{r['activation_saving']:.0%} less activation memory")
        print(_line(key, r) + extra)
    for b in result.get("budget", {}).get("largest_batch", []):
        print(f"largest batch in {result['budget']['gb']} GiB: {b['model']} {b['size']}px "
              f"checkpoint={b['checkpoint']}: {b['batch']}{'+ (--max-batch)' if b['capped'] else ''}")


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
