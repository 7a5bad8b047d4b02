"""ShardDataset: the sample contract, DataLoader workers (lazy per-process h5py), COCO export."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hvd_yolo.data.dataset import ShardDataset
from hvd_yolo.data.sampler import ShardSampler
from hvd_yolo.shards.convert import convert_dataset
from hvd_yolo.shards.format import ShardError
from tests.fixtures import datagen

# 14 PNG images of mixed small sizes in 4 shards
SHARDS = {"images": 14, "seed": 11, "shards": 4, "size": None, "size_range": (40, 72),
          "image_format": "png"}


def test_sample_contract_and_pixels(shards: Path) -> None:
    ds = ShardDataset(shards)
    assert len(ds) == 14 and ds.shard_sizes == [3, 4, 3, 4]
    assert ds.manifest["num_samples"] == 14 and ds.class_names == ["circle", "square", "triangle"]
    image_root = Path(ds.manifest["source"]["image_root"])
    for i in (0, 5, 13, -1):
        item = ds[i]
        assert set(item) == {"image", "boxes", "classes", "image_id", "name", "hw", "corrupt"}
        assert item["corrupt"] == []
        h, w = item["hw"]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, h, w)
        assert item["boxes"].dtype == torch.float32 and item["boxes"].shape[1] == 4
        assert item["classes"].dtype == torch.int64
        assert len(item["classes"]) == len(item["boxes"]) >= 1
        pil = np.asarray(Image.open(image_root / item["name"]).convert("RGB"))
        assert torch.equal(item["image"], torch.from_numpy(pil.copy()).permute(2, 0, 1))
    assert ds[-1]["image_id"] == ds[13]["image_id"]
    with pytest.raises(IndexError, match="sample index 14 out of range for 14 samples"):
        ds[14]
    shifted = ShardDataset(shards, transform=lambda s: {**s, "boxes": s["boxes"] + 1})
    assert torch.equal(shifted[2]["boxes"], ds[2]["boxes"] + 1)


def _ids(batches: list[list[dict[str, Any]]]) -> list[int]:
    return [s["image_id"] for b in batches for s in b]


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_with_sampler(shards: Path, workers: int) -> None:
    ds = ShardDataset(shards)
    sampler = ShardSampler(ds.shard_sizes, rank=1, world_size=2, seed=5)
    sampler.set_epoch(3)
    loader = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=workers,
                        collate_fn=list)
    batches = list(loader)
    assert len(batches) == len(loader) == (len(sampler) + 2) // 3
    order = list(sampler)
    assert _ids(batches) == [ds.annotations(i)["image_id"] for i in order]
    for sample, i in zip((s for b in batches for s in b), order):
        assert torch.equal(sample["image"], ds[i]["image"])


class _Probe(torch.utils.data.Dataset):
    """Reports, per read, which process read and which process's handles the dataset used."""

    def __init__(self, ds: ShardDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, int, int]:
        item = self.ds[i]
        return os.getpid(), self.ds._pid, item["image_id"]


def test_workers_open_their_own_handles_after_fork(shards: Path) -> None:
    ds = ShardDataset(shards)
    assert ds._files == {}  # nothing opened by the constructor
    first = ds[0]  # the parent opens shard 0 before forking the workers
    parent_file = ds._files[0][0]
    loader = DataLoader(_Probe(ds), batch_size=2, num_workers=2, collate_fn=list,
                        multiprocessing_context="fork")
    reads = [r for b in loader for r in b]
    assert len(reads) == len(ds)
    assert all(pid != os.getpid() and pid == handles_pid for pid, handles_pid, _ in reads)
    assert len({pid for pid, _, _ in reads}) == 2
    # the parent's handle is untouched and still valid
    assert ds._files[0][0] is parent_file and _valid(parent_file)
    assert torch.equal(ds[0]["image"], first["image"])
    # pickling (spawn start method) drops the handles; the copy reopens lazily
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._files == {} and torch.equal(clone[1]["image"], ds[1]["image"])
    ds.close()
    assert ds._files == {} and not _valid(parent_file)


def _valid(handle) -> bool:
    """An open file: a raw descriptor (contiguous bytes) or an h5py file (fallback)."""
    if isinstance(handle, int):
        try:
            os.fstat(handle)
            return True
        except OSError:
            return False
    return bool(handle.id.valid)


def test_contiguous_bytes_are_read_directly_and_chunked_fall_back_to_h5py(
        shards: Path, tmp_path: Path) -> None:
    import shutil

    import h5py

    direct = ShardDataset(shards)
    expected = [direct.image_bytes(i) for i in range(len(direct))]
    assert isinstance(direct._files[0][0], int)  # the contiguous dataset: one pread per sample
    copy = tmp_path / "chunked"
    shutil.copytree(shards, copy)
    for path in copy.glob("*.h5"):  # rewrite images/bytes chunked + compressed
        with h5py.File(path, "r+") as f:
            data = f["images/bytes"][()]
            del f["images/bytes"]
            f.create_dataset("images/bytes", data=data, chunks=(4096,), compression="gzip")
    chunked = ShardDataset(copy)
    assert [chunked.image_bytes(i) for i in range(len(chunked))] == expected
    assert isinstance(chunked._files[0][1], h5py.Dataset)
    assert torch.equal(chunked[1]["image"], direct[1]["image"])


def test_coco_ground_truth_scores_perfect_detections(tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    convert_dataset("coco", datagen.coco(tmp_path), tmp_path / "shards", shards=2)
    ds = ShardDataset(tmp_path / "shards")
    gt = ds.coco_ground_truth()
    assert [c["id"] for c in gt["categories"]] == [1, 3, 18]
    assert {im["id"] for im in gt["images"]} == {397133, 37777, 252219}
    anns = {(a["image_id"], a["category_id"]): a for a in gt["annotations"]}
    assert anns[(397133, 18)]["bbox"] == [10.5, 20.25, 30.0, 40.0]
    assert anns[(397133, 18)]["area"] == 1200.0
    assert anns[(37777, 1)]["iscrowd"] == 1 and anns[(37777, 3)]["iscrowd"] == 0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                 "score": 1.0} for a in gt["annotations"] if not a["iscrowd"]]
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # the crowd box is ignored, not a miss

    convert_dataset("voc", datagen.voc_devkit(tmp_path), tmp_path / "voc")
    gt = ShardDataset(tmp_path / "voc").coco_ground_truth()
    flags = sorted((a["category_id"], a["iscrowd"]) for a in gt["annotations"])
    assert flags == [(0, 0), (1, 0), (1, 1), (2, 0)]  # the difficult person -> iscrowd 1


def test_missing_or_inconsistent_shards(tmp_path: Path, shards: Path) -> None:
    with pytest.raises(ShardError, match="manifest.json not found"):
        ShardDataset(tmp_path)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    (copy / "shard-00002.h5").unlink()
    with pytest.raises(ShardError, match="shard-00002.h5: listed in .* but missing"):
        ShardDataset(copy)
