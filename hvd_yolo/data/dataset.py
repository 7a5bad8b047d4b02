"""A torch ``Dataset`` over HDF5 shards; h5py files are opened lazily in the process that reads.

The index tables (offsets, sizes, ids, names, boxes) of every shard are loaded once, in the
constructor, with the files closed again; a sample then costs one read of its bytes plus a
torchvision decode. ``images/bytes`` is written contiguous and uncompressed, so HDF5 records
where its data starts in the file: the reader asks h5py for that offset once per shard and then
reads a sample with one ``os.pread`` (no HDF5 call per sample: h5py's per-slice overhead made
shards slower than loose files). A chunked or compressed dataset falls back to h5py slicing.
Handles are never shared across ``fork``: they are kept per process id, so a DataLoader worker
(or any child) opens its own, and pickling drops them.

Integrity: opening checks every shard's index tables against their sha256 (``read_index``) and
against the manifest; every read checks the sample's CRC32 (``images/crc32``), and a sample
that fails it or does not decode is a ``CorruptSample`` naming shard, index and file. With
``on_corrupt="skip"`` it is reported on stderr and replaced by the next good sample (the same
one on every rank and in every epoch, so batch counts and shapes do not change); the returned
sample lists the replaced ones under ``"corrupt"`` for the training loop's count.
"""

from __future__ import annotations

import bisect
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from hvd_yolo.config import ON_CORRUPT
from hvd_yolo.shards.format import (
    CorruptSample,
    ShardError,
    check_dataset,
    check_tables,
    crc32,
    decode_rgb,
    load_manifest,
    read_index,
)


