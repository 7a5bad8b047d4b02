"""A torch ``Dataset`` over HDF5 shards; h5py files are opened lazily in the process that reads.

The index tables (offsets, sizes, ids, names, boxes) of every shard are loaded once, in the
constructor, with the files closed again; a sample then costs one read of its bytes plus a
torchvision decode. ``images/bytes`` is written contiguous and uncompressed, so HDF5 records
where its data starts in the file: the reader asks h5py for that offset once per shard and then
reads a sample with one ``os.pread`` (no HDF5 call per sample: h5py's per-slice overhead made
shards slower than loose files). A chunked or compressed dataset falls back to h5py slicing.
Handles are never shared across ``fork``: they are kept per process id, so a DataLoader worker
(or any child) opens its own, and pickling drops them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset, IterableDataset, get_worker_info  # noqa: E402

from hvd_yolo.data.sampler import ShardSampler  # noqa: E402
from hvd_yolo.data.shards import ShardError, decode_rgb, load_manifest, read_index  # noqa: E402


class ShardDataset(Dataset):
    """Samples of a shard directory: ``ds[i]`` -> {"image", "boxes", "classes", "image_id",
    "name", "hw"}; global index = shard 0's samples, then shard 1's, ... (``shard_sizes``)."""

    def __init__(self, root: str | Path, transform: Callable[[dict], Any] | None = None) -> None:
        self.root = Path(root)
        self.manifest: dict[str, Any] = load_manifest(self.root)
        self.transform = transform
        self.class_names: list[str] = list(self.manifest.get("class_names", []))
        self.category_ids: list[int] = [int(c) for c in self.manifest.get(
            "category_ids", range(len(self.class_names)))]
        self._paths = [self.root / e["file"] for e in self.manifest.get("shards", [])]
        self._index = []
        for entry, path in zip(self.manifest.get("shards", []), self._paths):
            if not path.is_file():
                raise ShardError(f"{path}: listed in {self.root}/manifest.json but missing")
            idx = read_index(path)
            if idx.count != entry.get("count"):
                raise ShardError(f"{path}: holds {idx.count} samples but the manifest says "
                                 f"{entry.get('count')}: run `hvd-yolo shards verify {self.root}`")
            self._index.append(idx)
        self.shard_sizes: list[int] = [idx.count for idx in self._index]
        self._starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
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
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return s, i - int(self._starts[s])

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

    def _raw(self, s: int, j: int) -> np.ndarray:
        off = self._index[s].image_offsets
        a, b = int(off[j]), int(off[j + 1])
        reader = self._reader(s)
        if not isinstance(reader, tuple):
            return reader[a:b]
        fd, base = reader
        buf = bytearray(b - a)
        got = os.preadv(fd, [buf], base + a) if b > a else 0
        if got != b - a:
            raise ShardError(f"{self._paths[s]}: sample {j} is cut short ({got} of {b - a} bytes "
                             f"read): run `hvd-yolo shards verify {self.root}`")
        return np.frombuffer(buf, dtype=np.uint8)

    def image_bytes(self, index: int) -> bytes:
        """The stored encoded image (the original file's bytes)."""
        return self._raw(*self.locate(index)).tobytes()

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
        idx = self._index[s]
        image = decode_rgb(self._raw(s, j))
        a, b = idx.box_offsets[j], idx.box_offsets[j + 1]
        sample = {
            "image": image,
            "boxes": torch.from_numpy(idx.xyxy[a:b].copy()),
            "classes": torch.from_numpy(idx.cls[a:b].copy()),
            "image_id": int(idx.ids[j]),
            "name": idx.names[j],
            "hw": (int(idx.hw[j, 0]), int(idx.hw[j, 1])),
        }
        return self.transform(sample) if self.transform is not None else sample

    # ------------------------------------------------------------------ evaluation
    def coco_ground_truth(self) -> dict[str, Any]:
        """A COCO json dict of every sample (from the index tables; no image is decoded).

        Category ids are the source ids (``category_ids``); VOC ``difficult`` and COCO
        ``iscrowd`` boxes are both exported with ``iscrowd=1`` so pycocotools ignores them.
        """
        images, anns = [], []
        for idx in self._index:
            for j in range(idx.count):
                h, w = (int(v) for v in idx.hw[j])
                iid = int(idx.ids[j])
                images.append({"id": iid, "width": w, "height": h, "file_name": idx.names[j]})
                for k in range(idx.box_offsets[j], idx.box_offsets[j + 1]):
                    x1, y1, x2, y2 = (float(v) for v in idx.xyxy[k])
                    anns.append({
                        "id": len(anns) + 1,
                        "image_id": iid,
                        "category_id": self.category_ids[int(idx.cls[k])],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": int(bool(idx.iscrowd[k]) or bool(idx.difficult[k])),
                    })
        cats = [{"id": cid, "name": name} for cid, name in zip(self.category_ids, self.class_names)]
        return {"info": {"description": f"hvd_yolo shards {self.root}"}, "images": images,
                "annotations": anns, "categories": cats}

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


class ShardIterableDataset(IterableDataset):
    """Iterable use of a ``ShardSampler``: each DataLoader worker reads its own slice of this
    rank's indices (``sampler.worker_indices``), so no index is read twice. Call
    ``sampler.set_epoch(e)`` before each epoch. With ``k`` workers and batch size ``b`` every rank
    yields the same batches count, since every rank has the same number of indices."""

    def __init__(self, dataset: ShardDataset, sampler: ShardSampler) -> None:
        self.dataset = dataset
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in self.sampler.worker_indices(wid, nw):
            yield self.dataset[int(i)]
