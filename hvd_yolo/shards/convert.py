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

Over 350 lines on purpose: one job, convert_dataset; plan, scatter, agreement, routing and swap
are one collective sequence every rank runs in order, and split apart it would hide which rank
calls what.
"""

from __future__ import annotations

import bisect
import math
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvd_yolo.shards.comm import world_comm
from hvd_yolo.shards.format import FORMAT, MANIFEST, VERSION, shard_file_name
from hvd_yolo.shards.items import REENCODE, process_item
from hvd_yolo.shards.output import lock_dir, prepare_out, swap_in
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
        return read_coco(source, annotations=opts.get("annotations"), images=opts.get("images"),
                         allow_absolute_paths=opts.get("allow_absolute_paths", False))
    return read_voc(source, names=opts.get("names"), split=opts.get("split"),
                    images=opts.get("images"))


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
    allow_absolute_paths: bool = False,
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
    default they are skipped with the reason. A COCO ``file_name`` outside the image folder is
    skipped and reported (absolute paths are read with ``allow_absolute_paths``). Raises
    ``ConversionError`` on unusable input.
    """
    _check_options(fmt, shards, shard_size_mb, label_frame, reencode)
    comm = comm if comm is not None else world_comm()
    out = Path(out).resolve()
    opts = {"names": names, "annotations": annotations, "images": images, "split": split,
            "allow_missing_labels": allow_missing_labels,
            "allow_absolute_paths": allow_absolute_paths}
    options = {"shards": shards, "shard_size_mb": shard_size_mb, "strict": strict,
               "label_frame": label_frame, "split": split, "reencode": reencode,
               "allow_missing_labels": allow_missing_labels,
               "allow_absolute_paths": allow_absolute_paths}

    # 1. rank 0 reads the annotations and makes the temporary output folder
    plan, tmp, tmp_lock = _plan_on_root(comm, fmt, source, opts, out, overwrite)
    try:
        # 2. contiguous chunks of the sorted items to the ranks; each checks its items' images
        meta, mine = _scatter(comm, plan)
        start = comm.Get_rank() * meta["n"] // comm.Get_size()  # this chunk's first item
        checked = _check_items(comm, mine, start, meta["root"], label_frame, reencode,
                               tmp / SPILL_DIR, strict, progress)
        # 3. every rank learns the counts (and any error or --strict stop); the shard count
        stats = _agree(comm, checked, meta["n"])
        valid = sum(s[0] for s in stats)
        num_shards, shard_notes = _num_shards(valid, sum(s[1] for s in stats), shards,
                                              shard_size_mb)
        # 4. each record to the rank that writes its shard (shard s: rank s % N), then write
        before = sum(s[0] for s in stats[:comm.Get_rank()])
        written = _write_shards(comm, checked.records, before, valid, num_shards, tmp)
        gathered = comm.gather((checked.issues, checked.counts), root=0)
        # 5. rank 0 writes the manifest last and swaps the new dataset in
        result, err = None, None
        if comm.Get_rank() == 0:
            try:
                report = _combine_reports(meta, valid, num_shards, gathered, shard_notes)
                entries = _entries(written)
                shutil.rmtree(tmp / SPILL_DIR, ignore_errors=True)  # every shard is written
                write_manifest(tmp, _manifest(fmt, meta, valid, num_shards, entries, options,
                                              report, created_by(command, comm.Get_size())))
                swap_in(tmp, out, overwrite)
                result = {**report, "out": str(out), "manifest": str(out / MANIFEST)}
            except Exception as e:  # noqa: BLE001 - every rank must learn about the failure
                err = str(e) if isinstance(e, ConversionError) else f"{type(e).__name__}: {e}"
        result, err = comm.bcast((result, err), root=0)
        _raise_first([err])
        return result
    except BaseException:
        if comm.Get_rank() == 0:  # the old dataset (if any) is untouched: drop the unfinished one
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if tmp_lock is not None:
            os.close(tmp_lock)


@dataclass
class _Checked:
    """One rank's part after step 2: its records, issues, counts, and how its loop ended."""

    records: list[SampleRecord] = field(default_factory=list)
    issues: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("seen", "dropped", "clipped", "in_skipped", "written"), 0))
    strict_hit: tuple[int, str, str] | None = None  # (global index, message, kind)
    error: str | None = None


def _plan_on_root(comm: Any, fmt: str, source: str | Path, opts: dict[str, Any], out: Path,
                  overwrite: bool) -> tuple[SourcePlan | None, Path, int | None]:
    """Rank 0 reads the plan and creates (and locks) the temporary output; every rank gets the
    folder, or the same ConversionError."""
    plan, err, tmp, tmp_lock = None, None, None, None
    if comm.Get_rank() == 0:
        try:
            plan = _read_plan(fmt, source, opts)
            tmp = prepare_out(out, overwrite)  # every rank writes here; rank 0 swaps it in
            tmp_lock = lock_dir(tmp)  # held to the end: marks the folder as in use
        except ConversionError as e:
            err = str(e)
        except Exception as e:  # noqa: BLE001 - every rank must learn about the failure
            err = f"{type(e).__name__}: {e}"
    err, tmp = comm.bcast((err, tmp), root=0)
    _raise_first([err])
    return plan, tmp, tmp_lock


