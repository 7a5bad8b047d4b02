"""Checkpoint files: checksum, fallback, links, pruning order, temp clean-up, the out_dir lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hvd_yolo import checkpoint
from hvd_yolo.checkpoint import CheckpointError
from hvd_yolo.runlock import OutDirBusy, OutDirError, OutDirLock
from tests.fixtures.disks import tmpfs
from tests.fixtures.train_runs import flip


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "model": {"w": torch.randn(64, 64, generator=g)}, "epoch": 0,
            "optimizer": {}, "config": {}, "class_names": ["a"], "sampler": {"epoch": 0, "offset": 0}}



def written(path: Path, seconds_ago: float) -> None:
    """Date ``path`` (and its links) ``seconds_ago``: file order without sleeping."""
    t = time.time() - seconds_ago
    os.utime(path, (t, t))

def test_checkpoint_round_trip_is_verified(tmp_path: Path) -> None:
    path = checkpoint.save(state(3), tmp_path, 3, keep_last=2)
    assert checkpoint.verify(path) is True
    loaded = checkpoint.load(path)
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], state(3)["model"]["w"])
    # still a plain torch.save archive of plain types: torch.load reads it as data only
    assert torch.load(path, weights_only=True)["step"] == 3


def test_flipped_bytes_are_named_not_loaded(tmp_path: Path) -> None:
    path = checkpoint.save(state(3), tmp_path, 3, keep_last=2)
    flip(path)
    with pytest.raises(CheckpointError, match=r"step-00000003\.pt: corrupted checkpoint"):
        checkpoint.load(path)


def test_checkpoint_without_checksum_is_refused_unless_trusted(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save(state(1), path)
    with pytest.raises(CheckpointError, match=r"old\.pt: no hvd_yolo\.sha256 record .* refused. "
                       "If you trust where the file came from, pass --trust-checkpoint"):
        checkpoint.load(path)
    with pytest.warns(UserWarning, match="no checksum record: loaded unverified"):
        assert checkpoint.load(path, trust=True)["step"] == 1


def test_save_stores_numpy_and_paths_as_plain_types(tmp_path: Path) -> None:
    """What a run hands to save (numpy scalars and arrays, RNG state tuples, paths) is stored in
    types weights_only=True reads back; an object that is not data is refused at save time."""
    import random

    import numpy as np

    rng = np.random.default_rng(3)
    extra = {"best": np.float64(0.25), "count": np.int64(7), "table": np.arange(6).reshape(2, 3),
             "numpy_rng": rng.bit_generator.state, "python_rng": random.getstate(),
             "torch_rng": torch.get_rng_state(), "where": tmp_path, "pair": (np.int32(1), 2)}
    path = checkpoint.save({**state(2), "extra": extra}, tmp_path, 2, keep_last=1)
    got = torch.load(path, weights_only=True)["extra"]
    assert got["best"] == 0.25 and type(got["best"]) is float and got["count"] == 7
    assert torch.equal(got["table"], torch.arange(6).reshape(2, 3))
    assert got["numpy_rng"] == rng.bit_generator.state and got["where"] == str(tmp_path)
    assert tuple(got["python_rng"][1]) == random.getstate()[1] and got["pair"] == (1, 2)
    assert torch.equal(got["torch_rng"], torch.get_rng_state())
    with pytest.raises(TypeError, match=r"state\['extra'\]: a builtins.set cannot be stored"):
        checkpoint.save({**state(3), "extra": {1, 2}}, tmp_path, 3, keep_last=1)


def test_a_checkpoint_missing_an_entry_names_it(tmp_path: Path) -> None:
    full = state(4)
    for key, pattern in (("sampler", "it has no 'sampler' entry"),
                         ("optimizer", "it has no 'optimizer' entry")):
        path = checkpoint.save({k: v for k, v in full.items() if k != key}, tmp_path / key, 4, 1)
        with pytest.raises(CheckpointError, match=f"{path}: not a complete hvd-yolo training "
                           f"checkpoint: {pattern}"):
            checkpoint.load_resume(str(path), tmp_path)
    path = checkpoint.save({**full, "sampler": {"epoch": 0}}, tmp_path / "inner", 4, 1)
    with pytest.raises(CheckpointError, match="its 'sampler' entry has no 'offset'"):
        checkpoint.load_resume(str(path), tmp_path)


def test_resume_auto_falls_back_to_the_previous_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        checkpoint.save(state(step), ckpt, step, keep_last=3)
        written(ckpt / f"step-{step:08d}.pt", 10 - step)
    flip(ckpt / "last.pt")  # last.pt is step-3's data: both are bad now
    with pytest.warns(UserWarning, match=r"last\.pt: corrupted checkpoint.*resuming from .*"
                      r"step-00000002\.pt instead"):
        path, loaded = checkpoint.load_resume("auto", tmp_path)
    assert path.name == "step-00000002.pt" and loaded["step"] == 2
    # an explicit path is never replaced by another file
    with pytest.raises(CheckpointError, match=r"last\.pt: corrupted"):
        checkpoint.load_resume(str(ckpt / "last.pt"), tmp_path)
    # nothing usable: an error, not a silent fresh start
    for step in (1, 2):
        flip(ckpt / f"step-{step:08d}.pt")
    with pytest.raises(CheckpointError, match="no usable checkpoint for --resume auto"):
        checkpoint.load_resume("auto", tmp_path)


def test_resume_auto_takes_a_step_file_newer_than_last_pt(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    checkpoint.save(state(2), ckpt, 2, keep_last=3)
    written(ckpt / "step-00000002.pt", 10)
    checkpoint.atomic_save(state(4), ckpt / "step-00000004.pt")  # killed before last.pt's link
    path, loaded = checkpoint.load_resume("auto", tmp_path)
    assert path.name == "step-00000004.pt" and loaded["step"] == 4


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path: Path) -> None:
    assert checkpoint.load_resume("auto", tmp_path) is None
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        checkpoint.load_resume(str(tmp_path / "nope.pt"), tmp_path)


def test_last_and_best_are_links_to_the_step_file(tmp_path: Path) -> None:
    path = checkpoint.save(state(5), tmp_path, 5, keep_last=2, is_best=True)
    assert os.path.samefile(path, tmp_path / "last.pt")
    assert os.path.samefile(path, tmp_path / "best.pt")
    checkpoint.save(state(6), tmp_path, 6, keep_last=2)
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 6
    assert checkpoint.load(tmp_path / "best.pt")["step"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_pruning_keeps_the_newest_after_a_resume_re_derived_a_smaller_step(tmp_path: Path) -> None:
    for step in (4, 5, 6):
        checkpoint.save(state(step), tmp_path, step, keep_last=3)
        written(tmp_path / f"step-{step:08d}.pt", 10 - step)
    checkpoint.save(state(2), tmp_path, 2, keep_last=3)  # resumed on another world size
    names = sorted(p.name for p in tmp_path.glob("step-*.pt"))
    assert names == ["step-00000002.pt", "step-00000005.pt", "step-00000006.pt"], names
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 2


def test_clean_temp_removes_only_killed_checkpoint_writes(tmp_path: Path) -> None:
    ours = [tmp_path / ".step-00000004.pt.k2j3h4.tmp", tmp_path / ".last.pt.ab12cd34.tmp",
            tmp_path / ".best.pt.x.tmp"]
    others = [tmp_path / ".notes.tmp", tmp_path / "step-00000004.pt.tmp", tmp_path / "x.pt"]
    for p in ours + others:
        p.write_bytes(b"x" * 10)
    removed = checkpoint.clean_temp(tmp_path)
    assert sorted(p for p, _ in removed) == sorted(ours)
    assert all(p.exists() for p in others) and not any(p.exists() for p in ours)


def test_out_dir_lock_names_the_holder_and_dies_with_it(tmp_path: Path) -> None:
    first = OutDirLock(tmp_path)
    first.acquire()
    with pytest.raises(OutDirBusy, match=rf"in use by another training run \(host .*, pid {os.getpid()}"):
        OutDirLock(tmp_path).acquire()
    first.release()
    # a holder killed with SIGKILL leaves no stale lock
    code = (f"from hvd_yolo.runlock import OutDirLock; lock = OutDirLock({str(tmp_path)!r}); "
            "lock.acquire(); print('locked', flush=True); import time; time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutDirBusy, match=f"pid {proc.pid}"):
            OutDirLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    again = OutDirLock(tmp_path)
    again.acquire()
    again.release()


def test_an_unwritable_out_dir_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutDirError, match=r"run.out_dir=.*file/run cannot be written"):
        OutDirLock(tmp_path / "file" / "run").acquire()


def test_a_full_disk_is_one_line_and_last_pt_stays(tmp_path: Path) -> None:
    """A 1 MiB tmpfs: the first checkpoint fits, the second does not (needs root to mount;
    skipped with the reason otherwise)."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        ckpt = disk / "checkpoints"
        checkpoint.save(state(1), ckpt, 1, keep_last=2)  # 16 KB of weights
        big = {**state(2), "model": {"w": torch.zeros(512, 1024)}}  # 2 MB
        with pytest.raises(CheckpointError) as e:
            checkpoint.save(big, ckpt, 2, keep_last=2)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{ckpt}: writing step-00000002.pt failed (no "
                                                  "space left on the device): it needs about 3.1 MB")
        assert "MB are free; the checkpoints already there (last.pt) are unchanged" in msg
        assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt", "step-00000001.pt"]
        assert checkpoint.load(ckpt / "last.pt")["step"] == 1
