"""Horovod itself: its knobs, init and device binding, and every collective the package runs.

Only ``hvd_yolo.comm`` imports ``horovod``. The rest of the package asks this module for the
rank, the world size and the collectives it needs, so the model and data code know nothing of
ranks and every collective is easy to audit (each must be called on every rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import horovod.torch as hvd
import torch

from hvd_yolo.config import COMPRESSIONS


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    device: torch.device

    @property
    def is_root(self) -> bool:
        return self.rank == 0


# Horovod's negotiation cycle for CPU ranks. Its own default (1 ms) makes the background thread
# wake 1000 times a second and steal CPU from backward on ranks with one core each; 10 ms was
# measured 9% faster end to end (benchmarks/NOTES.md). GPU ranks keep Horovod's default.
CPU_CYCLE_TIME_MS = 10.0
TUNING_KNOBS = ("HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD", "HOROVOD_TIMELINE",
                "HOROVOD_AUTOTUNE", "HOROVOD_HIERARCHICAL_ALLREDUCE", "HOROVOD_CACHE_CAPACITY",
                "HOROVOD_BATCH_D2D_MEMCOPIES", "HOROVOD_NUM_NCCL_STREAMS",
                "HOROVOD_STALL_CHECK_TIME_SECONDS", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS")
# Horovod's own stall shutdown is a backstop this long after hvd_yolo.stall's (which also ends
# a job with a frozen rank, where Horovod's coordinator blocks inside MPI and never checks).
STALL_BACKSTOP_S = 60.0


def horovod_settings(cycle_time_ms: float | None = None, fusion_threshold_mb: float | None = None,
                     use_cuda: bool | None = None, timeline: str | None = None,
                     stall_warning_s: float | None = None,
                     stall_shutdown_s: float | None = None,
                     elastic: bool = False) -> dict[str, str]:
    """Set the Horovod knobs read at ``hvd.init()``; returns the tuning knobs in force.

    An explicit argument wins, then what the user exported, then this project's CPU default
    (``CPU_CYCLE_TIME_MS``); anything else is left to Horovod. Call it before :func:`init`.
    ``stall_warning_s``: Horovod's stall inspector warns (naming the ranks that did not submit a
    tensor) after it; ``stall_shutdown_s`` (0: never): Horovod shuts down
    ``STALL_BACKSTOP_S`` after it. ``elastic``: Horovod's response cache off (with it, a
    worker that joins a grown job fails in its first collectives, Gloo:
    "op.preamble.length <= op.nbytes", measured with tests/test_elastic.py).
    """
    if elastic:
        os.environ["HOROVOD_CACHE_CAPACITY"] = "0"
    if stall_warning_s:
        os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] = str(max(1, round(stall_warning_s)))
    if stall_shutdown_s:
        os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = str(
            round(stall_shutdown_s + STALL_BACKSTOP_S))
    if timeline:
        os.environ["HOROVOD_TIMELINE"] = os.path.abspath(timeline)
    if fusion_threshold_mb is not None:
        os.environ["HOROVOD_FUSION_THRESHOLD"] = str(int(fusion_threshold_mb * 2**20))
    if cycle_time_ms is not None:
        os.environ["HOROVOD_CYCLE_TIME"] = str(cycle_time_ms)
    elif "HOROVOD_CYCLE_TIME" not in os.environ:
        if use_cuda is None:
            use_cuda = torch.cuda.is_available()
        if not use_cuda:
            os.environ["HOROVOD_CYCLE_TIME"] = str(CPU_CYCLE_TIME_MS)
    return {k: os.environ[k] for k in TUNING_KNOBS if k in os.environ}


def init(threads: int | None = None, use_cuda: bool | None = None) -> DistContext:
    """``hvd.init()``, then bind this rank to a device.

    CUDA (when available and not disabled): device = local rank. CPU: ``torch.set_num_threads``
    to ``threads`` or ``max(1, cores // local_size)`` so co-located ranks do not oversubscribe.
    """
    hvd.init()
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(hvd.local_rank() % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(threads or max(1, (cores or 1) // hvd.local_size()))
    return DistContext(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), device)


def context(device: torch.device) -> DistContext:
    """This process's place in the current world (elastic runs: after a world change)."""
    return DistContext(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), device)


def elastic_launch() -> bool:
    """True when ``horovodrun --min-np/--max-np`` (elastic mode) started this process."""
    return os.environ.get("HOROVOD_ELASTIC", "0") not in ("", "0")


def rank() -> int:
    return hvd.rank() if hvd.is_initialized() else 0


def size() -> int:
    return hvd.size() if hvd.is_initialized() else 1


def is_root() -> bool:
    return rank() == 0


def allreduce_mean(value: float | torch.Tensor, name: str) -> torch.Tensor:
    """Average a scalar or tensor over ranks (every rank must call it with the same name)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    return hvd.allreduce(t, name=name, op=hvd.Average)


def allreduce_sum(value: float | torch.Tensor, name: str) -> torch.Tensor:
    """Sum a scalar or tensor over ranks (every rank must call it with the same name)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    return hvd.allreduce(t, name=name, op=hvd.Sum)


def allgather_object(obj: Any, name: str | None = None) -> list[Any]:
    """Gather a picklable object from every rank; every rank receives the list (rank order)."""
    if not hvd.is_initialized() or hvd.size() == 1:
        return [obj]
    return hvd.allgather_object(obj, name=name)


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None) -> Any:
    """Send ``obj`` from ``root_rank`` to every rank."""
    if not hvd.is_initialized() or hvd.size() == 1:
        return obj
    return hvd.broadcast_object(obj, root_rank=root_rank, name=name)


