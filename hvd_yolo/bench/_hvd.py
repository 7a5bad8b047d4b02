"""Horovod helpers the benchmarks need beyond ``hvd_yolo.dist``.

TO BE MOVED INTO ``hvd_yolo/dist.py`` (the only module meant to import horovod): in-place
allreduce of raw buffers in their own dtype (``dist.allreduce_*`` cast to float64),
grouped allreduce with compression (the "no overlap" step: all gradients in one call after
backward) and timeline start/stop. Each function is a thin wrapper; every rank must call each
collective with the same name, in the same order.
"""

from __future__ import annotations

import horovod.torch as hvd
import torch


def compression(name: str):
    """``hvd.Compression`` by name (``none`` or ``fp16``)."""
    table = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}
    if name not in table:
        raise ValueError(f"compression must be one of {sorted(table)}, got {name!r}")
    return table[name]


def allreduce_(tensor: torch.Tensor, name: str, average: bool = True) -> torch.Tensor:
    """In-place allreduce of ``tensor`` (any dtype Horovod supports, fp16 included)."""
    return hvd.allreduce_(tensor, name=name, op=hvd.Average if average else hvd.Sum)


def grouped_allreduce_(tensors: list[torch.Tensor], name: str, compression_name: str = "none",
                       average: bool = True) -> None:
    """Allreduce ``tensors`` as one grouped Horovod call (one negotiation, fused buffers).

    With ``fp16`` the tensors are cast to half for the wire and the averaged result is written
    back into the original (fp32) tensors, as ``hvd.Compression.fp16`` does for gradients.
    """
    comp = compression(compression_name)
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
