"""Convert YOLO txt / COCO json / Pascal VOC xml into HDF5 shards, in one process or under MPI.

Pipeline (``convert_dataset``), identical in content for any number of ranks ``N``:

1. rank 0 checks the output directory and parses the annotations into items sorted by name
   (``sources``), then scatters contiguous chunks of items to the ranks;
2. each rank reads its images' bytes, decodes them once with torchvision (to prove they decode
   and to get the size after EXIF orientation), converts boxes to absolute xyxy pixels in the
   oriented image, clips / drops bad boxes and skips bad items, recording every issue
   (``items.process_item``);
3. the valid items, in sorted order, are split into ``S`` shards of balanced counts (a function
   of the sorted inputs and ``S`` only); shard ``s`` is written by rank ``s % N``, which receives
   its records with one ``alltoall``;
4. rank 0 gathers the shard summaries and the issues and writes ``manifest.json`` last.

Collectives use ``comm.world_comm()``: mpi4py's ``COMM_WORLD`` under an MPI launcher with more
than one rank (Horovod is not needed), else a one-process stand-in. Every rank takes the
same collective steps; a failure on any rank reaches every rank as a ``ConversionError``.
"""

from __future__ import annotations

import bisect
import fcntl
import math
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from hvd_yolo.shards.comm import world_comm
from hvd_yolo.shards.format import FORMAT, MANIFEST, VERSION, shard_file_name
from hvd_yolo.shards.items import REENCODE, process_item
from hvd_yolo.shards.report import build_report, created_by
from hvd_yolo.shards.sources.coco import read_coco
from hvd_yolo.shards.sources.common import ConversionError, SourceItem, SourcePlan
from hvd_yolo.shards.sources.voc import read_voc
from hvd_yolo.shards.sources.yolo import read_yolo
from hvd_yolo.shards.writer import SampleRecord, write_manifest, write_shard

FORMATS = ("yolo", "coco", "voc")
LABEL_FRAMES = ("auto", "raw", "display")
DEFAULT_SHARD_SIZE_MB = 256.0
SPILL_DIR = ".reencoded"  # re-encoded images wait here (inside the temp output) until written


class StrictError(ConversionError):
    """``--strict`` stopped at the first bad item or box."""


def _read_plan(fmt: str, source: str | Path, opts: dict[str, Any]) -> SourcePlan:
    if fmt == "yolo":
        return read_yolo(source, names=opts.get("names"),
                         allow_missing_labels=opts.get("allow_missing_labels", False))
    if fmt == "coco":
        return read_coco(source, annotations=opts.get("annotations"), images=opts.get("images"))
    return read_voc(source, names=opts.get("names"), split=opts.get("split"),
                    images=opts.get("images"))


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """Check ``out`` and create the temporary sibling the shards are written into (returned);
    ``out`` itself is not touched until ``_swap_in``."""
    if out.parent.is_dir():
        _remove_stale(out)  # first: it may put back the dataset a killed conversion had moved
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