def barrier() -> None:
    if hvd.is_initialized() and hvd.size() > 1:
        hvd.barrier()


def join() -> int:
    """``hvd.join()``: a guard that lets a rank with fewer batches wait instead of hanging."""
    return hvd.join() if hvd.is_initialized() else 0


def broadcast_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Make every rank start from rank 0's weights (and optimizer state)."""
    # The optimizer first: on a rank without optimizer state, Horovod creates it by a step with
    # zero gradients, which moves the weights (weight decay); the weights are broadcast after.
    if optimizer is not None:
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)


def lr_world_scale(op: str, device: torch.device) -> int:
    """How much the LR grows with the world: ``size`` for an averaged gradient (the global batch
    grows); 1 for Adasum on CPU ranks, which combines the ranks' updates instead of averaging
    them; ``local_size`` for Adasum on NCCL GPUs (summed within a node, Adasum across nodes),
    as in Horovod's Adasum guide and examples."""
    if op != "adasum":
        return size()
    if device.type == "cuda" and hvd.nccl_built():
        return hvd.local_size()
    return 1


def average_buffers(modules: list[torch.nn.Module], name: str) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) of ``modules`` over
    the ranks, in place: without SyncBN each rank's statistics follow its own batches."""
    buffers = [b for m in modules for b in m.buffers() if b.is_floating_point()]
    if not buffers or not hvd.is_initialized() or hvd.size() == 1:
        return
    # Horovod: one grouped allreduce (one negotiation) for all the buffers.
    hvd.grouped_allreduce_(buffers, name=name, op=hvd.Average)


def nonfinite_ranks(stop: bool, bad_batch: int | None, name: str) -> tuple[bool, dict[int, int]]:
    """The per-step decision, one allreduce: did any rank ask to stop, and which ranks saw a
    non-finite loss (rank -> the first such batch)? Every rank gets the same answer."""
    world, me = size(), rank()
    flags = torch.zeros(world + 1, dtype=torch.float64)
    flags[0] = float(stop)
    if bad_batch is not None:
        flags[1 + me] = bad_batch + 1.0
    if world > 1:
        # Horovod: a stop request and the bad-loss report of every rank in one small allreduce.
        flags = hvd.allreduce(flags, name=name, op=hvd.Sum)
    bad = {r: int(v) - 1 for r, v in enumerate(flags[1:].tolist()) if v > 0}
    return bool(flags[0] > 0), bad


def compressor(name: str) -> Any:
    """Horovod's compressor for a name of ``config.COMPRESSIONS`` (the one table)."""
    # powersgd is its own GradSync (hvd_yolo.comm.powersgd): its factors and the tensors it leaves
    # uncompressed go through plain fp32 allreduces, its warm-up through this table.
    table = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16,
             "powersgd": hvd.Compression.none}
    assert set(table) == set(COMPRESSIONS), "config.COMPRESSIONS and this table must agree"
    if name not in table:
        raise ValueError(f"compression must be one of {list(COMPRESSIONS)}, got {name!r}")
    return table[name]


def build_info() -> dict[str, Any]:
    """What this Horovod was built with (controllers, tensor operations)."""
    return {
        "horovod": __import__("horovod").__version__,
        "controllers": {"mpi": hvd.mpi_built(), "gloo": hvd.gloo_built()},
        "tensor_operations": {
            "nccl": hvd.nccl_built() != 0,
            "ddl": hvd.ddl_built(),
            "ccl": hvd.ccl_built(),
            "cuda": hvd.cuda_built(),
            "rocm": hvd.rocm_built(),
            "mpi": hvd.mpi_built(),
            "gloo": hvd.gloo_built(),
        },
    }


# ------------------------------------------- raw collectives (benchmarks, PowerSGD, local SGD)


def allreduce_(tensor: torch.Tensor, name: str, average: bool = True) -> torch.Tensor:
    """In-place allreduce of ``tensor`` (any dtype Horovod supports, fp16 included)."""
    return hvd.allreduce_(tensor, name=name, op=hvd.Average if average else hvd.Sum)


def allreduce_async_(tensor: torch.Tensor, name: str) -> int:
    """Start averaging ``tensor`` over ranks in place; returns the handle :func:`wait` takes."""
    return hvd.allreduce_async_(tensor, name=name, op=hvd.Average)


def wait(handle: int) -> torch.Tensor:
    """Wait for an allreduce started by :func:`allreduce_async_`; returns its tensor."""
    return hvd.synchronize(handle)


def grouped_allreduce_(tensors: list[torch.Tensor], name: str, compression_name: str = "none",
                       average: bool = True) -> None:
    """Allreduce ``tensors`` as one grouped Horovod call (one negotiation, fused buffers).

    With ``fp16`` the tensors are cast to half for the wire and the averaged result is written
    back into the original (fp32) tensors, as ``hvd.Compression.fp16`` does for gradients.
    """
    comp = compressor(compression_name)
    op = hvd.Average if average else hvd.Sum
    if comp is hvd.Compression.none:
        hvd.grouped_allreduce_(tensors, name=name, op=op)
        return
    wire = [comp.compress(t)[0] for t in tensors]
    hvd.grouped_allreduce_(wire, name=name, op=op)
    for t, w in zip(tensors, wire):
        t.copy_(w)


def start_timeline(path: str, mark_cycles: bool = False) -> None:
    """Start writing Horovod's Chrome-trace timeline to ``path`` (rank 0 writes it)."""
    hvd.start_timeline(path, mark_cycles=mark_cycles)


def stop_timeline() -> None:
    hvd.stop_timeline()
