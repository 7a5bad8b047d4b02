"""Convert YOLO txt / COCO json / Pascal VOC xml into HDF5 shards, in one process or under MPI.

Pipeline (``convert_dataset``), identical in content for any number of ranks ``N``:

1. rank 0 checks the output directory and parses the annotations into items sorted by name
   (``readers``), then scatters contiguous chunks of items to the ranks;
2. each rank reads its images' bytes, decodes them once with torchvision (to prove they decode
   and to get the size after EXIF orientation), converts boxes to absolute xyxy pixels in the
   oriented image, clips / drops bad boxes and skips bad items, recording every issue;
3. the valid items, in sorted order, are split into ``S`` shards of balanced counts (a function
   of the sorted inputs and ``S`` only); shard ``s`` is written by rank ``s % N``, which receives
   its records with one ``alltoall``;
4. rank 0 gathers the shard summaries and the issues and writes ``manifest.json`` last.

Collectives use mpi4py's ``COMM_WORLD`` when launched by an MPI launcher with more than one
rank (Horovod is not needed), otherwise a trivial one-process communicator. Every rank takes the
same collective steps; a failure on any rank reaches every rank as a ``ConversionError``.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from hvd_yolo.data.readers import (
    ConversionError,
    Issue,
    SourceItem,
    SourcePlan,
    _rel,
    read_coco,
    read_voc,
    read_yolo,
)
from hvd_yolo.data.shards import (
    FORMAT,
    MANIFEST,
    VERSION,
    SampleRecord,
    decode_rgb,
    shard_file_name,
    write_manifest,
    write_shard,
)

__all__ = ["FORMATS", "ConversionError", "StrictError", "convert_dataset", "format_report",
           "process_item", "world_comm"]

FORMATS = ("yolo", "coco", "voc")
LABEL_FRAMES = ("auto", "raw", "display")
DEFAULT_SHARD_SIZE_MB = 256.0
CLIP_TOLERANCE = 0.01  # pixels a box may stick out of the image before the clip is reported
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE",
                  "SLURM_STEP_NUM_TASKS")


class StrictError(ConversionError):
    """``--strict`` stopped at the first bad item or box."""


class SerialComm:
    """The subset of an mpi4py communicator the converter uses, for one process."""

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's spelling
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def scatter(self, objs: list[Any], root: int = 0) -> Any:
        return objs[0]

    def gather(self, obj: Any, root: int = 0) -> list[Any]:
        return [obj]

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def alltoall(self, objs: list[Any]) -> list[Any]:
        return list(objs)


def world_comm() -> Any:
    """mpi4py's ``COMM_WORLD`` when an MPI launcher started > 1 ranks, else ``SerialComm``."""
    sizes = [int(os.environ[v]) for v in _MPI_SIZE_VARS if os.environ.get(v, "").isdigit()]
    if not sizes or max(sizes) <= 1:
        if int(os.environ.get("HOROVOD_SIZE", "1") or 1) > 1:
            raise ConversionError("conversion runs on MPI (mpi4py), not Horovod's Gloo launcher: "
                                  "use `mpirun -np N hvd-yolo convert ...` instead of horovodrun")
        return SerialComm()
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ConversionError(f"launched by MPI with {max(sizes)} ranks but mpi4py cannot be "
                              f"imported ({e}): pip install mpi4py") from e
    return MPI.COMM_WORLD


# ----------------------------------------------------------------------------- one item


