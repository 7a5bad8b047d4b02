"""The shard format: one write-once HDF5 file per shard plus ``manifest.json``; reading a
shard's index and manifest (the online reader and the offline tools share this module).

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

``manifest.json`` carries its own checksum, ``manifest_sha256`` (``manifest_digest``: the
sha256 of its canonical JSON without that key), so edited class names or counts are named.
Its shard entries must be plain file names inside the dataset folder, each listed once; every
reader applies ``check_dataset`` (the structural checks, from the index tables) when it opens a
dataset.

Over 350 lines on purpose: one job, the shard format; each dataset's name, dtype and digest is
written down once here and both the writers and the readers import it, so a split would copy
the table layout.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT = "hvd_yolo.shards"
VERSION = 2  # 2: images/crc32 added
READABLE = (1, 2)  # versions this hvd_yolo reads
MANIFEST = "manifest.json"
DATASETS = (
    "images/bytes", "images/offsets", "images/hw", "images/id", "images/name", "images/crc32",
    "boxes/xyxy", "boxes/cls", "boxes/offsets", "boxes/iscrowd", "boxes/difficult",
)
DATASETS_V1 = tuple(d for d in DATASETS if d != "images/crc32")
DTYPES = {
    "images/bytes": "<u1", "images/offsets": "<i8", "images/hw": "<i4", "images/id": "<i8",
    "images/crc32": "<u4",
    "boxes/xyxy": "<f4", "boxes/cls": "<i4", "boxes/offsets": "<i8", "boxes/iscrowd": "<u1",
    "boxes/difficult": "<u1",
}
WRITE_BUFFER = 32 << 20  # bytes are copied (into HDF5, then to disk) in pieces of about this size


try:  # zlib-ng's SIMD CRC-32: the same values as zlib.crc32, ~5x faster (bench data)
    from zlib_ng.zlib_ng import crc32  # noqa: F401  (used by the reader, writer and verify)
except ImportError:  # pragma: no cover - zlib-ng is a dependency; plain zlib still works
    from zlib import crc32  # noqa: F401


# Images are decoded with torchvision.io; torchvision 0.29 marks them deprecated in favour
# of TorchCodec with a warning on every call. Silence exactly that message, nothing else.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of "
                        "TorchVision are deprecated", category=DeprecationWarning)


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


def digest(name: str, values: np.ndarray | Sequence[str]) -> str:
    """sha256 of a dataset's canonical bytes (little-endian C order; names joined by NUL)."""
    if name == "images/name":
        return hashlib.sha256(b"\0".join(str(s).encode("utf-8") for s in values)).hexdigest()
    arr = np.ascontiguousarray(np.asarray(values), dtype=np.dtype(DTYPES[name]))
    return hashlib.sha256(arr.tobytes()).hexdigest()


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


MANIFEST_DIGEST = "manifest_sha256"
SHARD_NAME = re.compile(r"^shard-\d{5,}\.h5$")  # what the converter writes


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of ``manifest``'s canonical JSON (sorted keys, no spaces) without its own digest
    and ``created_by`` (who ran it, when): equal contents, equal digests, whatever the ranks."""
    body = {k: v for k, v in manifest.items() if k not in (MANIFEST_DIGEST, "created_by")}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def plain_file_name(name: Any) -> bool:
    """A name that stays inside its folder: no separator, not absolute, not ``.``/``..``."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name and not Path(name).is_absolute())


def load_manifest(root: str | Path) -> dict[str, Any]:
    """Read and sanity-check ``root/manifest.json``: format and version, its checksum (a
    warning when it has none: written before manifests were sealed), and its shard entries
    (plain file names in ``root``, each listed once; counts that add up)."""
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
    recorded = manifest.get(MANIFEST_DIGEST)
    if recorded is None:
        warnings.warn(f"{path}: no {MANIFEST_DIGEST} (written before manifests were sealed, or "
                      "edited): class names and counts are not checked; convert the dataset "
                      "again", stacklevel=2)
    elif recorded != manifest_digest(manifest):
        raise ShardError(f"{path}: its contents do not match its {MANIFEST_DIGEST} (the class "
                         "names, counts or shard list were edited): convert the dataset again")
    _check_entries(path, manifest)
    return manifest


