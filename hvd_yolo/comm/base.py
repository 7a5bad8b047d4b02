"""The one interface between the training loop and the ranks' communication: :class:`GradSync`.

A ``GradSync`` is a torch optimizer plus the step's communication. Per optimizer step, on
every rank: backward passes (hooks may start allreduces) -> :meth:`GradSync.synchronize` (the
step's communication; afterwards every ``p.grad`` holds what this rank applies) ->
:meth:`GradSync.step` (the plain update: never communicates, so AMP's scaler may skip it on
one rank) -> :meth:`GradSync.zero_grad` -> :meth:`GradSync.after_step`. Before a checkpoint or
an evaluation, :meth:`GradSync.before_save` makes every rank hold the model it saves.
"""

from __future__ import annotations

from typing import Any

import torch

from hvd_yolo.comm import horovod


class GradSync:
    """A torch optimizer plus this project's communication, by delegation.

    ``optimizer`` is the torch optimizer stepped (Horovod's broadcasts and elastic state take
    it). ``steps`` counts the synchronized optimizer steps: the run's global step (set by
    :meth:`start_at` after a resume). ``bytes_sent``: the payload this rank put into
    allreduces, all steps; None where Horovod's own optimizer sends and nothing counts it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.steps = 0
        self.bytes_sent: int | None = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def start_at(self, step: int) -> None:
        """The run's step (after a resume: PowerSGD's start step, local SGD's warm-up)."""
        self.steps = step

    def synchronize(self) -> None:
        """The step's communication (every rank, once per optimizer step)."""
        raise NotImplementedError

    def step(self, closure: Any = None) -> Any:
        """The update; never communicates."""
        return self.optimizer.step(closure)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()  # (Horovod's DistributedOptimizer takes no arguments)

    def discard_step(self) -> None:
        """Forget a step cut short (an elastic reset after a rank died mid-step), every rank
        before the new world's first step: its gradients, and whatever it had in flight. The
        next step's backward would otherwise add to the partial gradients."""
        # torch's own zero_grad: Horovod's refuses while its (stale) handles are held; they
        # are cleared by the optimizer state's restore
        torch.optim.Optimizer.zero_grad(self.optimizer, set_to_none=True)

    def after_step(self) -> None:
        """After the update (every rank): local SGD averages the weights when a period ends."""

    def settle(self) -> None:
        """Every rank, before Horovod's join: wait for whatever collective is still in flight
        (an allreduce in flight across a join hangs a rank or averages in zeros). Here none is:
        every step's allreduces finish within it."""

    def before_save(self, model: torch.nn.Module, ema: torch.nn.Module | None) -> None:
        """Every rank, before a checkpoint or an evaluation: make every rank hold the model it
        saves. Here: the BatchNorm running statistics (model and EMA) averaged over ranks."""
        # Horovod: one grouped allreduce of the floating-point buffers
        horovod.average_buffers([model, *([ema] if ema is not None else [])],
                                "hvd_yolo.train.buffers")

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state (the same on every rank after a step)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def comm_state_dict(self) -> dict[str, Any]:
        """This rank's own communication state (tensors and numbers; empty when there is
        none): what a resume on the same world needs to continue exactly."""
        return {}

    def load_comm_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`comm_state_dict` of the same rank of the same world."""

    def reset_comm_state(self) -> None:
        """Start the communication state afresh (as a new run does)."""
