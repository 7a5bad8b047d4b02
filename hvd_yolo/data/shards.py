"""The shard format: one write-once HDF5 file per shard plus ``manifest.json``.

Datasets of a shard with ``n`` images and ``m`` boxes::

    images/bytes    uint8  [sum]   original encoded JPEG/PNG bytes, concatenated, never re-encoded
    images/offsets  int64  [n+1]   image i is bytes[offsets[i]:offsets[i+1]]
    images/hw       int32  [n,2]   (height, width) after EXIF orientation
    images/id       int64  [n]     stable image id (COCO id, else 1-based index of sorted inputs)
    images/name     utf-8  [n]     file name relative to the source image folder
    images/crc32    uint32 [n]     zlib.crc32 of image i's encoded bytes (version 2; checked on read)
    boxes/xyxy      float32[m,4]   absolute pixels in the oriented image
    boxes/cls       int32  [m]     contiguous class id
    boxes/offsets   int64  [n+1]   image i owns boxes[offsets[i]:offsets[i+1]]
    boxes/iscrowd   uint8  [m]     COCO iscrowd
    boxes/difficult uint8  [m]     Pascal VOC difficult

Attributes: ``format``, ``version``, ``shard_index``, ``num_shards``, ``count``, ``num_boxes``
and ``sha256`` (JSON: dataset path -> hex digest of its canonical bytes, see ``digest``).

Integrity on read: ``read_index`` checks every index table (all but ``images/bytes``) against
its recorded sha256 when a shard is opened; readers check a sample's CRC32 on every read.
Version 1 shards (no ``images/crc32``) stay readable, unchecked per sample, with a warning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

try:  # zlib-ng's SIMD CRC-32: the same values as zlib.crc32, ~5x faster (bench data)
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; plain zlib still works
    from zlib import crc32

# Images are decoded with torchvision.io; torchvision 0.29 marks them deprecated in favour
# of TorchCodec with a warning on every call. Silence exactly that message, nothing else.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of "
                        "TorchVision are deprecated", category=DeprecationWarning)

FORMAT = "hvd_yolo.shards"
VERSION = 2  # 2: images/crc32 added
READABLE = (1, 2)  # versions this hvd_yolo reads
MANIFEST = "manifest.json"
DATASETS = (
    "images/bytes", "images/offsets", "images/hw", "images/id", "images/name", "images/crc32",
    "boxes/xyxy", "boxes/cls", "boxes/offsets", "boxes/iscrowd", "boxes/difficult",
)
DATASETS_V1 = tuple(d for d in DATASETS if d != "images/crc32")
_DTYPES = {
    "images/bytes": "<u1", "images/offsets": "<i8", "images/hw": "<i4", "images/id": "<i8",
    "images/crc32": "<u4",
    "boxes/xyxy": "<f4", "boxes/cls": "<i4", "boxes/offsets": "<i8", "boxes/iscrowd": "<u1",
    "boxes/difficult": "<u1",
}
_WRITE_BUFFER = 32 << 20  # image bytes are written to HDF5 in pieces of about this size


class ShardError(RuntimeError):
    """A shard directory is missing, malformed or fails verification."""


class CorruptSample(ShardError):
    """One sample's bytes fail their CRC32 or do not decode (the message names shard, index and
    file name)."""


def datasets_of(version: int) -> tuple[str, ...]:
    """The datasets a shard of format ``version`` holds."""
    return DATASETS if version >= 2 else DATASETS_V1


def error_text(exc: BaseException) -> str:
    """A ShardError's own message, also when a DataLoader worker re-raised it wrapped in its
    traceback text ("Caught CorruptSample in DataLoader worker process 0. Original Traceback")."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [ln for ln in text.splitlines() if ln and not ln[0].isspace()][-1]
    head, sep, message = last.partition(": ")
    return message if sep and head.replace(".", "").replace("_", "").isalnum() else text


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


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


