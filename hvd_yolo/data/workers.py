"""A rank's DataLoader workers: forked once, before any gradient is exchanged, kept for the
whole run, and deaf to the stop signals.

Forked once and early. A worker is a fork of its rank, and CPython before 3.12 (3.11 until its
September 2024 fix) can fork a child that hangs before its first line (cpython gh-112275): a
thread that takes the interpreter's thread-state lock without the GIL, at the moment of the
fork, leaves the child that lock held forever. A rank has such a thread: Horovod's background
thread frees the tensors of finished collectives, and freeing one whose Python object Python
already dropped makes a new Python thread state (``PyThreadState_New``, under that lock).
A 2-rank run that forked its workers at every epoch and evaluation hung at its 27th epoch,
a worker stuck in ``PyOS_AfterFork_Child``. So `hvd-yolo train` makes its loaders persistent
and forks their workers with :func:`fork_workers` while building the run, before the model is
broadcast: no collective has moved a gradient yet, and none forks again.

Deaf to stop signals. Slurm signals every process of a job step, and a worker killed by it would
abort its rank (PyTorch raises in the main process) before the checkpoint is written; so
workers ignore SIGTERM/SIGUSR1 and are started with both blocked until they do.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGUSR1 (a ``worker_init_fn``); the main process stops
    them itself when it exits. A signal held back since the fork (:func:`hold_stop_signals`) is
    discarded here."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_workers(loader: Iterable[Any]) -> Iterator[Any]:
    """``iter(loader)`` with its new workers' stop signals held until they ignore them
    (:func:`hold_stop_signals`): how the training loop and the evaluation start a loader."""
    with hold_stop_signals():
        return iter(loader)


@contextlib.contextmanager
def hold_stop_signals() -> Iterator[None]:
    """Start a DataLoader's workers (``iter(loader)``) inside this: SIGTERM/SIGUSR1 stay blocked
    in each new worker until :func:`ignore_stop_signals` has run. Without it a signal in between
    meets torch's own worker handler, which dies of a SIGTERM not sent by its parent, and the
    rank fails with "DataLoader worker ... exited unexpectedly". The main process gets a signal
    that came meanwhile when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def fork_workers(*loaders: DataLoader | None) -> None:
    """Fork each persistent loader's workers now, idle: its index source (an
    ``EpochIndices``, whose ``sampler`` the loop deals per world) reads nothing meanwhile.
    Every later ``iter(loader)`` reuses them. ``None`` (no such loader) is skipped."""
    for loader in loaders:
        if loader is None or loader.num_workers == 0:
            continue
        if not loader.persistent_workers:
            raise ValueError("fork_workers needs a DataLoader with persistent_workers=True")
        indices = loader.sampler
        dealt, indices.sampler = indices.sampler, []
        try:
            start_workers(loader)
        finally:
            indices.sampler = dealt


def stop_workers(*loaders: DataLoader | None) -> None:
    """End persistent loaders' workers now rather than at exit: dropping torch's kept
    iterator shuts them down. ``None`` is skipped."""
    for loader in loaders:
        if loader is not None:
            loader._iterator = None
