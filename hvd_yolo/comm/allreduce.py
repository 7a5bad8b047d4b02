"""Horovod's ``DistributedOptimizer`` behind :class:`~hvd_yolo.comm.base.GradSync`:
``dist.sync=allreduce`` with compression none/fp16, op average or Adasum."""

from __future__ import annotations

from typing import Any

import horovod.torch as hvd
import torch

from hvd_yolo.comm import horovod
from hvd_yolo.comm.base import GradSync
from hvd_yolo.config import OPS


def distributed_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                          compression: str = "fp16", accumulate: int = 1,
                          op: str = "average") -> torch.optim.Optimizer:
    """Wrap ``optimizer`` in ``hvd.DistributedOptimizer``.

    ``named_parameters`` makes each gradient's allreduce start from its backward hook, so
    communication overlaps the rest of the backward pass. ``accumulate`` maps to
    ``backward_passes_per_step`` (allreduce once every k backward passes).
    """
    if compression == "powersgd":
        raise ValueError("powersgd is not a Horovod compressor: hvd_yolo.comm.powersgd is its "
                         "own GradSync")
    ops = {"average": hvd.Average, "adasum": hvd.Adasum}
    assert set(ops) == set(OPS), "config.OPS and this table must agree"
    if op not in ops:
        raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
    return hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        compression=horovod.compressor(compression),
        backward_passes_per_step=accumulate,
        op=ops[op],
    )


class AllreduceSync(GradSync):
    """Each gradient's allreduce starts in its backward hook; :meth:`synchronize` waits for
    them. Adasum (``op=adasum``) combines the updates inside Horovod's own ``step()``, so there
    :meth:`synchronize` does nothing and :meth:`step` communicates (AMP is off with Adasum,
    so every rank steps)."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                 compression: str = "fp16", accumulate: int = 1, op: str = "average") -> None:
        # hvd.DistributedOptimizer builds a new optimizer from the param groups (state is not
        # carried over): a checkpoint's optimizer state is loaded into it.
        super().__init__(distributed_optimizer(optimizer, model, compression, accumulate, op))
        self.adasum = op == "adasum"
        self.bytes_sent = None

    def synchronize(self) -> None:
        if not self.adasum:
            self.optimizer.synchronize()  # Horovod: wait for this step's allreduces
        self.steps += 1

    def step(self, closure: Any = None) -> Any:
        if self.adasum:
            return self.optimizer.step(closure)  # Horovod: Adasum combines the updates here
        with self.optimizer.skip_synchronize():
            return self.optimizer.step(closure)