def digest(name: str, values: np.ndarray | Sequence[str]) -> str:
    """sha256 of a dataset's canonical bytes (little-endian C order; names joined by NUL)."""
    if name == "images/name":
        return hashlib.sha256(b"\0".join(str(s).encode("utf-8") for s in values)).hexdigest()
    arr = np.ascontiguousarray(np.asarray(values), dtype=np.dtype(_DTYPES[name]))
    return hashlib.sha256(arr.tobytes()).hexdigest()


def write_shard(
    path: str | Path,
    shard_index: int,
    num_shards: int,
    records: Sequence[SampleRecord],
) -> dict[str, Any]:
    """Write ``records`` as one shard (atomically: a temp file renamed at the end).

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
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    sums: dict[str, str] = {}
    try:
        f = h5py.File(tmp, "w")
    except OSError as e:
        raise ShardError(f"{path}: cannot create ({_write_failure(e)})") from e
    try:
        total = int(image_offsets[-1])
        ds = f.create_dataset("images/bytes", shape=(total,), dtype="u1", track_times=False)
        sums["images/bytes"], arrays["images/crc32"] = _write_bytes(ds, records, image_offsets)
        for name, values in arrays.items():
            if name == "images/name":
                f.create_dataset(name, data=np.array(values, dtype=object),
                                 dtype=h5py.string_dtype("utf-8"), track_times=False)
            else:
                f.create_dataset(name, data=np.asarray(values, dtype=_DTYPES[name]),
                                 track_times=False)
            sums[name] = digest(name, values)
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        f.attrs["shard_index"] = shard_index
        f.attrs["num_shards"] = num_shards
        f.attrs["count"] = n
        f.attrs["num_boxes"] = int(box_offsets[-1])
        f.attrs["sha256"] = json.dumps({k: sums[k] for k in DATASETS}, sort_keys=True)
        f.flush()  # a full disk fails here, with the file still open, not inside close()
        f.close()
        os.replace(tmp, path)
    except Exception as e:
        # A failed write (ENOSPC) is caught while the file is still open and reported by name;
        # the file is closed once, quietly (HDF5 may fail again flushing it).
        _close_failed(f)
        tmp.unlink(missing_ok=True)
        if isinstance(e, ShardError):
            raise
        raise ShardError(f"{path}: writing failed ({_write_failure(e)})") from e
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


def _close_failed(f: h5py.File) -> None:
    """Close a file whose writing failed, once; HDF5 may fail again flushing it."""
    try:
        if f.id.valid:
            f.close()
    except Exception:  # noqa: BLE001 - the first error is the one reported
        pass


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
        if pending >= _WRITE_BUFFER or i == len(records) - 1:
            if pending:
                ds[start:start + pending] = np.frombuffer(b"".join(buf), np.uint8)
            start += pending
            buf, pending = [], 0
    return h.hexdigest(), crcs


# ----------------------------------------------------------------------------- reading


@dataclass
class ShardIndex:
    """Everything of a shard except the image bytes (small: kept in memory by readers)."""

    path: Path
    count: int
    image_offsets: np.ndarray
    hw: np.ndarray
    ids: np.ndarray
    names: list[str]
    box_offsets: np.ndarray
    xyxy: np.ndarray
    cls: np.ndarray
    iscrowd: np.ndarray
    difficult: np.ndarray
    attrs: dict[str, Any]
    crc32: np.ndarray | None = None  # None: a version 1 shard (no per-sample checksums)
    nbytes: int = 0  # length of images/bytes

    @property
    def version(self) -> int:
        return int(self.attrs.get("version", 0))


def read_index(path: str | Path, check: bool = True) -> ShardIndex:
    """Load a shard's index tables (opens and closes the file). With ``check``, every table is
    hashed and compared with the sha256 recorded in the shard: a mismatch raises ShardError
    naming the shard and the table (they are small; ``images/bytes`` is checked per sample)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
            version = attrs.get("version")
            if attrs.get("format") != FORMAT or version not in READABLE:
                raise ShardError(f"{path}: format/version attributes {attrs.get('format')!r}/"
                                 f"{version!r}: not a {FORMAT} shard of version "
                                 f"{' or '.join(map(str, READABLE))}")
            missing = [d for d in datasets_of(version) if d not in f]
            if missing:
                raise ShardError(f"{path}: missing datasets {missing}: not a {FORMAT} shard")
            tables = {d: (f[d].asstr()[:] if d == "images/name" else f[d][:])
                      for d in datasets_of(version) if d != "images/bytes"}
            nbytes = int(f["images/bytes"].shape[0])
    except OSError as e:
        raise ShardError(f"{path}: cannot open as HDF5 ({e})") from e
    if check:
        _check_digests(path, attrs, tables)
    crc = tables.get("images/crc32")
    return ShardIndex(
        path=path,
        count=int(attrs.get("count", len(tables["images/id"]))),
        image_offsets=tables["images/offsets"].astype(np.int64),
        hw=tables["images/hw"].astype(np.int64),
        ids=tables["images/id"].astype(np.int64),
        names=[str(s) for s in tables["images/name"]],
        box_offsets=tables["boxes/offsets"].astype(np.int64),
        xyxy=tables["boxes/xyxy"].astype(np.float32).reshape(-1, 4),
        cls=tables["boxes/cls"].astype(np.int64),
        iscrowd=tables["boxes/iscrowd"].astype(np.uint8),
        difficult=tables["boxes/difficult"].astype(np.uint8),
        attrs=attrs,
        crc32=crc.astype(np.uint32) if crc is not None else None,
        nbytes=nbytes,
    )


