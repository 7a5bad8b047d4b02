"""Writing one shard: a record per image, the tables, the checksums, atomically.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hvd_yolo.shards.format import (
    DATASETS,
    DTYPES,
    FORMAT,
    MANIFEST,
    MANIFEST_DIGEST,
    VERSION,
    WRITE_BUFFER,
    ShardError,
    crc32,
    digest,
    manifest_digest,
)


@dataclass
class SampleRecord:
    """One image ready to be written: metadata, boxes, and where its encoded bytes are."""

    name: str
    image_id: int
    hw: tuple[int, int]
    nbytes: int
    path: str | None = None  # file to read the encoded bytes from
    data: bytes | None = None  # or the bytes themselves
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is None:
            raise ShardError(f"record {self.name!r} has neither bytes nor a path")
        data = Path(self.path).read_bytes()
        if len(data) != self.nbytes:
            raise ShardError(
                f"{self.path} changed during conversion ({self.nbytes} bytes when checked, "
                f"{len(data)} now): do not modify the source while converting"
            )
        return data


def write_shard(
    path: str | Path,
    shard_index: int,
    num_shards: int,
    records: Sequence[SampleRecord],
) -> dict[str, Any]:
    """Write ``records`` as one shard (atomically: a temp file renamed at the end).

    The shard is built in memory first, so a rank needs about twice the shard's size in RAM
    (``convert --shard-size-mb``, 256 MB by default).

    Returns the manifest entry: file, count, boxes, bytes and the per-dataset sha256.
    """
    path = Path(path)
    n = len(records)
    image_offsets = np.zeros(n + 1, np.int64)
    image_offsets[1:] = np.cumsum([r.nbytes for r in records], dtype=np.int64)
    box_counts = [len(r.boxes) for r in records]
    box_offsets = np.zeros(n + 1, np.int64)
    box_offsets[1:] = np.cumsum(box_counts, dtype=np.int64)
    arrays: dict[str, Any] = {
        "images/offsets": image_offsets,
        "images/hw": np.array([r.hw for r in records], np.int32).reshape(n, 2),
        "images/id": np.array([r.image_id for r in records], np.int64),
        "images/name": [r.name for r in records],
        "boxes/xyxy": _cat([r.boxes for r in records], np.float32, (0, 4)),
        "boxes/cls": _cat([r.classes for r in records], np.int32, (0,)),
        "boxes/offsets": box_offsets,
        "boxes/iscrowd": _cat([r.iscrowd for r in records], np.uint8, (0,)),
        "boxes/difficult": _cat([r.difficult for r in records], np.uint8, (0,)),
    }
    # The shard is built in memory (HDF5's core driver, no backing file) and written out with
    # plain file I/O: a full disk then fails in os.write with ENOSPC, reported by name, and
    # never inside libhdf5's flush of a half-written file (which crashed the process).
    sums: dict[str, str] = {}
    f = h5py.File(f"{path.name}.inmemory", "w", driver="core", backing_store=False)
    try:
        total = int(image_offsets[-1])
        ds = f.create_dataset("images/bytes", shape=(total,), dtype="u1", track_times=False)
        sums["images/bytes"], arrays["images/crc32"] = _write_bytes(ds, records, image_offsets)
        for name, values in arrays.items():
            if name == "images/name":
                f.create_dataset(name, data=np.array(values, dtype=object),
                                 dtype=h5py.string_dtype("utf-8"), track_times=False)
            else:
                f.create_dataset(name, data=np.asarray(values, dtype=DTYPES[name]),
                                 track_times=False)
            sums[name] = digest(name, values)
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        f.attrs["shard_index"] = shard_index
        f.attrs["num_shards"] = num_shards
        f.attrs["count"] = n
        f.attrs["num_boxes"] = int(box_offsets[-1])
        f.attrs["sha256"] = json.dumps({k: sums[k] for k in DATASETS}, sort_keys=True)
        f.flush()
        image = f.id.get_file_image()
    except ShardError:
        raise
    except Exception as e:
        raise ShardError(f"{path}: writing failed ({_write_failure(e)})") from e
    finally:
        f.close()
    _write_file_atomically(path, image)
    return {
        "file": path.name,
        "count": n,
        "boxes": int(box_offsets[-1]),
        "bytes": int(image_offsets[-1]),
        "sha256": {k: sums[k] for k in DATASETS},
    }


def _write_failure(e: BaseException) -> str:
    """One line for a failed write: 'no space left on device' when HDF5 or the OS says so."""
    text = str(e)
    if getattr(e, "errno", None) == errno.ENOSPC or "errno = 28" in text or "No space left" in text:
        return "no space left on device: free some space or write the shards elsewhere"
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _write_file_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp sibling, fsync and rename; a failure (a full
    disk) removes the temp file and raises ShardError naming ``path``."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            view = memoryview(data)
            for start in range(0, len(view), WRITE_BUFFER):
                out.write(view[start:start + WRITE_BUFFER])
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ShardError(f"{path}: writing failed ({_write_failure(e)})") from e


def _cat(parts: list[np.ndarray], dtype: Any, empty_shape: tuple[int, ...]) -> np.ndarray:
    parts = [np.asarray(p, dtype=dtype) for p in parts if len(p)]
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty_shape, dtype)


def _write_bytes(ds: h5py.Dataset, records: Sequence[SampleRecord], offsets: np.ndarray
                 ) -> tuple[str, np.ndarray]:
    """Stream every record's bytes into ``ds`` in large pieces; return their sha256 and the
    CRC32 of each record's bytes."""
    h = hashlib.sha256()
    crcs = np.zeros(len(records), np.uint32)
    buf: list[bytes] = []
    start = pending = 0
    for i, rec in enumerate(records):
        data = rec.read_bytes()
        if len(data) != offsets[i + 1] - offsets[i]:
            raise ShardError(f"{rec.name}: {len(data)} bytes, expected {rec.nbytes}")
        h.update(data)
        crcs[i] = crc32(data)
        buf.append(data)
        pending += len(data)
        if pending >= WRITE_BUFFER or i == len(records) - 1:
            if pending:
                ds[start:start + pending] = np.frombuffer(b"".join(buf), np.uint8)
            start += pending
            buf, pending = [], 0
    return h.hexdigest(), crcs


def write_manifest(root: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically, sealed with its own checksum (``manifest_sha256``)."""
    manifest = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    path = Path(root) / MANIFEST
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ShardError(f"{path}: writing failed ({_write_failure(e)})") from e
    return path
