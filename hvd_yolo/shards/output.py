"""The conversion's output folder: a locked temporary sibling that the shards are written into,
swapped in for ``OUT`` at the end (the old dataset survives any failure), and the clean-up of
what a killed conversion left beside ``OUT``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path

from hvd_yolo.shards.format import MANIFEST
from hvd_yolo.shards.sources.common import ConversionError


def prepare_out(out: Path, overwrite: bool) -> Path:
    """Check ``out`` and create the temporary sibling the shards are written into (returned);
    ``out`` itself is not touched until ``swap_in``."""
    if out.parent.is_dir():
        remove_stale(out)  # first: it may put back the dataset a killed conversion had moved
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} exists and is not a directory")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries and not overwrite:
            raise ConversionError(
                f"output directory {out} is not empty ({len(entries)} entries, e.g. "
                f"{entries[0]!r}): choose a new directory, or pass --overwrite to replace the "
                "shards and manifest in it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    except OSError as e:
        raise ConversionError(f"cannot create the output next to {out} ({e.strerror or e})") from e


def lock_dir(path: Path) -> int | None:
    """An exclusive ``flock`` on the folder itself (it moves with a rename; the kernel drops it
    when the process dies): the open descriptor, or None when another process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def remove_stale(out: Path) -> None:
    """Remove what a killed conversion into ``out`` left beside it: its temporary folder, and the
    old dataset's trash folder (put back first if the kill came before the new one was renamed
    in). A folder still locked belongs to a conversion that is running: left alone."""
    for p in sorted(out.parent.glob(f".{out.name}.old-*")) + sorted(
            out.parent.glob(f".{out.name}.converting-*")):
        fd = lock_dir(p) if p.is_dir() else None
        if fd is None:
            continue
        try:
            if ".old-" in p.name and (p / out.name).is_dir() and not out.exists():
                os.rename(p / out.name, out)  # the old dataset, back where it was
            shutil.rmtree(p)
            print(f"removed {p}, left by a conversion that did not finish", file=sys.stderr)
        finally:
            os.close(fd)


def is_ours(name: str) -> bool:
    """A file the converter writes (or left half-written) in an output directory."""
    return name == MANIFEST or name.startswith(MANIFEST + ".tmp") or (
        name.startswith("shard-") and ".h5" in name)


def swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp``: old directory renamed to a trash sibling, new
    one renamed in, the user's own files (not shards/manifest) moved across, trash deleted."""
    if not out.exists():
        os.rename(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    trash_lock = lock_dir(trash)  # a conversion starting meanwhile leaves it alone
    os.rename(out, trash / out.name)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(trash / out.name, out)  # put the old dataset back
        raise
    for p in (trash / out.name).iterdir():
        if not is_ours(p.name):
            os.rename(p, out / p.name)
    shutil.rmtree(trash, ignore_errors=True)
    if trash_lock is not None:
        os.close(trash_lock)
