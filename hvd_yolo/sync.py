"""How the ranks' models are kept together: builds the optimizer the training loop steps.

``dist.sync=allreduce`` with ``none``/``fp16``: Horovod's ``DistributedOptimizer`` (each
gradient's allreduce starts in its backward hook). ``dist.compression=powersgd``:
:class:`hvd_yolo.powersgd.PowerSGDOptimizer`. ``dist.sync=local``:
:class:`hvd_yolo.local_sgd.LocalSGDOptimizer`. All offer what the loop calls:
``synchronize()`` (every rank, once per optimizer step), ``skip_synchronize()``, ``step()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from hvd_yolo import dist
from hvd_yolo.config import DistConfig


class WrappedOptimizer:
    """A torch optimizer plus this project's communication, by delegation.

    ``synchronize()`` does the step's communication on every rank; ``step()`` is the plain
    update and never communicates (Horovod's ``broadcast_optimizer_state`` steps a fresh
    optimizer on some ranks only, and AMP's scaler may skip a step on one rank). ``steps``
    counts the synchronized optimizer steps: the run's global step (set after a resume).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.steps = 0
        self.bytes_sent = 0  # payload this rank put into allreduces (all steps)

    def __getattr__(self, name: str) -> Any:  # param_groups, state, defaults, ...
        return getattr(self.__dict__["optimizer"], name)

    def synchronize(self) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        yield  # step() never synchronizes: nothing to skip

    def step(self, closure: Any = None) -> Any:
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def distributed_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                          cfg: DistConfig, accumulate: int, seed: int = 0) -> Any:
    """The optimizer for ``cfg.sync`` and ``cfg.compression`` (see the module docstring)."""
    if cfg.sync == "local":
        from hvd_yolo.local_sgd import LocalSGDOptimizer

        return LocalSGDOptimizer(optimizer, model, cfg.local_steps, cfg.sync_warmup_steps,
                                 cfg.local_sync_momentum, cfg.compression)
    if cfg.compression == "powersgd":
        from hvd_yolo.powersgd import PowerSGDOptimizer

        return PowerSGDOptimizer(optimizer, model.named_parameters(), cfg.powersgd_rank,
                                 cfg.powersgd_start_step, accumulate, seed=seed)
    return dist.distributed_optimizer(optimizer, model, cfg.compression, accumulate, cfg.op)


def start_at(optimizer: Any, step: int) -> None:
    """Tell a wrapped optimizer the run's step (after a resume: warm-up and start steps)."""
    if isinstance(optimizer, WrappedOptimizer):
        optimizer.steps = step


def bytes_sent(optimizer: Any) -> int | None:
    """The allreduce payload this rank sent so far, where the optimizer counts it."""
    return optimizer.bytes_sent if isinstance(optimizer, WrappedOptimizer) else None