def _scatter(comm: Any, plan: SourcePlan | None) -> tuple[dict[str, Any], list[SourceItem]]:
    """The plan's metadata to every rank, and rank r its r-th contiguous chunk of items."""
    size = comm.Get_size()
    chunks, meta = None, None
    if plan is not None:
        n = len(plan.items)
        chunks = [plan.items[r * n // size:(r + 1) * n // size] for r in range(size)]
        meta = {k: v for k, v in vars(plan).items() if k != "items"} | {"n": n}
    meta = comm.bcast(meta, root=0)
    return meta, comm.scatter(chunks, root=0)


def _check_items(comm: Any, mine: list[SourceItem], start: int, root: str, label_frame: str,
                 reencode: str | None, spill: Path, strict: bool, progress: bool) -> _Checked:
    """Check this rank's items against their images (``items.process_item``); count and keep
    every issue. Errors are kept, not raised: every rank must reach the next collective."""
    rank = comm.Get_rank()
    out = _Checked()
    bar = _progress(len(mine), "convert", progress and rank == 0)
    try:
        if reencode is not None:
            spill.mkdir(exist_ok=True)
        for k, item in enumerate(mine):
            rec, its, seen = process_item(item, root, label_frame, reencode, spill)
            out.counts["seen"] += seen
            if rec is None:
                out.counts["in_skipped"] += seen
            else:
                out.records.append(rec)
                out.counts["written"] += len(rec.boxes)
            for it in its:
                if it.kind in ("dropped", "clipped"):
                    out.counts[it.kind] += 1
                out.issues.append(it.to_dict())
            problems = [it for it in its if it.kind != "reencoded"]  # reported, not a problem
            if strict and problems:
                out.strict_hit = (start + k, problems[0].message(), problems[0].kind)
                break
            if bar is not None:
                bar.update(1)
    except Exception as e:  # noqa: BLE001
        out.error = f"rank {rank}: {type(e).__name__}: {e}"
    finally:
        if bar is not None:
            bar.close()
    return out


def _agree(comm: Any, checked: _Checked, n: int) -> list[tuple[Any, ...]]:
    """Every rank's (records, bytes, --strict stop, error); raises on every rank alike for an
    error, a --strict stop (the first in input order) or nothing left to write."""
    stats = comm.allgather((len(checked.records), sum(r.nbytes for r in checked.records),
                            checked.strict_hit, checked.error))
    _raise_first([s[3] for s in stats])
    hits = sorted(s[2] for s in stats if s[2] is not None)
    if hits:
        _, msg, kind = hits[0]
        what = "box" if kind in ("clipped", "dropped") else "item"
        raise StrictError(f"--strict: stopped at the first bad {what}: {msg}\n(fix the input, or "
                          "run without --strict to skip bad items and boxes and list them in the "
                          "manifest's report)")
    if sum(s[0] for s in stats) == 0:
        first = comm.gather(checked.issues[:1], root=0)
        first = next((f[0] for f in (first or []) if f), None)
        first = comm.bcast(first, root=0)
        why = f"; first: {first['file']}: {first['reason']}" if first else ""
        raise ConversionError(f"no images written: all {n} inputs were skipped{why}")
    return stats


def _write_shards(comm: Any, records: list[SampleRecord], before: int, valid: int,
                  num_shards: int, tmp: Path) -> list[tuple[list, str | None]] | None:
    """Route records (global positions ``before``...) to the rank writing their shard (balanced
    counts, in input order) with one alltoall; write this rank's shards; rank 0 gets every
    rank's (shard summaries, error)."""
    size = comm.Get_size()
    bounds = [s * valid // num_shards for s in range(num_shards + 1)]
    send: list[list[tuple[int, int, SampleRecord]]] = [[] for _ in range(size)]
    for j, rec in enumerate(records, before):
        s = bisect.bisect_right(bounds, j) - 1
        send[s % size].append((s, j, rec))
    by_shard: dict[int, list[tuple[int, SampleRecord]]] = defaultdict(list)
    for part in comm.alltoall(send):
        for s, j, rec in part:
            by_shard[s].append((j, rec))
    summaries, error = [], None
    try:
        for s in sorted(by_shard):
            recs = [r for _, r in sorted(by_shard[s], key=lambda t: t[0])]
            summaries.append((s, write_shard(tmp / shard_file_name(s), s, num_shards, recs)))
    except Exception as e:  # noqa: BLE001
        error = f"rank {comm.Get_rank()}: writing shards failed: {type(e).__name__}: {e}"
    return comm.gather((summaries, error), root=0)


def _entries(written: list[tuple[list, str | None]]) -> list[dict[str, Any]]:
    """The manifest's shard entries in shard order (raises the first rank's write error)."""
    _raise_first([w[1] for w in written])
    return [e for _, e in sorted((s for w in written for s in w[0]), key=lambda t: t[0])]


def _combine_reports(meta: dict[str, Any], valid: int, num_shards: int,
                     gathered: list[tuple[list, dict[str, int]]], notes: list[str]) -> dict[str, Any]:
    issues = [i for part, _ in gathered for i in part]
    counts = {k: sum(c[k] for _, c in gathered) for k in gathered[0][1]}
    return build_report(meta["n"], valid, num_shards, issues, counts, list(meta["notes"]) + notes)


def _manifest(fmt: str, meta: dict[str, Any], valid: int, num_shards: int,
              entries: list[dict[str, Any]], options: dict[str, Any], report: dict[str, Any],
              provenance: dict[str, Any]) -> dict[str, Any]:
    return {
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
        "options": options,
        "report": report,
        "created_by": provenance,
    }


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from hvd_yolo.progress import progress_bar  # tqdm on a terminal, else a line per interval

    return progress_bar(total=total, desc=desc, unit="img")
