"""Integrity on read: index tables checked at open, every sample's CRC32 checked on every read.

Corruption is made the way it happens: bytes flipped in the shard file on disk (h5py ``r+``).
The training tests run `hvd-yolo train` under mpirun (2 ranks, real Horovod).
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from hvd_yolo.data.dataset import ShardDataset
from hvd_yolo.shards.format import CorruptSample, ShardError
from hvd_yolo.shards.verify import verify_shards
from hvd_yolo.shards.writer import SampleRecord, write_manifest, write_shard
from tests.fixtures.datagen import flip_image_bytes, image_bytes
from tests.mpi_harness import run_cli

BAD = 5  # the sample whose JPEG bytes get flipped (shard 1, index 1 with 8 samples in 4 shards)


# 8 small images in 4 shards: 2 ranks x batch 2 read each sample once per epoch.
SHARDS = {"images": 8, "seed": 4, "shards": 4, "size_range": (64, 96)}


def copy(shards: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "shards"
    shutil.copytree(shards, dst)
    return dst


def test_index_tables_are_checked_at_open(shards: Path, tmp_path: Path) -> None:
    root = copy(shards, tmp_path)
    with h5py.File(root / "shard-00001.h5", "r+") as f:
        f["boxes/offsets"][1] += 1  # image 0 would take a box of image 1
    with pytest.raises(ShardError, match=r"shard-00001.h5: boxes/offsets sha256 mismatch"):
        ShardDataset(root)
    root = copy(shards, tmp_path / "b")
    with h5py.File(root / "shard-00002.h5", "r+") as f:
        f["boxes/xyxy"][0, 2] = 1e4
    with pytest.raises(ShardError, match=r"shard-00002.h5: boxes/xyxy sha256 mismatch .*corrupt"):
        ShardDataset(root)


def test_stored_crc_is_zlib_crc32_of_the_bytes(shards: Path) -> None:
    ds = ShardDataset(shards)
    stored = [int(ds._index[s].crc32[j]) for s, j in map(ds.locate, range(len(ds)))]
    assert stored == [zlib.crc32(ds.image_bytes(i)) for i in range(len(ds))]


def test_flipped_jpeg_bytes_fail_their_crc(shards: Path, tmp_path: Path) -> None:
    root = copy(shards, tmp_path)
    good = ShardDataset(shards)
    file, j, name = flip_image_bytes(root, BAD)
    with pytest.raises(CorruptSample) as e:
        ShardDataset(root)[BAD]  # "error" is the class default
    assert f"{file} sample {j} ({name!r}): CRC32 mismatch" in str(e.value)
    with pytest.raises(CorruptSample, match="CRC32 mismatch"):
        ShardDataset(root).image_bytes(BAD)
    # skip: the next sample in its place, the same on every call; the bad one is listed
    ds = ShardDataset(root, on_corrupt="skip")
    item = ds[BAD]
    assert item["corrupt"] == [f"{file} sample {j} ({name!r})"]
    assert item["image_id"] == good[BAD + 1]["image_id"]
    assert np.array_equal(item["image"], good[BAD + 1]["image"])
    assert ds[BAD + 1]["corrupt"] == [] and ds[BAD]["image_id"] == item["image_id"]


def _one_shard(root: Path, records: list[SampleRecord]) -> Path:
    root.mkdir(parents=True)
    entry = write_shard(root / "shard-00000.h5", 0, 1, records)
    write_manifest(root, {"format": "hvd_yolo.shards", "version": 2, "class_names": ["a"],
                          "category_ids": [0], "num_samples": len(records),
                          "num_boxes": 0, "num_shards": 1, "shards": [entry]})
    return root


def test_undecodable_image_is_named(tmp_path: Path) -> None:
    """Bytes that pass their CRC but do not decode (written corrupt) name shard, index, file."""
    ok = image_bytes(32, 24)
    broken = ok[:200] + b"\xff\x00" * 40 + ok[280:]  # markers the decoder rejects
    recs = [SampleRecord(f"img{i}.jpg", i + 1, (24, 32), len(d), data=d)
            for i, d in enumerate((ok, broken, ok))]
    root = _one_shard(tmp_path / "s", recs)
    with pytest.raises(CorruptSample, match=r"shard-00000.h5 sample 1 \('img1.jpg'\): image does "
                       "not decode"):
        ShardDataset(root)[1]
    assert ShardDataset(root, on_corrupt="skip")[1]["name"] == "img2.jpg"


def test_version_1_shards_read_with_one_warning(shards: Path, tmp_path: Path) -> None:
    root = copy(shards, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = 1
    for entry in manifest["shards"]:
        entry["sha256"].pop("images/crc32")
        with h5py.File(root / entry["file"], "r+") as f:
            del f["images/crc32"]
            f.attrs["version"] = 1
            f.attrs["sha256"] = json.dumps(entry["sha256"], sort_keys=True)
    write_manifest(root, manifest)  # resealed: a version 1 dataset written by an older hvd-yolo
    with pytest.warns(UserWarning) as record:
        ds = ShardDataset(root)
    assert len(record) == 1
    msg = str(record[0].message)
    assert f"{root}: shard format version 1 has no per-sample checksums (dataset images/crc32)" in msg
    src = json.loads((shards / "manifest.json").read_text())["source"]["root"]
    assert f"`hvd-yolo convert yolo {src} {root} --overwrite`" in msg
    assert ds[3]["image_id"] == ShardDataset(shards)[3]["image_id"]
    assert verify_shards(root).images == 8


def train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--set", f"data.train={shards}", "--set", "data.workers=1",
            "--set", "input.size=64", "--set", "optim.batch_size=2", "--set", "optim.epochs=1",
            "--set", "optim.warmup_steps=1", "--set", f"run.out_dir={out}",
            "--set", "run.progress=false", "--set", "dist.threads=1", *extra]


@pytest.mark.mpi
def test_train_skips_and_counts_a_corrupt_sample(shards: Path, tmp_path: Path) -> None:
    root = copy(shards, tmp_path)
    file, j, name = flip_image_bytes(root, BAD)
    res = run_cli(train_args(root, tmp_path / "run"), np=2, timeout=300)
    assert f"{file} sample {j} ({name!r}): CRC32 mismatch" in res.output
    assert "skipped, replaced by" in res.output
    assert "epoch 0: 1 corrupt sample(s) skipped" in res.output
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["corrupt_skipped"] for r in log if r["type"] == "data"] == [1]


@pytest.mark.mpi
def test_train_on_corrupt_error_names_the_sample(shards: Path, tmp_path: Path) -> None:
    root = copy(shards, tmp_path)
    file, j, name = flip_image_bytes(root, BAD)
    res = run_cli(train_args(root, tmp_path / "run", "--set", "data.on_corrupt=error"), np=2,
                  timeout=300, check=False)
    assert res.returncode != 0 and not res.timed_out, res.output
    assert "hvd-yolo train: error: rank " in res.output
    assert f"{file} sample {j} ({name!r}): CRC32 mismatch" in res.output


@pytest.mark.mpi
def test_train_fails_at_open_on_a_corrupt_index_table(shards: Path, tmp_path: Path) -> None:
    root = copy(shards, tmp_path)
    with h5py.File(root / "shard-00003.h5", "r+") as f:
        f["boxes/xyxy"][0, 0] = -0.13
    res = run_cli(train_args(root, tmp_path / "run"), np=2, timeout=300, check=False)
    assert res.returncode != 0 and not res.timed_out, res.output
    assert "hvd-yolo train: error: rank 0:" in res.output
    assert "shard-00003.h5: boxes/xyxy sha256 mismatch" in res.output
    assert "Traceback" not in res.output
