"""``hvd-yolo shards verify``: every table, digest, box and (optionally) image of a shard directory.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from hvd_yolo.shards.format import (
    DATASETS,
    MANIFEST_DIGEST,
    SHARD_NAME,
    WRITE_BUFFER,
    ShardError,
    ShardIndex,
    check_dataset,
    crc32,
    datasets_of,
    decode_rgb,
    digest,
    load_manifest,
    read_index,
)


@dataclass
class VerifyResult:
    shards: int
    images: int
    boxes: int
    decoded: int


def verify_shards(
    root: str | Path,
    decode: bool = True,
    progress: Callable[[int], None] | None = None,
) -> VerifyResult:
    """Check a shard directory; raise ``ShardError`` naming the first bad shard/sample.

    Checks: the manifest's own checksum and shard list (plain names, each once, no unlisted
    shard file beside them), manifest and shard attributes agree, index tables are consistent,
    every dataset's sha256 matches the shard's and the manifest's, every box lies inside its
    image with a positive area and a known class, ids and names are unique, counts add up, and
    (``decode``) every image matches its CRC32 and decodes to its recorded size.
    """
    root = Path(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = load_manifest(root)
    unsealed = [w for w in caught if MANIFEST_DIGEST in str(w.message)]
    if unsealed:  # an unsealed manifest fails verification (readers only warn)
        raise ShardError(str(unsealed[0].message))
    num_classes = len(manifest.get("class_names", []))
    entries = manifest.get("shards", [])
    listed = {e["file"] for e in entries}
    unlisted = sorted(p.name for p in root.iterdir() if SHARD_NAME.match(p.name)
                      and p.name not in listed)
    if unlisted:
        raise ShardError(f"{unlisted[0]}: in {root} but not listed in manifest.json (left by "
                         "another conversion, or the manifest lost an entry): remove it, or "
                         "convert the dataset again")
    indexes = []
    for entry in entries:
        path = root / entry["file"]
        if not path.is_file():
            raise ShardError(f"{entry['file']}: listed in the manifest but missing from {root}")
        indexes.append(read_index(path))
    check_dataset(root, manifest, indexes)
    images = boxes = decoded = 0
    for entry, idx in zip(entries, indexes):
        path = root / entry["file"]
        where = entry["file"]
        a = idx.attrs
        sums = json.loads(a.get("sha256", "{}"))
        actual = _dataset_digests(path, datasets_of(idx.version))
        for d in datasets_of(idx.version):
            if sums.get(d) != actual[d]:
                raise ShardError(f"{where}: {d} sha256 mismatch (stored {sums.get(d)}, "
                                 f"computed {actual[d]}): the file is corrupt")
            if entry.get("sha256", {}).get(d) != actual[d]:
                raise ShardError(f"{where}: {d} sha256 differs from manifest.json: the shard "
                                 "was replaced or the manifest belongs to another conversion")
        for i in range(idx.count):
            label = f"{where} sample {i} ({idx.names[i]!r}, id {int(idx.ids[i])})"
            _check_boxes(idx, i, label, num_classes)
        if decode:
            with h5py.File(path, "r") as f:
                data = f["images/bytes"]
                for i in range(idx.count):
                    label = f"{where} sample {i} ({idx.names[i]!r}, id {int(idx.ids[i])})"
                    raw = data[idx.image_offsets[i]:idx.image_offsets[i + 1]]
                    if idx.crc32 is not None and crc32(raw) != int(idx.crc32[i]):
                        raise ShardError(f"{label}: CRC32 {crc32(raw):08x} of its bytes, "
                                         f"images/crc32 records {int(idx.crc32[i]):08x}")
                    try:
                        img = decode_rgb(raw)
                    except Exception as e:  # noqa: BLE001 - report any decoder failure
                        raise ShardError(f"{label}: image does not decode ({e})") from e
                    if tuple(img.shape[1:]) != tuple(int(v) for v in idx.hw[i]):
                        raise ShardError(f"{label}: decodes to {tuple(img.shape[1:])} but hw "
                                         f"records {tuple(int(v) for v in idx.hw[i])}")
                    decoded += 1
                    if progress:
                        progress(1)
        images += idx.count
        boxes += len(idx.cls)
    if images != manifest.get("num_samples"):
        raise ShardError(f"manifest.json: num_samples {manifest.get('num_samples')} but the "
                         f"shards hold {images}")
    if boxes != manifest.get("num_boxes"):
        raise ShardError(f"manifest.json: num_boxes {manifest.get('num_boxes')} but the shards "
                         f"hold {boxes}")
    return VerifyResult(len(entries), images, boxes, decoded)


def _check_boxes(idx: ShardIndex, i: int, label: str, num_classes: int) -> None:
    h, w = (int(v) for v in idx.hw[i])
    if h <= 0 or w <= 0:
        raise ShardError(f"{label}: image size {w}x{h} is not positive")
    a, b = idx.box_offsets[i], idx.box_offsets[i + 1]
    for k in range(a, b):
        x1, y1, x2, y2 = (float(v) for v in idx.xyxy[k])
        if not np.all(np.isfinite(idx.xyxy[k])):
            raise ShardError(f"{label}: box {k - a} has a non-finite coordinate")
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            raise ShardError(f"{label}: box {k - a} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is not "
                             f"inside the {w}x{h} image with a positive area")
        if not 0 <= int(idx.cls[k]) < max(num_classes, 1):
            raise ShardError(f"{label}: box {k - a} has class {int(idx.cls[k])} but the "
                             f"manifest lists {num_classes} classes")


def _dataset_digests(path: Path, datasets: Sequence[str] = DATASETS) -> dict[str, str]:
    out = {}
    with h5py.File(path, "r") as f:
        h = hashlib.sha256()
        data = f["images/bytes"]
        for start in range(0, len(data), WRITE_BUFFER):
            h.update(data[start:start + WRITE_BUFFER].tobytes())
        out["images/bytes"] = h.hexdigest()
        for d in datasets[1:]:
            values = f[d].asstr()[:] if d == "images/name" else f[d][:]
            out[d] = digest(d, values)
    return out
