"""`convert` never loses the dataset it replaces: it builds into a temporary sibling and swaps it
in at the end; a failing conversion (a --strict stop, a full disk on 2 ranks) leaves the old
dataset as it was and no partial files behind."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from hvd_yolo import cli
from hvd_yolo.data.synthetic import write_yolo_dataset
from hvd_yolo.shards.convert import ConversionError, StrictError, convert_dataset
from hvd_yolo.shards.verify import verify_shards
from tests.fixtures import datagen
from tests.fixtures.disks import tmpfs
from tests.mpi_harness import VENV_BIN, run_cli, wait_for

HVD_YOLO = str(VENV_BIN / "hvd-yolo")  # the entry point users run


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
    with tmpfs(tmp_path / "disk", "2m") as mnt:
        yield mnt


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
    wait_for(lambda: list(tmp_path.glob(".out.converting-*")), 120,
             "the conversion's temporary folder", proc)
    proc.kill()  # kill -9 while it converts
    proc.wait(timeout=30)
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


def test_overwrite_deletes_only_what_the_old_manifest_lists(tmp_path: Path) -> None:
    src = write_yolo_dataset(tmp_path / "yolo", 4, seed=8, size=(48, 64))
    out = tmp_path / "out"
    convert_dataset("yolo", src, out, shards=3)
    mine = ["shard-00000.h5.bak", "shard-stats.h5ish.csv", "notes.txt"]
    for name in mine:
        (out / name).write_text("the user's own")
    convert_dataset("yolo", src, out, shards=2, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "shard-00000.h5", "shard-00001.h5", *mine])
    assert all((out / name).read_text() == "the user's own" for name in mine)
    assert verify_shards(out).shards == 2
    # a shard-named file the manifest does not list is not taken for one of ours
    (out / "shard-00007.h5").write_text("not listed")
    with pytest.raises(ConversionError, match=r"shard-00007\.h5: a shard file that --overwrite "
                       "would not replace \\(its manifest.json does not list it\\)"):
        convert_dataset("yolo", src, out, shards=2, overwrite=True)
    assert (out / "shard-00007.h5").read_text() == "not listed"
    (out / "shard-00007.h5").unlink()
    assert verify_shards(out).shards == 2


def test_two_conversions_into_one_new_folder_the_second_fails_naming_the_first(
        tmp_path: Path) -> None:
    """The second conversion is frozen (SIGSTOP) after it checked OUT; the first fills OUT
    meanwhile; the second, resumed, must not replace it."""
    slow = write_yolo_dataset(tmp_path / "slow", 30, seed=3, size=(96, 128))
    fast = write_yolo_dataset(tmp_path / "fast", 4, seed=5, size=(48, 64))
    out = tmp_path / "out"
    proc = subprocess.Popen([HVD_YOLO, "convert", "yolo", str(slow),
                             str(out), "--shards", "2", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: list(tmp_path.glob(".out.converting-*")), 120,
                 "the slow conversion's temporary folder", proc)
        os.kill(proc.pid, signal.SIGSTOP)
        assert proc.poll() is None, "the slow conversion ended before it could be frozen"
        first = [HVD_YOLO, "convert", "yolo", str(fast), str(out),
                 "--shards", "2", "-q"]
        res = subprocess.run(first, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert f"hvd-yolo convert: error: {out} was filled by another conversion while this one ran " \
           f"(`hvd-yolo convert yolo {fast} {out} --shards 2 -q` at " in err
    assert verify_shards(out).images == 4  # the first one's dataset, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast", "out", "slow"]


@pytest.fixture
def mount_point(tmp_path: Path):
    """An empty tmpfs mounted at tmp_path/volume (a Docker/Kubernetes volume); skipped, with
    the reason, where mounting is not allowed."""
    with tmpfs(tmp_path / "volume", "64m") as mnt:
        yield mnt


def test_convert_into_a_mount_point_swaps_its_contents(tmp_path: Path, mount_point: Path,
                                                      capsys: Any) -> None:
    src = write_yolo_dataset(tmp_path / "yolo", 5, seed=8, size=(48, 64))
    assert cli.main(["convert", "yolo", str(src), str(mount_point), "--shards", "3", "-q"]) == 0
    assert sorted(p.name for p in mount_point.iterdir()) == [
        "manifest.json", "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    (mount_point / "README.txt").write_text("the volume's own")
    assert cli.main(["convert", "yolo", str(src), str(mount_point), "--shards", "2", "-q",
                     "--overwrite"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in mount_point.iterdir()) == [
        "README.txt", "manifest.json", "shard-00000.h5", "shard-00001.h5"]
    assert verify_shards(mount_point).shards == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume", "yolo"]
    assert os.path.ismount(mount_point)


def test_convert_names_unreadable_folders_devices_and_undecodable_names(tmp_path: Path) -> None:
    src = write_yolo_dataset(tmp_path / "yolo", 4, seed=8, size=(48, 64))
    images = sorted((src / "images").iterdir())
    # a symlink to /dev/zero, and a file name that is not UTF-8 (Latin-1 bytes)
    os.symlink("/dev/zero", src / "images" / "zero.jpg")
    (src / "labels" / "zero.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    raw = os.fsencode(src / "images") + b"/caf\xe9.jpg"
    os.rename(images[0], raw)
    os.rename(src / "labels" / (images[0].stem + ".txt"), os.fsencode(src / "labels") + b"/caf\xe9.txt")
    out = tmp_path / "out"
    res = subprocess.run([HVD_YOLO, "convert", "yolo", str(src),
                          str(out), "-q"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "inputs 5 = written 3 + skipped 2" in res.stdout
    reasons = {i["item"]: i["reason"] for i in
               json.loads((out / "manifest.json").read_text())["report"]["skipped_items"]}
    assert reasons["zero.jpg"] == "not a regular file (a character device, linked to /dev/zero)"
    assert reasons["caf\\xe9.jpg"].startswith("the file name is not valid UTF-8")
    assert "caf\\xe9.jpg" in res.stdout


def test_convert_names_a_folder_it_may_not_read(tmp_path: Path) -> None:
    """As an unprivileged user (root reads everything): skipped, saying why, where impossible."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the conversion as another user")
    base = Path(tempfile.mkdtemp(prefix="hvd-yolo-perm-"))  # pytest's tmp_path is root-only
    try:
        base.chmod(0o777)
        src = write_yolo_dataset(base / "yolo", 3, seed=8, size=(48, 64))
        for p in [src, *src.rglob("*")]:
            p.chmod(0o777 if p.is_dir() else 0o666)
        (src / "labels").chmod(0o700)  # root's only
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        probe = subprocess.run([*as_nobody, sys.executable, "-c", "import hvd_yolo"],
                               capture_output=True, text=True, timeout=120, cwd=base)
        if probe.returncode != 0:  # e.g. the checkout lies under a folder only root may enter
            pytest.skip("the unprivileged user cannot run this checkout's python: "
                        + (probe.stderr.strip().splitlines() or ["no output"])[-1])
        res = subprocess.run([*as_nobody, HVD_YOLO, "convert", "yolo", str(src),
                              str(base / "out"), "-q"],
                             capture_output=True, text=True, timeout=300, cwd=base)
        assert res.returncode == 1, res.stdout + res.stderr
        assert res.stderr.strip() == (f"hvd-yolo convert: error: {src / 'labels'}: cannot list "
                                      "it (Permission denied): fix its permissions, or convert "
                                      "as a user who can read it")
    finally:
        shutil.rmtree(base, ignore_errors=True)
