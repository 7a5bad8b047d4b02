"""One source item -> one shard record: read the bytes, check they decode, orient and check the
boxes; every problem becomes an ``Issue`` (skip the item, clip or drop a box).
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np

from hvd_yolo.shards.format import decode_rgb
from hvd_yolo.shards.sources.common import Issue, SourceItem, rel_name
from hvd_yolo.shards.writer import SampleRecord

CLIP_TOLERANCE = 0.01  # pixels a box may stick out of the image before the clip is reported
REENCODE = ("png",)  # convert --reencode: what images the shard format cannot keep become
# Pillow modes PNG stores as they are ("I" only when its values fit 16 bits), and modes turned
# into RGB first (a colour-space change, reported as such).
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I")
_TO_RGB_MODES = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La", "PA")


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


def reencode_png(data: bytes) -> tuple[bytes, str]:
    """``data`` (TIFF, BMP, WEBP, GIF...) re-encoded losslessly as PNG by Pillow, its EXIF
    orientation applied to the pixels; returns the PNG bytes and what was done, for the report.
    Raises ValueError when the pixels cannot be kept exactly (float or 32-bit samples)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        kind, frames, mode = im.format or "image", getattr(im, "n_frames", 1), im.mode
        img = ImageOps.exif_transpose(im)
        done = f"{kind} re-encoded losslessly as PNG"
        if mode == "I":
            lo, hi = img.getextrema()
            if lo < 0 or hi > 65535:
                raise ValueError(f"{kind} with 32-bit samples ({lo}..{hi}) cannot be stored as "
                                 "PNG exactly: rescale it to 8 or 16 bits first")
        elif mode in _TO_RGB_MODES:
            img = img.convert("RGB")
            done += f" (colour mode {mode} converted to RGB)"
        elif mode not in _PNG_MODES:
            raise ValueError(f"{kind} with pixel mode {mode} cannot be stored as PNG exactly: "
                             "convert it to 8- or 16-bit RGB or grey first")
        if frames > 1:
            done += f" (first of {frames} frames)"
        out = io.BytesIO()
        img.save(out, format="PNG")
    return out.getvalue(), done


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a file"


def process_item(
    item: SourceItem, root: str, label_frame: str = "auto", reencode: str | None = None,
    spill: Path | None = None,
) -> tuple[SampleRecord | None, list[Issue], int]:
    """Check one item against its image: (record or None if skipped, issues, boxes seen).

    JPEG and PNG bytes are stored as they are. Other formats are skipped with the reason, or,
    with ``reencode="png"``, re-encoded losslessly as PNG (reported as a ``reencoded`` issue);
    the boxes are then oriented from the original file's EXIF orientation, as for a JPEG.
    Re-encoded bytes go to a file in ``spill`` (kept in the record without one)."""
    seen = len(item.boxes)
    if item.error is not None:
        return None, [item.error], seen
    assert item.image is not None
    img_rel = rel_name(Path(item.image), Path(root))

    def skip(reason: str, file: str = img_rel) -> tuple[None, list[Issue], int]:
        return None, [Issue(item.name, file, None, reason)], seen

    try:
        item.name.encode("utf-8")
    except UnicodeEncodeError:
        return skip("the file name is not valid UTF-8 (shards store names as UTF-8): rename "
                    "the file")
    try:
        mode = os.stat(item.image).st_mode
    except FileNotFoundError:
        what = "a broken symbolic link" if os.path.islink(item.image) else "no such file"
        return skip(f"cannot read image ({what})")
    except OSError as e:
        return skip(f"cannot read image ({e.strerror or e})")
    if not stat.S_ISREG(mode):
        return skip(f"not a regular file ({_file_kind(mode)}"
                    + (f", linked to {os.path.realpath(item.image)}" if os.path.islink(item.image)
                       else "") + ")")
    try:
        data = Path(item.image).read_bytes()
    except OSError as e:
        return skip(f"cannot read image ({e.strerror or e})")
    if not data:
        return skip("image file is empty")
    kind = _sniff(data)
    stored, notes = data, []
    if kind not in ("JPEG", "PNG"):
        if reencode != "png":
            return skip(f"unsupported image format ({kind}): images are stored as their original "
                        "JPEG/PNG bytes; convert it to JPEG or PNG first, or run convert with "
                        "--reencode png to store it re-encoded losslessly")
        try:
            stored, done = reencode_png(data)
        except Exception as e:  # noqa: BLE001 - Pillow's errors name the problem
            return skip(f"cannot re-encode this {kind} image as PNG: {e}")
        notes.append(Issue(item.name, img_rel, None, done, kind="reencoded"))
    try:
        img = decode_rgb(stored)
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
    path: str | None = item.image
    if stored is not data:  # re-encoded: spilled to a file, so a rank's chunk is not held in RAM
        path = None
        if spill is not None:
            path = str(spill / f"{int(item.image_id)}.png")
            Path(path).write_bytes(stored)
    rec = SampleRecord(
        name=item.name, image_id=int(item.image_id), hw=(h, w), nbytes=len(stored),
        path=path, data=stored if stored is not data and path is None else None,
        boxes=boxes[keep].astype(np.float32).reshape(-1, 4),
        classes=item.classes[keep].astype(np.int32),
        iscrowd=item.iscrowd[keep].astype(np.uint8),
        difficult=item.difficult[keep].astype(np.uint8),
    )
    return rec, notes + issues, seen


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
