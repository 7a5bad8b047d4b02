"""A stop signal that reaches a DataLoader worker while it starts kills no worker.

Slurm's time limit signals every process of a step, DataLoader workers included. torch's
worker sets its own SIGTERM handler (which dies of any SIGTERM its parent did not send) before
the loader's ``worker_init_fn`` makes it ignore the signal; a SIGTERM in between used to end
the rank with "DataLoader worker ... exited unexpectedly" instead of a checkpoint. The window
is widened here by a ``worker_init_fn`` that waits before ignoring the signals.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch.utils.data import DataLoader

from hvd_yolo.data.workers import ignore_stop_signals, start_workers

torch.set_num_threads(1)
WINDOW_S = 1.5


def slow_ignore(worker_id: int) -> None:
    """``ignore_stop_signals`` after a pause: the window in which the signal arrives."""
    time.sleep(WINDOW_S)
    ignore_stop_signals(worker_id)


def start_and_signal(sig: signal.Signals, held: bool) -> list[int]:
    """Start a 2-worker loader (with ``start_workers`` if ``held``), send ``sig`` to
    each worker before its ``worker_init_fn`` is done, and read every batch."""
    loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, worker_init_fn=slow_ignore)
    batches = start_workers(loader) if held else iter(loader)
    for w in batches._workers:  # noqa: SLF001 - the worker processes of this iterator
        os.kill(w.pid, sig)
    return [int(x) for b in batches for x in b]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_while_workers_start_kills_none(sig: signal.Signals) -> None:
    assert start_and_signal(sig, held=True) == list(range(8))
    # The main process's own mask is as it was: the signals reach its handlers again.
    assert not {signal.SIGTERM, signal.SIGUSR1} & signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_without_the_hold_the_same_signal_kills_a_worker() -> None:
    # The control: the test's window is real (torch's worker handler dies of the SIGTERM).
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        start_and_signal(signal.SIGTERM, held=False)