def _check_entries(path: Path, manifest: dict[str, Any]) -> None:
    """The manifest's shard list: dicts naming plain files in its folder, each once; the
    totals it states add up over its entries."""
    entries = manifest.get("shards")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ShardError(f"{path}: 'shards' is not a list of shard entries")
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        name = entry.get("file")
        if not plain_file_name(name):
            raise ShardError(f"{path}: shard entry {i} names {name!r}: shard files must be plain "
                             f"file names inside {path.parent} (no path, no '..'); the manifest "
                             "was edited or is not from hvd-yolo convert")
        if name in seen:
            raise ShardError(f"{path}: lists {name} twice (shard entries {seen[name]} and {i}): "
                             "every sample would be read twice; convert the dataset again")
        seen[name] = i
    for key, field in (("num_samples", "count"), ("num_boxes", "boxes")):
        total = sum(e.get(field) for e in entries if isinstance(e.get(field), int))
        if key in manifest and manifest[key] != total:
            raise ShardError(f"{path}: {key} is {manifest[key]} but its shard entries add up to "
                             f"{total}: convert the dataset again")
    if "num_shards" in manifest and manifest["num_shards"] != len(entries):
        raise ShardError(f"{path}: num_shards is {manifest['num_shards']} but it lists "
                         f"{len(entries)} shards")


def check_dataset(root: Path, manifest: dict[str, Any], indexes: Sequence[ShardIndex]) -> None:
    """The structural checks every reader applies when it opens a dataset (cheap: index tables
    only): each shard is the one its manifest entry lists (position, version, tables, digests),
    image ids and names are unique over the dataset, and the counts and classes agree with
    the manifest. Raises ShardError naming the shard (and sample)."""
    entries = manifest.get("shards", [])
    num_classes = len(manifest.get("class_names", []))
    ids: dict[int, str] = {}
    names: dict[str, str] = {}
    for si, (entry, idx) in enumerate(zip(entries, indexes)):  # each where it was written
        if idx.attrs.get("shard_index") != si:
            raise ShardError(f"{entry.get('file')}: shard {idx.attrs.get('shard_index')} by its "
                             f"attributes but entry {si} in manifest.json: a shard listed twice "
                             "or from another conversion")
    for entry, idx in zip(entries, indexes):
        where = entry.get("file", "?")
        a = idx.attrs
        if a.get("version") != manifest.get("version"):
            raise ShardError(f"{where}: format version {a.get('version')} but manifest.json "
                             f"says {manifest.get('version')}")
        if a.get("num_shards", len(entries)) != len(entries):
            raise ShardError(f"{where}: one of {a.get('num_shards')} shards by its attributes "
                             f"but manifest.json lists {len(entries)}: a shard listed twice or "
                             "from another conversion")
        check_tables(idx, where, entry)
        if entry.get("sha256") != _json_dict(a.get("sha256")):
            raise ShardError(f"{where}: its sha256 digests differ from manifest.json: the shard "
                             "was replaced or the manifest belongs to another conversion")
        for i, (image_id, name) in enumerate(zip(idx.ids.tolist(), idx.names)):
            for key, table in ((image_id, ids), (name, names)):
                if key in table:
                    raise ShardError(f"{where} sample {i} ({name!r}, id {image_id}): duplicate "
                                     f"image {'id' if key is image_id else 'name'} (also in "
                                     f"{table[key]})")
                table[key] = where
        bad = np.flatnonzero((idx.cls < 0) | (idx.cls >= max(num_classes, 1)))
        if len(bad):
            k = int(bad[0])
            i = int(np.searchsorted(idx.box_offsets, k, side="right")) - 1
            raise ShardError(f"{where} sample {i} ({idx.names[i]!r}, id {int(idx.ids[i])}): box "
                             f"{k - int(idx.box_offsets[i])} has class {int(idx.cls[k])} but the "
                             f"manifest lists {num_classes} classes")
    images = sum(idx.count for idx in indexes)
    if images != manifest.get("num_samples", images):
        raise ShardError(f"manifest.json: num_samples {manifest.get('num_samples')} but the "
                         f"shards hold {images}")


def _json_dict(text: Any) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


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