def _check_digests(path: Path, attrs: dict[str, Any], tables: dict[str, Any]) -> None:
    """Compare each index table's sha256 with the one the shard records (ShardError if not)."""
    try:
        stored = json.loads(attrs.get("sha256", "{}"))
    except ValueError:
        stored = None
    if not isinstance(stored, dict):
        raise ShardError(f"{path}: the sha256 attribute is not valid JSON: the file is corrupt; "
                         "convert the dataset again")
    for name, values in tables.items():
        actual = digest(name, values)
        if stored.get(name) != actual:
            raise ShardError(f"{path}: {name} sha256 mismatch (stored {stored.get(name)}, "
                             f"computed {actual}): the index table is corrupt; check the "
                             f"directory with `hvd-yolo shards verify {path.parent}` and convert "
                             "the dataset again")


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def load_manifest(root: str | Path) -> dict[str, Any]:
    """Read and sanity-check ``root/manifest.json``."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ShardError(f"{root}: no such directory")
    if not path.is_file():
        raise ShardError(
            f"{path} not found: {root} is not a shard directory, or its conversion did not "
            "finish (rank 0 writes manifest.json last); run `hvd-yolo convert` again"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") not in READABLE:
        raise ShardError(
            f"{path}: shard format version {manifest.get('version')} but this hvd_yolo reads "
            f"versions {', '.join(map(str, READABLE))}: convert the dataset again"
        )
    return manifest


def write_manifest(root: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically."""
    path = Path(root) / MANIFEST
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ShardError(f"{path}: writing failed ({_write_failure(e)})") from e
    return path


def decode_rgb(data: np.ndarray | bytes) -> Any:
    """Decode encoded image bytes to a uint8 [3,H,W] RGB tensor, EXIF orientation applied."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    if isinstance(data, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8))
    else:
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    img = decode_image(t, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    if img.dtype != torch.uint8:  # 16-bit PNG
        from torchvision.transforms.v2.functional import to_dtype

        img = to_dtype(img, torch.uint8, scale=True)
    return img


# ----------------------------------------------------------------------------- verify


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

    Checks: manifest and shard attributes agree, index tables are consistent, every dataset's
    sha256 matches the shard's and the manifest's, every box lies inside its image with a
    positive area and a known class, ids and names are unique, counts add up, and (``decode``)
    every image matches its CRC32 and decodes to its recorded size.
    """
    root = Path(root)
    manifest = load_manifest(root)
    num_classes = len(manifest.get("class_names", []))
    entries = manifest.get("shards", [])
    ids: set[int] = set()
    names: set[str] = set()
    images = boxes = decoded = 0
    for si, entry in enumerate(entries):
        fname = entry.get("file", "?")
        path = root / fname
        if not path.is_file():
            raise ShardError(f"{fname}: listed in the manifest but missing from {root}")
        idx = read_index(path)
        where = fname
        a = idx.attrs
        if a.get("version") != manifest.get("version"):
            raise ShardError(f"{where}: format version {a.get('version')} but manifest.json "
                             f"says {manifest.get('version')}")
        if a.get("shard_index") != si:
            raise ShardError(f"{where}: shard_index attribute {a.get('shard_index')}, expected {si}")
        check_tables(idx, where, entry)
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
            if int(idx.ids[i]) in ids:
                raise ShardError(f"{label}: duplicate image id")
            if idx.names[i] in names:
                raise ShardError(f"{label}: duplicate image name")
            ids.add(int(idx.ids[i]))
            names.add(idx.names[i])
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


