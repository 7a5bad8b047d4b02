"""`hvd-yolo shards verify|info` and the shard format's checks (each failure names shard/sample)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from hvd_yolo import cli
from hvd_yolo.data.synthetic import write_yolo_dataset
from hvd_yolo.shards.convert import convert_dataset
from hvd_yolo.shards.format import FORMAT, VERSION
from hvd_yolo.shards.info import shard_info
from hvd_yolo.shards.writer import SampleRecord, write_manifest, write_shard
from tests.fixtures import datagen


@pytest.fixture(scope="module")
def good(tmp_path_factory: Any) -> Path:
    base = tmp_path_factory.mktemp("shards")
    src = write_yolo_dataset(base / "yolo", 6, seed=21, size=(40, 56))
    convert_dataset("yolo", src, base / "shards", shards=3)
    return base / "shards"


def _copy(good: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(good, dst)
    return dst


def _verify(root: Path, capsys: Any, *extra: str) -> tuple[int, str]:
    rc = cli.main(["shards", "verify", str(root), *extra])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_verify_ok(good: Path, capsys: Any) -> None:
    rc, out = _verify(good, capsys)
    assert rc == 0
    assert "OK" in out and "3 shards, 6 images" in out and "every image's CRC32 and decode" in out


def test_verify_detects_flipped_image_byte(good: Path, tmp_path: Path, capsys: Any) -> None:
    root = _copy(good, tmp_path)
    with h5py.File(root / "shard-00001.h5", "r+") as f:
        f["images/bytes"][100] ^= 0xFF
    rc, out = _verify(root, capsys)
    assert rc == 1
    assert "hvd-yolo shards verify: error: shard-00001.h5: images/bytes sha256 mismatch" in out


def test_verify_detects_edited_box(good: Path, tmp_path: Path, capsys: Any) -> None:
    root = _copy(good, tmp_path)
    with h5py.File(root / "shard-00002.h5", "r+") as f:
        f["boxes/xyxy"][0, 0] += 1
    rc, out = _verify(root, capsys)
    assert rc == 1 and "shard-00002.h5: boxes/xyxy sha256 mismatch" in out


def test_verify_detects_count_and_file_problems(good: Path, tmp_path: Path, capsys: Any) -> None:
    root = _copy(good, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][1]["count"] += 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    rc, out = _verify(root, capsys)
    assert rc == 1 and "manifest.json: its contents do not match its manifest_sha256" in out
    manifest["num_samples"] += 1
    write_manifest(root, manifest)  # resealed: the shard itself disagrees
    rc, out = _verify(root, capsys)
    assert rc == 1 and "shard-00001.h5: holds 2 images (count attr 2) but the manifest says 3" in out

    root = _copy(good, tmp_path / "b")
    (root / "shard-00000.h5").unlink()
    rc, out = _verify(root, capsys)
    assert rc == 1 and "shard-00000.h5: listed in the manifest but missing" in out

    # a valid shard from another conversion in place of ours
    other = tmp_path / "other"
    src = write_yolo_dataset(tmp_path / "yolo2", 6, seed=22, size=(40, 56))
    convert_dataset("yolo", src, other, shards=3)
    root = _copy(good, tmp_path / "c")
    shutil.copy(other / "shard-00001.h5", root / "shard-00001.h5")
    rc, out = _verify(root, capsys)
    assert rc == 1 and "error: shard-00001.h5: " in out  # counts or checksums differ
    # a manifest whose checksum does not match an intact shard
    root = _copy(good, tmp_path / "d")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][2]["sha256"]["images/id"] = "0" * 64
    write_manifest(root, manifest)
    rc, out = _verify(root, capsys)
    assert rc == 1 and "shard-00002.h5: its sha256 digests differ from manifest.json" in out

    rc, out = _verify(tmp_path / "nowhere", capsys)
    assert rc == 2 and "no such directory" in out  # a usage mistake


def _crafted(root: Path, records: list[SampleRecord]) -> Path:
    """A shard directory written with the format API directly (checksums all consistent)."""
    root.mkdir(parents=True)
    entry = write_shard(root / "shard-00000.h5", 0, 1, records)
    write_manifest(root, {"format": FORMAT, "version": VERSION, "class_names": ["a", "b"],
                          "category_ids": [0, 1], "num_samples": len(records),
                          "num_boxes": entry["boxes"], "num_shards": 1, "shards": [entry]})
    return root


def _rec(i: int, data: bytes, hw: tuple[int, int], boxes: list[list[float]],
         classes: list[int]) -> SampleRecord:
    k = len(boxes)
    return SampleRecord(name=f"img{i}.jpg", image_id=i + 1, hw=hw, nbytes=len(data), data=data,
                        boxes=np.array(boxes, np.float32).reshape(-1, 4),
                        classes=np.array(classes, np.int32), iscrowd=np.zeros(k, np.uint8),
                        difficult=np.zeros(k, np.uint8))


def test_verify_sample_level_problems(tmp_path: Path, capsys: Any) -> None:
    jpg = datagen.image_bytes(32, 16)
    ok = _rec(0, jpg, (16, 32), [[1, 1, 10, 10]], [1])
    root = _crafted(tmp_path / "decode", [ok, _rec(1, jpg[:40], (16, 32), [], [])])
    rc, out = _verify(root, capsys)
    assert rc == 1 and "shard-00000.h5 sample 1 ('img1.jpg', id 2): image does not decode" in out
    assert _verify(root, capsys, "--no-decode")[0] == 0  # only the decode check finds it

    root = _crafted(tmp_path / "hw", [ok, _rec(1, jpg, (32, 16), [], [])])
    rc, out = _verify(root, capsys)
    assert rc == 1 and "sample 1 ('img1.jpg', id 2): decodes to (16, 32) but hw records (32, 16)" in out

    root = _crafted(tmp_path / "box", [ok, _rec(1, jpg, (16, 32), [[0, 0, 5, 5], [20, 2, 33, 9]],
                                                [0, 1])])
    rc, out = _verify(root, capsys)
    assert rc == 1 and "sample 1 ('img1.jpg', id 2): box 1 (20, 2, 33, 9) is not inside the " \
        "32x16 image" in out

    root = _crafted(tmp_path / "cls", [_rec(0, jpg, (16, 32), [[1, 1, 4, 4]], [2])])
    rc, out = _verify(root, capsys)
    assert rc == 1 and "box 0 has class 2 but the manifest lists 2 classes" in out

    root = _crafted(tmp_path / "dup", [ok, _rec(0, jpg, (16, 32), [], [])])
    rc, out = _verify(root, capsys)
    assert rc == 1 and "sample 1 ('img0.jpg', id 1): duplicate image id" in out


def test_info_text_and_json(good: Path, tmp_path: Path, capsys: Any) -> None:
    info = shard_info(good)
    assert info["num_samples"] == 6 and info["num_shards"] == 3
    assert sum(c["boxes"] for c in info["classes"]) == info["num_boxes"]
    assert sum(h["count"] for h in info["long_side_histogram"]) == 6
    assert info["common_sizes"] == [{"width": 56, "height": 40, "count": 6}]
    assert cli.main(["shards", "info", str(good), "--json", str(tmp_path / "i.json")]) == 0
    text = capsys.readouterr().out
    for c in info["classes"]:
        assert f"{c['id']:>3} {c['name']}" in text and f" {c['boxes']} " in text
    assert "images           6  in 3 shards" in text
    assert "image long side (pixels):" in text and "56x40" in text
    assert json.loads((tmp_path / "i.json").read_text())["num_boxes"] == info["num_boxes"]