class ShardDataset(Dataset):
    """Samples of a shard directory: ``ds[i]`` -> {"image", "boxes", "classes", "image_id",
    "name", "hw", "corrupt"}; global index = shard 0's samples, then shard 1's, ...
    (``shard_sizes``). ``on_corrupt``: "error" raises ``CorruptSample``, "skip" replaces the
    sample (see the module doc); ``check_crc=False`` skips the per-read CRC32 (benchmarks)."""

    def __init__(self, root: str | Path, transform: Callable[[dict], Any] | None = None,
                 on_corrupt: str = "error", check_crc: bool = True) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.root = Path(root)
        self.manifest: dict[str, Any] = load_manifest(self.root)
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.check_crc = check_crc
        self.class_names: list[str] = list(self.manifest.get("class_names", []))
        self.category_ids: list[int] = [int(c) for c in self.manifest.get(
            "category_ids", range(len(self.class_names)))]
        self._paths = [self.root / e["file"] for e in self.manifest.get("shards", [])]
        self._index = []
        for entry, path in zip(self.manifest.get("shards", []), self._paths):
            if not path.is_file():
                raise ShardError(f"{path}: listed in {self.root}/manifest.json but missing")
            idx = read_index(path)  # index tables checked against their sha256
            check_tables(idx, str(path), entry)
            if entry.get("sha256") != _json_dict(idx.attrs.get("sha256")):
                raise ShardError(f"{path}: its sha256 digests differ from {self.root}/manifest.json:"
                                 " the shard was replaced or the manifest belongs to another "
                                 "conversion; convert the dataset again")
            self._index.append(idx)
        check_dataset(self.root, self.manifest, self._index)  # a shard listed twice, counts, ids
        if self._index and any(idx.crc32 is None for idx in self._index):
            warnings.warn(old_format_message(self.root, self.manifest), stacklevel=2)
        self.shard_sizes: list[int] = [idx.count for idx in self._index]
        self._starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self._bounds: list[int] = self._starts.tolist()  # bisect on a list: no numpy call per read
        self._files: dict[int, tuple[int, int] | tuple[h5py.File, h5py.Dataset]] = {}
        self._pid = os.getpid()

    # ------------------------------------------------------------------ indexing
    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global index -> (shard, index inside the shard)."""
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {index} out of range for {n} samples")
        s = bisect.bisect_right(self._bounds, i) - 1
        return s, i - self._bounds[s]

    def _reader(self, shard: int) -> tuple[int, int] | h5py.Dataset:
        """This process's reader of ``shard``'s ``images/bytes`` (opened on first use):
        ``(fd, data offset)`` for a contiguous uncompressed dataset, else the h5py dataset."""
        pid = os.getpid()
        if pid != self._pid:  # a forked child: never touch the parent's handles
            self._files = {}
            self._pid = pid
        entry = self._files.get(shard)
        if entry is None:
            f = h5py.File(self._paths[shard], "r")
            dset = f["images/bytes"]
            base = dset.id.get_offset() if dset.chunks is None and not dset.compression else None
            if base is not None:
                f.close()
                entry = (os.open(self._paths[shard], os.O_RDONLY), int(base))
            else:  # chunked/compressed, or nothing stored: h5py reads it
                entry = (f, dset)  # the dataset object is cached: lookups are slow
            self._files[shard] = entry
        return entry if isinstance(entry[0], int) else entry[1]

    def label(self, s: int, j: int) -> str:
        """'shard-00001.h5 sample 5 (img_005.jpg)': how messages name a sample."""
        return f"{self._paths[s].name} sample {j} ({self._index[s].names[j]!r})"

    def _raw(self, s: int, j: int) -> np.ndarray:
        """Sample ``j`` of shard ``s``: its encoded bytes, CRC32 checked (CorruptSample if not)."""
        idx = self._index[s]
        a, b = int(idx.image_offsets[j]), int(idx.image_offsets[j + 1])
        reader = self._reader(s)
        if not isinstance(reader, tuple):
            data = reader[a:b]
        else:
            fd, base = reader
            buf = bytearray(b - a)
            got = os.preadv(fd, [buf], base + a) if b > a else 0
            if got != b - a:
                raise CorruptSample(f"{self.root / self.label(s, j)}: cut short ({got} of {b - a} "
                                    f"bytes read): run `hvd-yolo shards verify {self.root}`")
            data = np.frombuffer(buf, dtype=np.uint8)
        if self.check_crc and idx.crc32 is not None:
            crc = crc32(data)
            if crc != int(idx.crc32[j]):
                raise CorruptSample(f"{self.root / self.label(s, j)}: CRC32 mismatch (read "
                                    f"{crc:08x}, images/crc32 records {int(idx.crc32[j]):08x}): "
                                    "the image bytes are corrupt")
        return data

    def _image(self, s: int, j: int) -> Any:
        """Read, check and decode one sample (CorruptSample naming it if it fails)."""
        data = self._raw(s, j)
        try:
            return decode_rgb(data)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt sample
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise CorruptSample(f"{self.root / self.label(s, j)}: image does not decode "
                                f"({msg})") from e

    def read(self, index: int) -> np.ndarray:
        """The stored encoded image, CRC32 checked, as training reads it (no copy)."""
        return self._raw(*self.locate(index))

    def image_bytes(self, index: int) -> bytes:
        """The stored encoded image (the original file's bytes)."""
        return self.read(index).tobytes()

    def annotations(self, index: int) -> dict[str, Any]:
        """Boxes, classes, flags, id, name and size of a sample, without touching the image."""
        s, j = self.locate(index)
        idx = self._index[s]
        a, b = idx.box_offsets[j], idx.box_offsets[j + 1]
        return {
            "boxes": torch.from_numpy(idx.xyxy[a:b].copy()),
            "classes": torch.from_numpy(idx.cls[a:b].copy()),
            "iscrowd": torch.from_numpy(idx.iscrowd[a:b].copy()),
            "difficult": torch.from_numpy(idx.difficult[a:b].copy()),
            "image_id": int(idx.ids[j]),
            "name": idx.names[j],
            "hw": (int(idx.hw[j, 0]), int(idx.hw[j, 1])),
        }

    def __getitem__(self, index: int) -> Any:
        s, j = self.locate(index)
        corrupt: list[str] = []
        try:
            image = self._image(s, j)
        except CorruptSample as e:
            if self.on_corrupt == "error":
                raise
            corrupt.append(self.label(s, j))
            s, j, image = self._replacement(int(index), e)
        idx = self._index[s]
        a, b = idx.box_offsets[j], idx.box_offsets[j + 1]
        sample = {
            "image": image,
            "boxes": torch.from_numpy(idx.xyxy[a:b].copy()),
            "classes": torch.from_numpy(idx.cls[a:b].copy()),
            "image_id": int(idx.ids[j]),
            "name": idx.names[j],
            "hw": (int(idx.hw[j, 0]), int(idx.hw[j, 1])),
            "corrupt": corrupt,
        }
        return self.transform(sample) if self.transform is not None else sample

    def _replacement(self, index: int, error: CorruptSample) -> tuple[int, int, Any]:
        """The next good sample after ``index`` (wrapping): (shard, index in shard, image)."""
        n = len(self)
        for k in range(1, n):
            s, j = self.locate((index + k) % n)
            try:
                image = self._image(s, j)
            except CorruptSample:
                continue
            print(f"hvd-yolo: warning: {error}: skipped, replaced by {self.label(s, j)} "
                  "(data.on_corrupt=skip)", file=sys.stderr, flush=True)
            return s, j, image
        raise ShardError(f"{self.root}: no sample can be read: every one fails its CRC32 or "
                         f"decode (first: {error})")

    # ------------------------------------------------------------------ evaluation
    def coco_ground_truth(self) -> dict[str, Any]:
        """A COCO json dict of every sample, from the index tables (no image is decoded); VOC
        ``difficult`` and COCO ``iscrowd`` boxes are marked ``iscrowd=1``, ignored in scoring."""
        from hvd_yolo.metrics import coco_ground_truth

        boxes, classes, hw, ids, names, ignore = [], [], [], [], [], []
        for idx in self._index:
            for j in range(idx.count):
                a, b = idx.box_offsets[j], idx.box_offsets[j + 1]
                boxes.append(idx.xyxy[a:b])
                classes.append(idx.cls[a:b])
                ignore.append((idx.iscrowd[a:b] > 0) | (idx.difficult[a:b] > 0))
                hw.append(tuple(int(v) for v in idx.hw[j]))
                ids.append(int(idx.ids[j]))
                names.append(idx.names[j])
        gt = coco_ground_truth(boxes, classes, hw, ids, self.class_names, self.category_ids,
                               ignore=ignore, file_names=names)
        return {"info": {"description": f"hvd_yolo shards {self.root}"}, **gt}

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close this process's HDF5 handles (they reopen on the next read)."""
        if self._pid == os.getpid():
            for f, _ in self._files.values():
                try:
                    if isinstance(f, int):
                        os.close(f)
                    else:
                        f.close()
                except Exception:  # noqa: BLE001 - closing at exit must not raise
                    pass
        self._files = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return (f"ShardDataset({str(self.root)!r}, {len(self)} samples in {len(self.shard_sizes)} "
                f"shards, {len(self.class_names)} classes)")


def _json_dict(text: Any) -> Any:
    import json

    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def old_format_message(root: Path, manifest: dict[str, Any]) -> str:
    """The warning for version 1 shards: what is missing and the command that re-converts."""
    cmd = [str(c) for c in (manifest.get("created_by") or {}).get("command") or []]
    if cmd[:2] != ["hvd-yolo", "convert"]:  # converted from Python: rebuild the command line
        src = manifest.get("source") or {}
        cmd = ["hvd-yolo", "convert", str(src.get("format", "FORMAT")), str(src.get("root", "SOURCE")),
               str(root)]
    if "--overwrite" not in cmd:
        cmd.append("--overwrite")
    how = f"`{' '.join(cmd)}`"
    return (f"{root}: shard format version {manifest.get('version')} has no per-sample checksums "
            f"(dataset images/crc32): image bytes are read unchecked. Convert it again to "
            f"add them: {how}")