def check_tables(idx: ShardIndex, where: str, entry: dict[str, Any]) -> None:
    """Lengths and offsets of the index tables agree with each other and with the manifest."""
    n, m = idx.count, len(idx.cls)
    if entry.get("count") != n or len(idx.ids) != n:
        raise ShardError(f"{where}: holds {len(idx.ids)} images (count attr {n}) but the "
                         f"manifest says {entry.get('count')}")
    if entry.get("boxes") != m:
        raise ShardError(f"{where}: holds {m} boxes but the manifest says {entry.get('boxes')}")
    for name, arr, end in (("images/offsets", idx.image_offsets, None),
                           ("boxes/offsets", idx.box_offsets, m)):
        if len(arr) != n + 1 or arr[0] != 0 or np.any(np.diff(arr) < 0):
            raise ShardError(f"{where}: {name} is not a non-decreasing table of n+1 offsets")
        if end is not None and arr[-1] != end:
            raise ShardError(f"{where}: {name} ends at {arr[-1]}, expected {end}")
    if idx.image_offsets[-1] != idx.nbytes:
        raise ShardError(f"{where}: images/offsets ends at {idx.image_offsets[-1]} but "
                         f"images/bytes holds {idx.nbytes} bytes")
    if idx.crc32 is not None and len(idx.crc32) != n:
        raise ShardError(f"{where}: images/crc32 has {len(idx.crc32)} entries, expected {n}")
    if idx.hw.shape != (n, 2) or len(idx.names) != n:
        raise ShardError(f"{where}: images/hw or images/name has the wrong length")
    if idx.xyxy.shape != (m, 4) or len(idx.iscrowd) != m or len(idx.difficult) != m:
        raise ShardError(f"{where}: boxes tables have inconsistent lengths")


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
        for start in range(0, len(data), _WRITE_BUFFER):
            h.update(data[start:start + _WRITE_BUFFER].tobytes())
        out["images/bytes"] = h.hexdigest()
        for d in datasets[1:]:
            values = f[d].asstr()[:] if d == "images/name" else f[d][:]
            out[d] = digest(d, values)
    return out


# ----------------------------------------------------------------------------- info

_SIZE_BINS = (0, 128, 256, 384, 512, 640, 800, 1024, 1333, 2048, 4096)


