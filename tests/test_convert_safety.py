"""`convert` never loses the dataset it replaces: it builds into a temporary sibling and swaps it
in at the end; a failing conversion (a --strict stop, a full disk on 2 ranks) leaves the old
dataset as it was and no partial files behind."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvd_yolo.data.synthetic import write_yolo_dataset
from hvd_yolo.shards.convert import StrictError, convert_dataset
from hvd_yolo.shards.verify import verify_shards
from tests.fixtures import datagen
from tests.mpi_harness import run_cli


def test_failed_overwrite_keeps_the_old_dataset(tmp_path: Path) -> None:
    src = write_yolo_dataset(tmp_path / "yolo", 5, seed=8, size=(48, 64))
    out = tmp_path / "out"
    convert_dataset("yolo", src, out, shards=2)
    before = datagen.shard_content(out)
    (src / "labels" / "synth_0008_00003.txt").write_text("0 0.5 abc 0.2 0.2\n")
    with pytest.raises(StrictError):
        convert_dataset("yolo", src, out, shards=3, overwrite=True, strict=True)
    assert datagen.shard_content(out) == before  # the old dataset, complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "yolo"]  # no temp sibling
    # a first conversion that fails leaves no (empty) output folder
    with pytest.raises(StrictError):
        convert_dataset("yolo", src, tmp_path / "new", strict=True)
    assert not (tmp_path / "new").exists()
    # a successful overwrite replaces shards and manifest, and keeps the user's own files
    (out / "notes.txt").write_text("mine")
    convert_dataset("yolo", src, out, shards=3, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "notes.txt", "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert verify_shards(out).images == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "yolo"]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs: a disk that fills up (needs root; skipped with the reason otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up: {res.stderr.strip() or res.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


@pytest.mark.mpi
def test_two_rank_convert_onto_a_full_disk_reports_it(tmp_path: Path, small_disk: Path) -> None:
    old = small_disk / "shards"
    convert_dataset("yolo", write_yolo_dataset(tmp_path / "small", 4, seed=1, size=(48, 64)),
                    old, shards=2)
    before = datagen.shard_content(old)
    big = write_yolo_dataset(tmp_path / "big", 100, seed=1, size=(256, 256))  # ~3 MB of JPEGs
    res = run_cli(["convert", "yolo", str(big), str(old), "--shards", "4", "--overwrite", "-q"],
                  np=2, timeout=240, check=False)
    assert not res.timed_out and res.returncode == 1, res.output  # not 139 (a libhdf5 crash)
    assert "hvd-yolo convert: error: rank " in res.output
    assert "no space left on device" in res.output
    assert datagen.shard_content(old) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["shards"]


def test_a_killed_conversion_leaves_nothing_behind_after_the_next_one(tmp_path: Path) -> None:
    src = write_yolo_dataset(tmp_path / "yolo", 300, seed=3, size=(96, 128))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "hvd_yolo.cli", "convert", "yolo", str(src),
                             str(out), "--shards", "4", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.converting-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()  # kill -9 while it converts
    proc.wait(timeout=30)
    assert list(tmp_path.glob(".out.converting-*")), "the conversion ended before the kill"
    # a conversion into the same folder that is still running is left alone (its folder is locked)
    busy = tmp_path / ".out.converting-busy"
    busy.mkdir()
    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    # a kill in the middle of a swap: the old dataset waits in the trash folder, out is gone
    old = datagen.synthetic_shards(tmp_path / "old-src", 4, seed=1, shards=2)
    trash = tmp_path / ".out.old-x"
    trash.mkdir()
    os.rename(old, trash / "out")
    convert = [sys.executable, "-m", "hvd_yolo.cli", "convert", "yolo", str(src), str(out),
               "--shards", "2", "-q"]
    try:
        res = subprocess.run(convert, capture_output=True, text=True, timeout=300)
        assert res.returncode == 1 and "is not empty" in res.stderr, res.stderr
        assert res.stderr.count("left by a conversion that did not finish") == 2
        assert sorted(p.name for p in tmp_path.glob(".out.*")) == [".out.converting-busy"]
        assert verify_shards(out).images == 4  # the old dataset is back, and kept
        res = subprocess.run([*convert, "--overwrite"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert verify_shards(out).images == 300
    finally:
        os.close(fd)
