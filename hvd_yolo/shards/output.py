"""The conversion's output folder: a locked temporary folder that the shards are written into,
swapped in for ``OUT`` at the end (the old dataset survives any failure), and the clean-up of
what a killed conversion left behind.

The temporary folder is a sibling of ``OUT`` (``.OUT.converting-*``), renamed over it at the end.
When ``OUT`` is a mount point (a Docker or Kubernetes volume: it cannot be renamed), the
temporary folder is inside it (``OUT/.hvd-yolo-converting-*``) and the files are swapped
instead (through ``OUT/.hvd-yolo-old-*``). The swap re-checks ``OUT`` while holding a lock on
its parent: a conversion that finds ``OUT`` filled by another one meanwhile fails, naming it,
instead of replacing it. ``--overwrite`` deletes only what the old ``manifest.json`` lists, and
the manifest itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hvd_yolo.shards.format import MANIFEST, SHARD_NAME, plain_file_name
from hvd_yolo.shards.sources.common import ConversionError

_WORK = (".hvd-yolo-converting-", ".hvd-yolo-old-")  # working folders inside a mount-point OUT


def is_mount_point(path: Path) -> bool:
    """True when ``path`` is a mount point, bind mounts of the same file system included
    (``os.path.ismount`` misses those)."""
    if os.path.ismount(path):
        return True
    target = str(path.resolve())
    try:
        with open("/proc/self/mountinfo") as f:
            points = {_unescape(line.split()[4]) for line in f if len(line.split()) > 4}
    except OSError:
        return False
    return target in points


def _unescape(field: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def listed_files(out: Path) -> set[str] | None:
    """The files ``out/manifest.json`` lists, plus the manifest (None: no readable manifest)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        entries = manifest["shards"]
        return {MANIFEST} | {e["file"] for e in entries if plain_file_name(e.get("file"))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def prepare_out(out: Path, overwrite: bool) -> Path:
    """Check ``out`` and create the temporary folder the shards are written into (returned);
    ``out`` itself is not touched until ``swap_in``."""
    if out.parent.is_dir():
        remove_stale(out)  # first: it may put back the dataset a killed conversion had moved
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} exists and is not a directory")
    in_place = out.is_dir() and is_mount_point(out)
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        running = [e for e in entries if e.startswith(_WORK)]
        if running and not overwrite:
            raise ConversionError(f"another conversion into {out} is running (its folder "
                                  f"{out / running[0]}): wait for it, or choose a new directory")
        entries = [e for e in entries if not e.startswith(_WORK)]
        if entries and not overwrite:
            raise ConversionError(
                f"output directory {out} is not empty ({len(entries)} entries, e.g. "
                f"{entries[0]!r}): choose a new directory, or pass --overwrite to replace the "
                "shards and manifest in it")
        if overwrite:
            _check_overwrite(out, entries)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if in_place:
            return Path(tempfile.mkdtemp(prefix=_WORK[0], dir=out))
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    except OSError as e:
        raise ConversionError(f"cannot create the output next to {out} ({e.strerror or e})") from e


