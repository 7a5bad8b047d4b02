"""What the benchmarks share: the models they know, confidence intervals, versions and the
launch environment for their JSON, thread set-up, the collective wrapper for Horovod or DDP,
synthetic batches, and a device sync for timers.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import statistics
import sys
from typing import Any

import torch

MODELS = ("yolov3-tiny", "yolov3")
# Two-sided 95% Student t quantiles for n-1 degrees of freedom (1..30); 1.96 beyond.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% confidence interval of the mean)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = statistics.fmean(values)
    if n == 1:
        return m, float("nan")
    t = _T95[n - 2] if n - 2 < len(_T95) else 1.96
    return m, t * statistics.stdev(values) / math.sqrt(n)


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "horovod", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["cpu_cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    return out


# Set by mpirun for each job (session dirs, daemon URIs, working dir): not settings, and they
# carry the launching machine's paths and addresses.
_LAUNCHER_INTERNAL = ("OMPI_MCA_orte_", "OMPI_MCA_ess", "OMPI_MCA_pmix", "OMPI_MCA_initial_wdir",
                      "OMPI_MCA_shmem_RUNTIME_QUERY_hint")


def launch_env() -> dict[str, str]:
    """The environment that shapes the run: thread counts, Horovod and Open MPI settings."""
    keep = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HOROVOD_", "OMPI_MCA_", "NCCL_", "GLOO_",
            "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(keep) and not k.startswith(_LAUNCHER_INTERNAL)
            and "PASSWORD" not in k and "SECRET" not in k}


def set_threads(interop: int) -> None:
    """Inter-op threads must be set before any parallel work; ignore if already fixed."""
    try:
        torch.set_num_interop_threads(max(1, interop))
    except RuntimeError:
        pass
    torch.set_flush_denormal(True)


class BenchComm:
    """Init and the object collectives the benchmarks need, for either backend."""

    def __init__(self, backend: str, threads: int | None, use_cuda: bool | None):
        self.backend = backend
        if backend == "horovod":
            from hvd_yolo.comm import horovod as dist

            self._dist = dist
            ctx = dist.init(threads=threads, use_cuda=use_cuda)
        else:
            from hvd_yolo.bench import ddp

            self._ddp = ddp
            ctx = ddp.init(threads=threads, use_cuda=use_cuda)
        self.rank, self.size, self.local_size, self.device = (ctx.rank, ctx.size, ctx.local_size,
                                                             ctx.device)
        self.ddp_ctx = ctx if backend == "ddp" else None

    def allgather_object(self, obj: Any) -> list[Any]:
        if self.backend == "horovod":
            return self._dist.allgather_object(obj, name="bench.gather")
        return self._ddp.allgather_object(obj)

    def close(self) -> None:
        if self.backend == "ddp":
            self._ddp.shutdown()


def synthetic_batch(batch: int, size: int, classes: int, device: torch.device, seed: int,
                    boxes_per_image: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in 0..1 and ``[N, 6]`` targets (batch_index, class, x1, y1, x2, y2)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    n = batch * boxes_per_image
    wh = torch.rand(n, 2, generator=g) * (size / 2 - 16) + 16
    xy = torch.rand(n, 2, generator=g) * (size - wh)
    cls = torch.randint(0, classes, (n,), generator=g).float()
    idx = torch.arange(batch).repeat_interleave(boxes_per_image).float()
    targets = torch.cat([idx[:, None], cls[:, None], xy, xy + wh], 1)
    return images.to(device), targets.to(device)


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