def _sniff(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    for magic, name in ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF")):
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return "unknown"


def _orientation(data: bytes) -> tuple[tuple[int, int], int]:
    """(raw width, raw height) and the EXIF orientation (1 when absent or invalid)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        size = im.size
        try:
            o = int(im.getexif().get(0x0112, 1))
        except Exception:  # noqa: BLE001 - a broken EXIF block means "no orientation"
            o = 1
    return size, o if 1 <= o <= 8 else 1


def orient_boxes(boxes: np.ndarray, orientation: int, raw_wh: tuple[int, int]) -> np.ndarray:
    """Map xyxy boxes from the stored (raw) pixel frame to the EXIF-oriented (display) frame."""
    if orientation == 1 or not len(boxes):
        return boxes
    w, h = raw_wh
    x1, y1, x2, y2 = boxes.T

    def pt(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return {2: (w - x, y), 3: (w - x, h - y), 4: (x, h - y), 5: (y, x),
                6: (h - y, x), 7: (h - y, w - x), 8: (y, w - x)}[orientation]

    ax, ay = pt(x1, y1)
    bx, by = pt(x2, y2)
    return np.stack([np.minimum(ax, bx), np.minimum(ay, by),
                     np.maximum(ax, bx), np.maximum(ay, by)], axis=1)


def process_item(
    item: SourceItem, root: str, label_frame: str = "auto"
) -> tuple[SampleRecord | None, list[Issue], int]:
    """Check one item against its image: (record or None if skipped, issues, boxes seen)."""
    seen = len(item.boxes)
    if item.error is not None:
        return None, [item.error], seen
    assert item.image is not None
    img_rel = _rel(Path(item.image), Path(root))

    def skip(reason: str, file: str = img_rel) -> tuple[None, list[Issue], int]:
        return None, [Issue(item.name, file, None, reason)], seen

    try:
        data = Path(item.image).read_bytes()
    except OSError as e:
        return skip(f"cannot read image ({e.strerror or e})")
    if not data:
        return skip("image file is empty")
    kind = _sniff(data)
    if kind not in ("JPEG", "PNG"):
        return skip(f"unsupported image format ({kind}): images are stored as their original "
                    "JPEG/PNG bytes, never re-encoded; convert it to JPEG or PNG first")
    try:
        img = decode_rgb(data)
        raw_wh, orientation = _orientation(data)
    except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt image
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        msg = ", ".join(p for p in msg.split(", ") if ".cpp:" not in p and p != "decode_jpeg")
        return skip(f"corrupt or unreadable {kind} image: {msg}")
    h, w = int(img.shape[1]), int(img.shape[2])
    del img
    disp_wh = (w, h)
    expected = raw_wh if orientation < 5 else (raw_wh[1], raw_wh[0])
    if disp_wh != expected:
        if disp_wh != raw_wh:
            return skip(f"decoders disagree on the image size ({disp_wh} vs {raw_wh})")
        orientation = 1  # the decoder did not apply this orientation: neither do the boxes
    label_file = item.label or img_rel
    frame = label_frame
    if item.declared_size is not None and item.declared_size not in (raw_wh, disp_wh):
        dw, dh = item.declared_size
        return skip(f"annotation says the image is {dw}x{dh} but {img_rel} is {w}x{h}: wrong "
                    "image for this annotation?", label_file)
    if frame == "auto":
        if item.units == "normalized":
            frame = "display"  # YOLO labels refer to the image as viewed (EXIF applied)
        elif item.declared_size is not None and item.declared_size != raw_wh:
            frame = "display"  # the annotation's size is the rotated one
        else:
            frame = "raw"
    boxes = item.boxes.astype(np.float64, copy=True)
    if item.units == "normalized":
        fw, fh = disp_wh if frame == "display" else raw_wh
        boxes *= np.array([fw, fh, fw, fh], np.float64)
    if frame == "raw":
        boxes = orient_boxes(boxes, orientation, raw_wh)
    keep, issues = _check_boxes(item, boxes, w, h, label_file)
    rec = SampleRecord(
        name=item.name, image_id=int(item.image_id), hw=(h, w), nbytes=len(data), path=item.image,
        boxes=boxes[keep].astype(np.float32).reshape(-1, 4),
        classes=item.classes[keep].astype(np.int32),
        iscrowd=item.iscrowd[keep].astype(np.uint8),
        difficult=item.difficult[keep].astype(np.uint8),
    )
    return rec, issues, seen


def _check_boxes(
    item: SourceItem, boxes: np.ndarray, w: int, h: int, file: str
) -> tuple[np.ndarray, list[Issue]]:
    """Clip boxes to the image (reporting real clips) and drop NaN / empty ones (in place)."""
    keep = np.ones(len(boxes), bool)
    issues = []
    for k in range(len(boxes)):
        line, prefix = item.refs[k] if k < len(item.refs) else (None, "")
        b = boxes[k]
        desc = "(" + ", ".join(f"{v:.6g}" for v in b) + ")"
        if not np.all(np.isfinite(b)):
            keep[k] = False
            issues.append(Issue(item.name, file, line, f"{prefix}box {desc} has a NaN or infinite "
                                "coordinate: dropped", "dropped"))
            continue
        if b[2] <= b[0] or b[3] <= b[1]:
            keep[k] = False
            issues.append(Issue(item.name, file, line, f"{prefix}box {desc} has zero or negative "
                                "area: dropped", "dropped"))
            continue
        c = np.clip(b, 0, [w, h, w, h])
        if c[2] <= c[0] or c[3] <= c[1]:
            keep[k] = False
            issues.append(Issue(item.name, file, line, f"{prefix}box {desc} lies outside the "
                                f"{w}x{h} image: dropped", "dropped"))
            continue
        if np.abs(c - b).max() > CLIP_TOLERANCE:
            issues.append(Issue(item.name, file, line, f"{prefix}box {desc} extends outside the "
                                f"{w}x{h} image: clipped to "
                                + "(" + ", ".join(f"{v:.6g}" for v in c) + ")", "clipped"))
        boxes[k] = c
    return keep, issues


# ----------------------------------------------------------------------------- the pipeline


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
                   label_frame: str) -> None:
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
    declared image size is the rotated one. Raises ``ConversionError`` on unusable input.
    """
    _check_options(fmt, shards, shard_size_mb, label_frame)
    comm = comm if comm is not None else world_comm()
    rank, size = comm.Get_rank(), comm.Get_size()
    out = Path(out).resolve()
    opts = {"names": names, "annotations": annotations, "images": images, "split": split,
            "allow_missing_labels": allow_missing_labels}

    # 1. plan on rank 0, scatter contiguous chunks of the sorted items
    plan, err, tmp = None, None, None
    if rank == 0:
        try:
            plan = _read_plan(fmt, source, opts)
            tmp = _prepare_out(out, overwrite)  # every rank writes here; rank 0 swaps it in
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
        try:
            for k, item in enumerate(mine):
                rec, its, seen = process_item(item, meta["root"], label_frame)
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
                entries = [e for _, e in sorted((s for w in written for s in w[0]),
                                                key=lambda t: t[0])]
                all_issues = [i for part, _ in gathered_issues for i in part]
                tot = {k: sum(c[k] for _, c in gathered_issues) for k in counts}
                report = _report(n, valid, num_shards, all_issues, tot,
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
                                "label_frame": label_frame, "split": split,
                                "allow_missing_labels": allow_missing_labels},
                    "report": report,
                    "created_by": _created_by(command, size),
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


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


def _report(n: int, valid: int, num_shards: int, issues: list[dict[str, Any]],
            counts: dict[str, int], notes: list[str]) -> dict[str, Any]:
    skipped = [i for i in issues if i["kind"] == "skipped"]
    box_issues = [i for i in issues if i["kind"] != "skipped"]
    assert n == valid + len(skipped), (n, valid, len(skipped))
    return {
        "inputs": n,
        "written": valid,
        "skipped": len(skipped),
        "num_shards": num_shards,
        "boxes_seen": counts["seen"],
        "boxes_written": counts["written"],
        "boxes_clipped": counts["clipped"],
        "boxes_dropped": counts["dropped"],
        "boxes_in_skipped_items": counts["in_skipped"],
        "skipped_items": skipped,
        "box_issues": box_issues,
        "notes": notes,
    }


def _created_by(command: list[str] | None, ranks: int) -> dict[str, Any]:
    from hvd_yolo import __version__

    return {"command": command if command is not None else list(sys.argv), "ranks": ranks,
            "hvd_yolo": __version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def format_report(report: dict[str, Any], max_lines: int = 20) -> str:
    """The end-of-conversion summary: inputs = written + skipped, boxes, then the issues."""
    r = report
    lines = [
        f"inputs {r['inputs']} = written {r['written']} + skipped {r['skipped']}"
        f" -> {r['num_shards']} shard(s) in {r.get('out', '?')}",
        f"boxes  {r['boxes_seen']} seen = written {r['boxes_written']} + dropped "
        f"{r['boxes_dropped']} + in skipped items {r['boxes_in_skipped_items']}"
        f" ({r['boxes_clipped']} clipped to the image)",
    ]
    for title, rows in (("skipped", r["skipped_items"]), ("box issues", r["box_issues"])):
        if rows:
            lines.append(f"{title}:")
            for i in rows[:max_lines]:
                where = f"{i['file']}:{i['line']}" if i["line"] else i["file"]
                lines.append(f"  {where}: {i['reason']}")
            if len(rows) > max_lines:
                lines.append(f"  ... and {len(rows) - max_lines} more (all listed in "
                             f"{MANIFEST} under report)")
    lines += [f"note: {note}" for note in r.get("notes", [])]
    return "\n".join(lines)