def _check_overwrite(out: Path, entries: list[str]) -> None:
    """``--overwrite`` replaces only what the old manifest lists: a shard-named file it does not
    list could be taken for a new shard, so it is refused, named."""
    listed = listed_files(out) or set()
    strays = [e for e in entries if SHARD_NAME.match(e) and e not in listed]
    if strays:
        why = "its manifest.json does not list it" if listed else "it has no readable manifest.json"
        raise ConversionError(f"{out / strays[0]}: a shard file that --overwrite would not "
                              f"replace ({why}): move it away, or choose a new directory")


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


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """``flock`` on ``folder`` (blocking): conversions into its children swap one at a time."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_stale(out: Path) -> None:
    """Remove what a killed conversion into ``out`` left: its temporary folder, and the old
    dataset's trash folder (put back first if the kill came before the new one was in). A folder
    still locked belongs to a conversion that is running: left alone."""
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
    if not (out.is_dir() and is_mount_point(out)):
        return
    for p in sorted(out.glob(_WORK[1] + "*")) + sorted(out.glob(_WORK[0] + "*")):
        fd = lock_dir(p) if p.is_dir() else None
        if fd is None:
            continue
        try:
            if p.name.startswith(_WORK[1]) and not (out / MANIFEST).exists():
                _restore(p, out)
            shutil.rmtree(p)
            print(f"removed {p}, left by a conversion that did not finish", file=sys.stderr)
        finally:
            os.close(fd)


def _restore(trash: Path, out: Path) -> None:
    """A swap of contents killed before the new manifest was in: the old files back."""
    old = listed_files(trash) or set()
    for p in out.iterdir():  # new shards moved in before the kill
        if SHARD_NAME.match(p.name) and p.name not in old:
            p.unlink()
    for p in trash.iterdir():
        os.replace(p, out / p.name)


def _filled_by(out: Path) -> str:
    try:
        made = json.loads((out / MANIFEST).read_text()).get("created_by") or {}
        return f"`{' '.join(map(str, made.get('command') or []))}` at {made.get('time')}"
    except (OSError, ValueError, AttributeError):
        return "another process"


def swap_in(tmp: Path, out: Path, overwrite: bool = True) -> None:
    """Replace ``out`` by the finished ``tmp``, holding a lock on ``out``'s parent. Without
    ``overwrite``, ``out`` must still be missing or empty (another conversion may have filled
    it meanwhile: ConversionError naming it). A folder: renamed to a trash sibling, the new one
    renamed in, the user's own files (all but what the old manifest lists) moved across, trash
    deleted. A mount point (``tmp`` inside it): the files are swapped."""
    with _locked(out.parent):
        if out.is_dir():
            entries = [p.name for p in out.iterdir() if not p.name.startswith(_WORK)]
            if entries and not overwrite:
                raise ConversionError(
                    f"{out} was filled by another conversion while this one ran ({_filled_by(out)})"
                    ": nothing was replaced; convert into a new directory, or pass --overwrite")
        if tmp.parent == out:
            _swap_contents(tmp, out)
            return
        if not out.exists():
            os.rename(tmp, out)
            return
        listed = listed_files(out) or {MANIFEST}
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        trash_lock = lock_dir(trash)  # a conversion starting meanwhile leaves it alone
        try:
            os.rename(out, trash / out.name)
        except OSError as e:  # a mount point that was not recognised as one
            shutil.rmtree(trash, ignore_errors=True)
            if trash_lock is not None:
                os.close(trash_lock)
            if e.errno not in (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES):
                raise
            _swap_contents(tmp, out)
            return
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(trash / out.name, out)  # put the old dataset back
            raise
        for p in (trash / out.name).iterdir():
            if p.name not in listed:
                os.rename(p, out / p.name)
        shutil.rmtree(trash, ignore_errors=True)
        if trash_lock is not None:
            os.close(trash_lock)


def _swap_contents(tmp: Path, out: Path) -> None:
    """Swap files inside ``out``: the old manifest and the shards it lists to a trash folder in
    ``out``, the new shards in, the new manifest last, trash deleted. A kill before the new
    manifest is in is undone by the next conversion's ``remove_stale``."""
    listed = listed_files(out) or {MANIFEST}
    trash = Path(tempfile.mkdtemp(prefix=_WORK[1], dir=out))
    trash_lock = lock_dir(trash)
    try:
        for name in [MANIFEST, *sorted(listed - {MANIFEST})]:
            if (out / name).exists():
                os.rename(out / name, trash / name)
        for p in sorted(tmp.iterdir()):
            if p.name != MANIFEST:
                shutil.move(p, out / p.name)  # a rename unless tmp is on another file system
        shutil.move(tmp / MANIFEST, out / MANIFEST)
    except BaseException:
        _restore(trash, out)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    finally:
        if trash_lock is not None:
            os.close(trash_lock)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
