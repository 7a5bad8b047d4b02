"""The torch DDP baseline: process-group set-up under mpirun, torchrun or one process.

Rank and world size come from, in order: torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT`` (``init_method=env://``); Open MPI's ``OMPI_COMM_WORLD_RANK``/``_SIZE``/
``_LOCAL_RANK``/``_LOCAL_SIZE`` (rank 0 opens a TCP store on ``MASTER_ADDR`` or its own host
name, at ``MASTER_PORT`` or a free port that mpi4py broadcasts to the other ranks); else one
process. Backend: ``nccl`` on CUDA, ``gloo`` on CPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

from hvd_yolo.config import COMPRESSIONS


@dataclass(frozen=True)
class DDPContext:
    rank: int
    size: int
    local_rank: int
    local_size: int
    device: torch.device
    backend: str
    init_method: str

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _rendezvous_from_mpi(rank: int, size: int) -> tuple[str, int]:
    """(address, port) of rank 0's store: from MASTER_ADDR/MASTER_PORT, else broadcast by MPI."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        return addr, int(port)
    if size == 1:
        return addr or "127.0.0.1", int(port or _free_port())
    from mpi4py import MPI  # only here: the baseline uses MPI for the rendezvous alone

    mine = None
    if rank == 0:
        local = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") == str(size)
        mine = (addr or ("127.0.0.1" if local else socket.gethostname())), int(port or _free_port())
    return MPI.COMM_WORLD.bcast(mine, root=0)


def init(threads: int | None = None, use_cuda: bool | None = None,
         timeout_s: float = 300.0) -> DDPContext:
    """``torch.distributed.init_process_group`` from the launcher's environment; bind the device.

    CPU: ``torch.set_num_threads(threads or cores // local_size)``, as ``hvd_yolo.comm.horovod.init``.
    """
    env = os.environ
    if {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} <= env.keys():
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", 0))
        local_size = int(env.get("LOCAL_WORLD_SIZE", size))
        init_method = "env://"
    else:
        rank = int(env.get("OMPI_COMM_WORLD_RANK", 0))
        size = int(env.get("OMPI_COMM_WORLD_SIZE", 1))
        local_rank = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))
        local_size = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", size))
        addr, port = _rendezvous_from_mpi(rank, size)
        init_method = f"tcp://{addr}:{port}"
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(threads or max(1, (cores or 1) // local_size))
        device, backend = torch.device("cpu"), "gloo"
    tdist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                             timeout=timedelta(seconds=timeout_s))
    return DDPContext(rank, size, local_rank, local_size, device, backend, init_method)


def allgather_object(obj: Any) -> list[Any]:
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers to every rank (what DDP's constructor does)."""
    for t in list(module.parameters()) + list(module.buffers()):
        tdist.broadcast(t.data, src=0)


def allreduce_flat_(tensors: list[torch.Tensor], compression: str = "none") -> None:
    """Average ``tensors`` over ranks in ONE flat allreduce (fp16 on the wire with ``fp16``)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(tensors)
    wire = flat.half() if compression == "fp16" else flat
    tdist.all_reduce(wire)
    wire.div_(tdist.get_world_size())
    for t, r in zip(tensors, _unflatten_dense_tensors(wire, tensors)):
        t.copy_(r)


def wrap(model: torch.nn.Module, ctx: DDPContext, compression: str = "none"):
    """``DistributedDataParallel`` (buckets overlap backward); fp16 via DDP's comm hook."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if compression == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {list(COMPRESSIONS)}, got {compression!r}")
    return ddp


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