def shard_info(root: str | Path) -> dict[str, Any]:
    """Counts, classes, boxes per class, image and box size statistics (no image decoded)."""
    root = Path(root)
    manifest = load_manifest(root)
    names = list(manifest.get("class_names", []))
    per_class = np.zeros(len(names), np.int64)
    crowd = difficult = 0
    long_sides: list[np.ndarray] = []
    sizes: Counter[tuple[int, int]] = Counter()
    boxes_per_image: list[np.ndarray] = []
    areas: list[np.ndarray] = []
    shards = []
    for entry in manifest.get("shards", []):
        idx = read_index(root / entry["file"])
        per_class += np.bincount(idx.cls, minlength=len(names))[: len(names)]
        crowd += int(idx.iscrowd.sum())
        difficult += int(idx.difficult.sum())
        long_sides.append(idx.hw.max(axis=1) if idx.count else np.zeros(0, np.int64))
        sizes.update((int(w), int(h)) for h, w in idx.hw)
        boxes_per_image.append(np.diff(idx.box_offsets))
        areas.append((idx.xyxy[:, 2] - idx.xyxy[:, 0]) * (idx.xyxy[:, 3] - idx.xyxy[:, 1]))
        shards.append({"file": entry["file"], "count": idx.count, "boxes": len(idx.cls),
                       "bytes": int(idx.image_offsets[-1])})
    longs = np.concatenate(long_sides) if long_sides else np.zeros(0)
    hist, _ = np.histogram(longs, bins=[*_SIZE_BINS, np.inf])
    bpi = np.concatenate(boxes_per_image) if boxes_per_image else np.zeros(0)
    area = np.concatenate(areas) if areas else np.zeros(0)
    return {
        "root": str(root),
        "num_samples": int(manifest.get("num_samples", 0)),
        "num_boxes": int(manifest.get("num_boxes", 0)),
        "num_shards": len(shards),
        "bytes": int(sum(s["bytes"] for s in shards)),
        "shards": shards,
        "classes": [
            {"id": i, "name": n, "source_id": manifest.get("category_ids", [None] * len(names))[i],
             "boxes": int(per_class[i])}
            for i, n in enumerate(names)
        ],
        "iscrowd": crowd,
        "difficult": difficult,
        "images_without_boxes": int((bpi == 0).sum()),
        "max_boxes_per_image": int(bpi.max()) if len(bpi) else 0,
        "box_area": {"small(<32^2)": int((area < 32**2).sum()),
                     "medium": int(((area >= 32**2) & (area < 96**2)).sum()),
                     "large(>=96^2)": int((area >= 96**2).sum())},
        "long_side_histogram": [
            {"from": _SIZE_BINS[i], "to": (_SIZE_BINS[i + 1] if i + 1 < len(_SIZE_BINS) else None),
             "count": int(c)}
            for i, c in enumerate(hist)
        ],
        "common_sizes": [{"width": w, "height": h, "count": c} for (w, h), c in sizes.most_common(8)],
        "report": manifest.get("report", {}),
    }


def format_info(info: dict[str, Any], width: int = 40) -> str:
    """``shard_info`` as a text report with bar charts."""
    lines = [
        f"shard directory  {info['root']}",
        f"images           {info['num_samples']}  in {info['num_shards']} shards "
        f"({info['bytes'] / 2**20:.1f} MiB of encoded images)",
        f"boxes            {info['num_boxes']}  (iscrowd {info['iscrowd']}, difficult "
        f"{info['difficult']}; {info['images_without_boxes']} images without boxes; at most "
        f"{info['max_boxes_per_image']} per image)",
    ]
    rep = info.get("report") or {}
    if rep:
        lines.append(f"conversion       inputs {rep.get('inputs')} = written {rep.get('written')} "
                     f"+ skipped {rep.get('skipped')}; boxes clipped {rep.get('boxes_clipped')}, "
                     f"dropped {rep.get('boxes_dropped')}")
    lines += ["", "shards:"]
    lines += [f"  {s['file']}  {s['count']:>8} images  {s['boxes']:>9} boxes  "
              f"{s['bytes'] / 2**20:>9.1f} MiB" for s in info["shards"]]
    lines += ["", "boxes per class:"]
    lines += _bars([(f"{c['id']:>3} {c['name']}" + (f" (id {c['source_id']})"
                     if c.get("source_id") is not None else ""), c["boxes"])
                    for c in info["classes"]], width)
    lines += ["", "box area:"]
    lines += _bars(list(info["box_area"].items()), width)
    lines += ["", "image long side (pixels):"]
    lines += _bars([(f"{h['from']:>5}-{h['to'] if h['to'] else '':<5}", h["count"])
                    for h in info["long_side_histogram"]], width)
    lines += ["", "most common sizes (WxH):"]
    lines += _bars([(f"{s['width']}x{s['height']}", s["count"]) for s in info["common_sizes"]],
                   width)
    return "\n".join(lines)


def _bars(rows: Iterable[tuple[str, int]], width: int) -> list[str]:
    rows = list(rows)
    if not rows:
        return ["  (none)"]
    top = max(max(c for _, c in rows), 1)
    pad = max(len(k) for k, _ in rows)
    return [f"  {k:<{pad}} {c:>9} {'#' * round(width * c / top)}" for k, c in rows]