def _lock_dir(path: Path) -> int | None:
    """An exclusive ``flock`` on the folder itself (it moves with a rename; the kernel drops it
    when the process dies): the open descriptor, or None when another process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove_stale(out: Path) -> None:
    """Remove what a killed conversion into ``out`` left beside it: its temporary folder, and the
    old dataset's trash folder (put back first if the kill came before the new one was renamed
    in). A folder still locked belongs to a conversion that is running: left alone."""
    for p in sorted(out.parent.glob(f".{out.name}.old-*")) + sorted(
            out.parent.glob(f".{out.name}.converting-*")):
        fd = _lock_dir(p) if p.is_dir() else None
        if fd is None:
            continue
        try:
            if ".old-" in p.name and (p / out.name).is_dir() and not out.exists():
                os.rename(p / out.name, out)  # the old dataset, back where it was
            shutil.rmtree(p)
            print(f"removed {p}, left by a conversion that did not finish", file=sys.stderr)
        finally:
            os.close(fd)


def _ours(name: str) -> bool:
    """A file the converter writes (or left half-written) in an output directory."""
    return name == MANIFEST or name.startswith(MANIFEST + ".tmp") or (
        name.startswith("shard-") and ".h5" in name)


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp``: old directory renamed to a trash sibling, new
    one renamed in, the user's own files (not shards/manifest) moved across, trash deleted."""
    if not out.exists():
        os.rename(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    trash_lock = _lock_dir(trash)  # a conversion starting meanwhile leaves it alone
    os.rename(out, trash / out.name)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(trash / out.name, out)  # put the old dataset back
        raise
    for p in (trash / out.name).iterdir():
        if not _ours(p.name):
            os.rename(p, out / p.name)
    shutil.rmtree(trash, ignore_errors=True)
    if trash_lock is not None:
        os.close(trash_lock)


def _num_shards(valid: int, nbytes: int, shards: int | None, shard_size_mb: float | None
                ) -> tuple[int, list[str]]:
    notes = []
    if shards is not None:
        want = shards
    else:
        mb = shard_size_mb if shard_size_mb is not None else DEFAULT_SHARD_SIZE_MB
        want = max(1, math.ceil(nbytes / (mb * 2**20)))
    s = max(1, min(want, valid))
    if s < want:
        notes.append(f"{want} shards requested but only {valid} images were written: "
                     f"{s} shards of one image")
    return s, notes


def _check_options(fmt: str, shards: int | None, shard_size_mb: float | None,
                   label_frame: str, reencode: str | None) -> None:
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if shards is not None and shard_size_mb is not None:
        raise ConversionError("give --shards or --shard-size, not both")
    if shards is not None and (not isinstance(shards, int) or shards < 1):
        raise ConversionError(f"--shards must be a positive integer, got {shards!r}")
    if shard_size_mb is not None and not shard_size_mb > 0:
        raise ConversionError(f"--shard-size must be a positive number of MB, got {shard_size_mb}")
    if label_frame not in LABEL_FRAMES:
        raise ConversionError(f"label_frame must be one of {LABEL_FRAMES}, got {label_frame!r}")
    if reencode is not None and reencode not in REENCODE:
        raise ConversionError(f"--reencode must be one of {', '.join(REENCODE)}, got {reencode!r}")


def _raise_first(errors: list[str | None]) -> None:
    errs = [e for e in errors if e]
    if errs:
        raise ConversionError(errs[0])


def convert_dataset(
    fmt: str,
    source: str | Path,
    out: str | Path,
    shards: int | None = None,
    shard_size_mb: float | None = None,
    overwrite: bool = False,
    strict: bool = False,
    names: str | Path | list[str] | None = None,
    annotations: str | Path | None = None,
    images: str | Path | None = None,
    split: str | None = None,
    allow_missing_labels: bool = False,
    label_frame: str = "auto",
    reencode: str | None = None,
    comm: Any = None,
    progress: bool = False,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Convert ``source`` (``fmt`` = yolo | coco | voc) into shards in ``out``; return the report.

    Works in one process and under ``mpirun -np N`` (every rank calls it with the same arguments
    and gets the same report). ``shards`` fixes the shard count, ``shard_size_mb`` derives it
    from the encoded bytes (default 256 MB); shards hold balanced sample counts either way.
    Bad items are skipped and reported; with ``strict`` the first one raises ``StrictError``.
    ``label_frame`` says whether boxes refer to the stored pixels (``raw``) or the EXIF-rotated
    image (``display``); ``auto``: YOLO labels are display-frame, VOC/COCO raw-frame unless their
    declared image size is the rotated one. ``reencode="png"`` stores images that are not JPEG
    or PNG (TIFF, BMP, WEBP...) re-encoded losslessly as PNG, each listed in the report; by
    default they are skipped with the reason. Raises ``ConversionError`` on unusable input.
    """
    _check_options(fmt, shards, shard_size_mb, label_frame, reencode)
    comm = comm if comm is not None else world_comm()
    rank, size = comm.Get_rank(), comm.Get_size()
    out = Path(out).resolve()
    opts = {"names": names, "annotations": annotations, "images": images, "split": split,
            "allow_missing_labels": allow_missing_labels}

    # 1. plan on rank 0, scatter contiguous chunks of the sorted items
    plan, err, tmp, tmp_lock = None, None, None, None
    if rank == 0:
        try:
            plan = _read_plan(fmt, source, opts)
            tmp = _prepare_out(out, overwrite)  # every rank writes here; rank 0 swaps it in
            tmp_lock = _lock_dir(tmp)  # held to the end: marks the folder as in use
        except ConversionError as e:
            err = str(e)
        except Exception as e:  # noqa: BLE001 - every rank must learn about the failure
            err = f"{type(e).__name__}: {e}"
    err, tmp = comm.bcast((err, tmp), root=0)
    _raise_first([err])
    try:
        n = len(plan.items) if plan is not None else 0
        chunks = ([plan.items[r * n // size:(r + 1) * n // size] for r in range(size)]
                  if plan is not None else None)
        meta = None
        if plan is not None:
            meta = {k: v for k, v in vars(plan).items() if k != "items"}
            meta["n"] = n
        meta = comm.bcast(meta, root=0)
        mine: list[SourceItem] = comm.scatter(chunks, root=0)
        n = meta["n"]
        start = rank * n // size

        # 2. check every item of this rank's chunk against its image
        records: list[SampleRecord] = []
        issues: list[dict[str, Any]] = []
        counts = {"seen": 0, "dropped": 0, "clipped": 0, "in_skipped": 0, "written": 0}
        strict_hit, local_err = None, None
        bar = _progress(len(mine), "convert", progress and rank == 0)
        spill = tmp / SPILL_DIR
        try:
            if reencode is not None:
                spill.mkdir(exist_ok=True)
            for k, item in enumerate(mine):
                rec, its, seen = process_item(item, meta["root"], label_frame, reencode, spill)
                counts["seen"] += seen
                if rec is None:
                    counts["in_skipped"] += seen
                else:
                    records.append(rec)
                    counts["written"] += len(rec.boxes)
                for it in its:
                    if it.kind in ("dropped", "clipped"):
                        counts[it.kind] += 1
                    issues.append(it.to_dict())
                its = [it for it in its if it.kind != "reencoded"]  # reported, not a problem
                if strict and its:
                    strict_hit = (start + k, its[0].message(), its[0].kind)
                    break
                if bar is not None:
                    bar.update(1)
        except Exception as e:  # noqa: BLE001
            local_err = f"rank {rank}: {type(e).__name__}: {e}"
        finally:
            if bar is not None:
                bar.close()
        stats = comm.allgather((len(records), sum(r.nbytes for r in records), strict_hit, local_err))
        _raise_first([s[3] for s in stats])
        hits = sorted(s[2] for s in stats if s[2] is not None)
        if hits:
            _, msg, kind = hits[0]
            what = "box" if kind in ("clipped", "dropped") else "item"
            raise StrictError(f"--strict: stopped at the first bad {what}: {msg}\n(fix the input, or "
                              "run without --strict to skip bad items and boxes and list them in the "
                              "manifest's report)")
        valid = sum(s[0] for s in stats)
        if valid == 0:
            first = comm.gather(issues[:1], root=0)
            first = next((f[0] for f in (first or []) if f), None)
            first = comm.bcast(first, root=0)
            why = f"; first: {first['file']}: {first['reason']}" if first else ""
            raise ConversionError(f"no images written: all {n} inputs were skipped{why}")
        num_shards, shard_notes = _num_shards(valid, sum(s[1] for s in stats), shards, shard_size_mb)

        # 3. route each record to the rank that writes its shard
        bounds = [s * valid // num_shards for s in range(num_shards + 1)]
        before = sum(s[0] for s in stats[:rank])
        send: list[list[tuple[int, int, SampleRecord]]] = [[] for _ in range(size)]
        for j, rec in enumerate(records, before):
            s = bisect.bisect_right(bounds, j) - 1
            send[s % size].append((s, j, rec))
        received = comm.alltoall(send)
        gathered_issues = comm.gather((issues, counts), root=0)

        # 4. write this rank's shards; rank 0 writes the manifest last
        summaries, local_err = [], None
        by_shard: dict[int, list[tuple[int, SampleRecord]]] = defaultdict(list)
        for part in received:
            for s, j, rec in part:
                by_shard[s].append((j, rec))
        try:
            for s in sorted(by_shard):
                recs = [r for _, r in sorted(by_shard[s], key=lambda t: t[0])]
                summaries.append((s, write_shard(tmp / shard_file_name(s), s, num_shards, recs)))
        except Exception as e:  # noqa: BLE001
            local_err = f"rank {rank}: writing shards failed: {type(e).__name__}: {e}"
        written = comm.gather((summaries, local_err), root=0)
        result, err = None, None
        if rank == 0:
            try:
                _raise_first([w[1] for w in written])
                shutil.rmtree(tmp / SPILL_DIR, ignore_errors=True)  # every shard is written
                entries = [e for _, e in sorted((s for w in written for s in w[0]),
                                                key=lambda t: t[0])]
                all_issues = [i for part, _ in gathered_issues for i in part]
                tot = {k: sum(c[k] for _, c in gathered_issues) for k in counts}
                report = build_report(n, valid, num_shards, all_issues, tot,
                                 list(meta["notes"]) + shard_notes)
                manifest = {
                    "format": FORMAT,
                    "version": VERSION,
                    "class_names": list(meta["class_names"]),
                    "category_ids": [int(c) for c in meta["category_ids"]],
                    "num_samples": valid,
                    "num_boxes": sum(e["boxes"] for e in entries),
                    "num_shards": num_shards,
                    "shards": entries,
                    "source": {"format": fmt, "root": meta["root"], "image_root": meta["image_root"],
                               "annotation": meta["annotation"]},
                    "options": {"shards": shards, "shard_size_mb": shard_size_mb, "strict": strict,
                                "label_frame": label_frame, "split": split, "reencode": reencode,
                                "allow_missing_labels": allow_missing_labels},
                    "report": report,
                    "created_by": created_by(command, size),
                }
                write_manifest(tmp, manifest)
                _swap_in(tmp, out)  # every rank's shards are written (the gather above)
                result = {**report, "out": str(out), "manifest": str(out / MANIFEST)}
            except Exception as e:  # noqa: BLE001
                err = str(e) if isinstance(e, ConversionError) else f"{type(e).__name__}: {e}"
        result, err = comm.bcast((result, err), root=0)
        _raise_first([err])
        return result
    except BaseException:
        if rank == 0:  # the old dataset (if any) is untouched: drop the unfinished one
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if tmp_lock is not None:
            os.close(tmp_lock)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
