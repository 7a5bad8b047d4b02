"""Horovod's elastic API: the state every rank rolls back to, and the decorator that reruns the
loop after a world change (``horovodrun --min-np/--max-np``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import horovod.torch as hvd
import torch
from horovod.common.exceptions import HostsUpdatedInterrupt

from hvd_yolo.comm import horovod
from hvd_yolo.comm.base import GradSync


class ElasticState(hvd.elastic.TorchState):
    """Horovod's ``TorchState`` over the model, the GradSync's optimizer and ``tracked``
    (modules and plain values, attributes of this object). ``commit()`` checks that every rank
    reached it, saves in memory and runs ``on_commit``; ``sync()`` sends rank 0's state to
    every rank."""

    def __init__(self, model: torch.nn.Module, sync: GradSync, on_commit: Callable[[], None],
                 **tracked: Any) -> None:
        self._on_commit = on_commit
        super().__init__(model=model, optimizer=sync.optimizer, **tracked)

    def commit(self) -> None:
        # Horovod saves first, then checks the hosts; here the check comes first. Its broadcast
        # completes only once every rank has reached the commit, so a rank that died after the
        # step's last collective (before writing its step line) cannot leave the others with a
        # saved step it has no record of: their check fails and they roll back to the commit
        # before. A host change (the broadcast passed everywhere) saves, then interrupts.
        try:
            self.check_host_updates()  # Horovod: a broadcast of rank 0's host-change notices
        except HostsUpdatedInterrupt:
            self.save()
            self._on_commit()
            raise
        self.save()
        self._on_commit()

    def sync(self) -> None:
        super().sync()  # Horovod: rank 0's weights, optimizer state and small state everywhere
        # Horovod: the weights once more: a worker without optimizer state gets it from a
        # zero-gradient step (weight decay moves its weights) inside the optimizer broadcast.
        horovod.broadcast_state(self.model)


def run(loop: Callable[[ElasticState], Any]) -> Callable[[ElasticState], Any]:
    """``hvd.elastic.run``: ``loop(state)`` restarts after a world change, state synced."""
    return hvd.elastic.run(loop)
