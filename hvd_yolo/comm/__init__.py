"""How the ranks talk: Horovod (``horovod``), synchronised BatchNorm (``syncbn``), and the
:class:`~hvd_yolo.comm.base.GradSync` the loop steps, built by :func:`build` for
``dist.sync``/``dist.compression``: ``allreduce`` (Horovod's DistributedOptimizer),
``powersgd`` (low-rank gradients) or ``local_sgd`` (periodic weight averaging).

This package is the only place that imports ``horovod``.
"""

from __future__ import annotations

import torch

from hvd_yolo.comm.base import GradSync
from hvd_yolo.config import DistConfig

__all__ = ["GradSync", "build"]


def build(cfg: DistConfig, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
          accumulate: int = 1, seed: int = 0) -> GradSync:
    """The GradSync for ``cfg.sync`` and ``cfg.compression`` around ``optimizer``; every rank
    calls it (PowerSGD registers backward hooks on ``model``'s parameters, Horovod's
    DistributedOptimizer too). ``seed``: PowerSGD's initial Q, the same on every rank."""
    if cfg.sync == "local":
        from hvd_yolo.comm.local_sgd import LocalSGDSync

        return LocalSGDSync(optimizer, model, cfg.local_steps, cfg.sync_warmup_steps,
                            cfg.local_sync_momentum, cfg.compression, cfg.local_overlap)
    if cfg.compression == "powersgd":
        from hvd_yolo.comm.powersgd import PowerSGDSync

        return PowerSGDSync(optimizer, model.named_parameters(), cfg.powersgd_rank,
                            cfg.powersgd_start_step, accumulate, seed=seed,
                            warmup_compression=cfg.powersgd_warmup_compression)
    from hvd_yolo.comm.allreduce import AllreduceSync

    return AllreduceSync(optimizer, model, cfg.compression, accumulate, cfg.op)
