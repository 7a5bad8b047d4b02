"""A stop signal that reaches a DataLoader worker while it starts kills no worker.

Slurm's time limit signals every process of a step, DataLoader workers included. torch's
worker sets its own SIGTERM handler (which dies of any SIGTERM its parent did not send) before
the loader's ``worker_init_fn`` makes it ignore the signal; a SIGTERM in between used to end
the rank with "DataLoader worker ... exited unexpectedly" instead of a checkpoint. The window
is widened here by a ``worker_init_fn`` that waits before ignoring the signals.
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from hvd_yolo import config
from hvd_yolo.comm.horovod import DistContext
from hvd_yolo.data.augment import ignore_stop_signals, start_workers, worker_context
from hvd_yolo.data.dataset import ShardDataset
from hvd_yolo.data.sampler import ShardSampler
from hvd_yolo.evaluate import make_eval_loader
from hvd_yolo.loop.run import make_train_loader

torch.set_num_threads(1)
WINDOW_S = 1.5


def slow_ignore(worker_id: int) -> None:
    """``ignore_stop_signals`` after a pause: the window in which the signal arrives."""
    time.sleep(WINDOW_S)
    ignore_stop_signals(worker_id)


def start_and_signal(sig: signal.Signals, held: bool, forkserver: bool = False) -> list[int]:
    """Start a 2-worker loader (with ``start_workers`` if ``held``; its workers from the
    product's forkserver if ``forkserver``), send ``sig`` to each worker before its
    ``worker_init_fn`` is done, and read every batch."""
    loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, worker_init_fn=slow_ignore,
                        multiprocessing_context=worker_context(2) if forkserver else None)
    batches = start_workers(loader) if held else iter(loader)
    for w in batches._workers:  # noqa: SLF001 - the worker processes of this iterator
        os.kill(w.pid, sig)
    return [int(x) for b in batches for x in b]


@pytest.mark.parametrize("forkserver", [False, True], ids=["fork", "forkserver"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_while_workers_start_kills_none(sig: signal.Signals,
                                                       forkserver: bool) -> None:
    assert start_and_signal(sig, held=True, forkserver=forkserver) == list(range(8))
    # The main process's own mask is as it was: the signals reach its handlers again.
    assert not {signal.SIGTERM, signal.SIGUSR1} & signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_without_the_hold_the_same_signal_kills_a_worker() -> None:
    # The control: the test's window is real (torch's worker handler dies of the SIGTERM).
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        start_and_signal(signal.SIGTERM, held=False)


def test_the_training_and_evaluation_loaders_start_workers_from_the_forkserver(
        shards: Path) -> None:
    # A rank has threads of its own (Horovod's); forking it could hang a worker (cpython
    # gh-112275): both loaders start theirs from the single-threaded forkserver, which reads
    # the HDF5 shards through the pickled dataset.
    cfg = config.load(None, [f"data.train={shards}", f"data.val={shards}", "data.workers=2",
                             "input.size=64", "optim.batch_size=2", "eval.batch_size=2"])
    ds = ShardDataset(shards)
    ctx = DistContext(rank=0, size=1, local_rank=0, local_size=1, device=torch.device("cpu"))
    sampler = ShardSampler(ds.shard_sizes, 0, 1, seed=0, shuffle=True)
    train = make_train_loader(ds, sampler, cfg, pin_memory=False)
    val = make_eval_loader(ds, cfg, ctx)
    for loader in (train, val):
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert sum(len(b["metas"]) for b in start_workers(train)) == len(ds) // 2 * 2
    assert sorted(m["image_id"] for b in start_workers(val) for m in b["metas"]) == \
        sorted(ds[i]["image_id"] for i in range(len(ds)))
    # The forkserver holds the stop signals, so each worker starts with them held.
    assert {signal.SIGTERM, signal.SIGUSR1} <= _blocked(multiprocessing.forkserver._forkserver)


def _blocked(server: object) -> set[signal.Signals]:
    """The signals the forkserver process holds (its /proc status)."""
    pid = server._forkserver_pid  # noqa: SLF001 - the running forkserver of this process
    mask = next(int(line.split()[1], 16) for line in
                Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("SigBlk:"))
    return {signal.Signals(s) for s in range(1, 32) if mask >> (s - 1) & 1}
