"""Converting YOLO txt, COCO json and Pascal VOC xml to shards: content, round trip, EXIF, MPI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hvd_yolo.data.dataset import ShardDataset
from hvd_yolo.data.synthetic import CLASS_NAMES, make_samples, write_yolo_dataset
from hvd_yolo.shards.convert import convert_dataset
from hvd_yolo.shards.items import orient_boxes
from hvd_yolo.shards.verify import verify_shards
from tests.fixtures import datagen
from tests.mpi_harness import run_cli

SMALL = {"size": None, "size_range": (40, 72)}


def _by_name(ds: ShardDataset) -> dict[str, int]:
    return {ds.annotations(i)["name"]: i for i in range(len(ds))}


@pytest.mark.parametrize("image_format", ["jpg", "png"])
def test_yolo_round_trip_bytes_and_boxes(tmp_path: Path, image_format: str) -> None:
    n = 10
    src = write_yolo_dataset(tmp_path / "yolo", n, seed=3, image_format=image_format, **SMALL)
    truth = make_samples(n, seed=3, **SMALL)
    report = convert_dataset("yolo", src, tmp_path / "shards", shards=3)
    assert (report["inputs"], report["written"], report["skipped"]) == (n, n, 0)
    assert report["boxes_written"] == sum(len(s.boxes) for s in truth)
    assert report["boxes_clipped"] == report["boxes_dropped"] == 0

    ds = ShardDataset(tmp_path / "shards")
    assert ds.class_names == list(CLASS_NAMES)
    assert ds.category_ids == [0, 1, 2]
    assert len(ds) == n and sorted(ds.shard_sizes) == [3, 3, 4]  # balanced by count
    names = _by_name(ds)
    for i, s in enumerate(truth):
        name = f"synth_0003_{i:05d}.{image_format}"
        j = names[name]
        original = (src / "images" / name).read_bytes()
        assert ds.image_bytes(j) == original  # byte-identical, never re-encoded
        item = ds[j]
        assert item["hw"] == s.image.shape[:2]
        assert item["image"].shape == (3, *s.image.shape[:2]) and item["image"].dtype == torch.uint8
        np.testing.assert_allclose(item["boxes"].numpy(), s.boxes, atol=2e-3)
        assert item["boxes"].dtype == torch.float32
        assert item["classes"].tolist() == s.classes.tolist()
        assert item["classes"].dtype == torch.int64
        assert item["image_id"] == i + 1  # 1-based position in the sorted inputs
    if image_format == "png":  # lossless: the decoded pixels are the drawn ones
        assert torch.equal(ds[names["synth_0003_00000.png"]]["image"],
                           torch.from_numpy(truth[0].image.copy()).permute(2, 0, 1))
    assert verify_shards(tmp_path / "shards").images == n


def test_shard_size_mb_sets_shard_count(tmp_path: Path) -> None:
    src = write_yolo_dataset(tmp_path / "yolo", 7, seed=1, **SMALL)
    total = sum(p.stat().st_size for p in (src / "images").iterdir())
    report = convert_dataset("yolo", src, tmp_path / "a", shard_size_mb=total / 3.5 / 2**20)
    assert report["num_shards"] == 4
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [1, 2, 2, 2]
    assert sum(s["bytes"] for s in manifest["shards"]) == total
    # more shards than images: one image per shard, and the report says so
    report = convert_dataset("yolo", src, tmp_path / "b", shards=50)
    assert report["num_shards"] == 7
    assert any("50 shards requested" in n for n in report["notes"])


def test_coco_fixture(tmp_path: Path) -> None:
    src = datagen.coco(tmp_path)
    report = convert_dataset("coco", src, tmp_path / "shards", shards=2)
    assert (report["inputs"], report["written"], report["skipped"]) == (3, 3, 0)
    assert report["boxes_written"] == 4
    ds = ShardDataset(tmp_path / "shards")
    assert ds.class_names == ["person", "car", "dog"]
    assert ds.category_ids == [1, 3, 18]  # contiguous id -> COCO category id
    names = _by_name(ds)
    a = ds.annotations(names["000000397133.jpg"])
    assert a["image_id"] == 397133 and a["hw"] == (96, 128)
    np.testing.assert_allclose(a["boxes"].numpy(), [[10.5, 20.25, 40.5, 60.25],
                                                    [60, 10, 120, 90]])
    assert a["classes"].tolist() == [2, 0]  # dog (18), person (1)
    b = ds.annotations(names["000000037777.jpg"])
    assert b["iscrowd"].tolist() == [1, 0] and b["classes"].tolist() == [0, 1]
    c = ds.annotations(names["000000252219.jpg"])
    assert len(c["boxes"]) == 0 and c["image_id"] == 252219  # no annotations: kept, no boxes
    manifest = ds.manifest
    assert manifest["source"]["annotation"].endswith("instances_val2017.json")
    assert manifest["source"]["image_root"].endswith("val2017")


def test_voc_devkit_fixture(tmp_path: Path) -> None:
    src = datagen.voc_devkit(tmp_path)
    report = convert_dataset("voc", src, tmp_path / "all")
    assert (report["inputs"], report["written"], report["skipped"]) == (3, 3, 0)
    ds = ShardDataset(tmp_path / "all")
    assert ds.class_names == ["aeroplane", "person", "tvmonitor"]  # <part> names are not classes
    names = _by_name(ds)
    a = ds.annotations(names["2007_000027.jpg"])
    np.testing.assert_allclose(a["boxes"].numpy(), [[57, 20, 117, 110]])  # 1-based inclusive
    assert a["hw"] == (120, 160)
    b = ds.annotations(names["2007_000032.jpg"])
    assert b["classes"].tolist() == [0, 1] and b["difficult"].tolist() == [0, 1]
    c = ds.annotations(names["2007_000039.jpg"])
    np.testing.assert_allclose(c["boxes"].numpy(), [[0, 0, 100, 80]])  # the whole image
    report = convert_dataset("voc", src, tmp_path / "train", split="train")
    assert report["written"] == 2
    assert sorted(_by_name(ShardDataset(tmp_path / "train"))) == ["2007_000027.jpg",
                                                                   "2007_000032.jpg"]


def test_voc_labelimg_folder(tmp_path: Path) -> None:
    src = datagen.labelimg(tmp_path)
    report = convert_dataset("voc", src, tmp_path / "shards")
    assert (report["written"], report["skipped"], report["boxes_written"]) == (2, 0, 2)
    ds = ShardDataset(tmp_path / "shards")
    assert ds.class_names == ["bottle", "cup"]
    names = _by_name(ds)
    assert set(names) == {"kitchen_01.png", "kitchen_02.jpg"}
    a = ds.annotations(names["kitchen_01.png"])
    np.testing.assert_allclose(a["boxes"].numpy(), [[9, 11, 30, 40], [59, 4, 96, 64]])
    assert a["classes"].tolist() == [1, 0]
    assert len(ds.annotations(names["kitchen_02.jpg"])["boxes"]) == 0
    assert ds.image_bytes(names["kitchen_01.png"]) == (src / "kitchen_01.png").read_bytes()


RAW_W, RAW_H, RAW_RECT = 60, 40, (40, 5, 50, 12)


def _lit_box(image: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(image.float().mean(0) > 200, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_exif_orientation_applied_to_size_and_boxes(tmp_path: Path) -> None:
    """All 8 EXIF orientations, boxes given in the raw frame (VOC, declared raw size), in the
    display frame (YOLO, normalised) and via the declared rotated size (COCO)."""
    voc, yolo, coco_dir = tmp_path / "voc", tmp_path / "yolo", tmp_path / "coco"
    (yolo / "labels").mkdir(parents=True)
    coco_images = []
    expected = {}
    for o in range(1, 9):
        name = f"o{o}.jpg"
        data = datagen.image_bytes(RAW_W, RAW_H, orientation=o, rect=RAW_RECT, seed=o)
        disp = orient_boxes(np.array([RAW_RECT], np.float64), o, (RAW_W, RAW_H))[0]
        dw, dh = (RAW_W, RAW_H) if o < 5 else (RAW_H, RAW_W)
        expected[name] = (disp, (dh, dw))
        for d in (voc, yolo / "images", coco_dir / "images"):
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)
        x0, y0, x1, y1 = RAW_RECT
        (voc / f"o{o}.xml").write_text(
            f"<annotation><filename>{name}</filename><size><width>{RAW_W}</width><height>"
            f"{RAW_H}</height></size><object><name>spot</name><bndbox><xmin>{x0 + 1}</xmin>"
            f"<ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            "</annotation>")
        cx, cy = (disp[0] + disp[2]) / 2 / dw, (disp[1] + disp[3]) / 2 / dh
        (yolo / "labels" / f"o{o}.txt").write_text(
            f"0 {cx:.6f} {cy:.6f} {(disp[2] - disp[0]) / dw:.6f} {(disp[3] - disp[1]) / dh:.6f}\n")
        coco_images.append({"id": o, "file_name": name, "width": dw, "height": dh})
    anns = [{"id": o, "image_id": o, "category_id": 7, "iscrowd": 0,
             "bbox": [float(expected[f"o{o}.jpg"][0][0]), float(expected[f"o{o}.jpg"][0][1]),
                      float(expected[f"o{o}.jpg"][0][2] - expected[f"o{o}.jpg"][0][0]),
                      float(expected[f"o{o}.jpg"][0][3] - expected[f"o{o}.jpg"][0][1])]}
            for o in range(1, 9)]
    (coco_dir / "instances_test.json").write_text(json.dumps(
        {"images": coco_images, "annotations": anns, "categories": [{"id": 7, "name": "spot"}]}))
    # auto: VOC boxes are raw-frame, YOLO display-frame, COCO display-frame when its declared
    # size is the rotated one (orientations 5..8); "display" forces it for all of them
    runs = [("voc", voc, "auto", range(1, 9)), ("yolo", yolo, "auto", range(1, 9)),
            ("coco", coco_dir, "display", range(1, 9)), ("coco", coco_dir, "auto", (1, 5, 6, 7, 8))]
    for k, (fmt, src, frame, check) in enumerate(runs):
        report = convert_dataset(fmt, src, tmp_path / f"out{k}", shards=2, label_frame=frame,
                                 names=["spot"] if fmt == "yolo" else None)
        assert report["written"] == 8 and report["boxes_written"] == 8, (fmt, report)
        ds = ShardDataset(tmp_path / f"out{k}")
        for j in range(len(ds)):
            item = ds[j]
            if int(item["name"][1]) not in check:
                continue
            box, hw = expected[item["name"]]
            assert item["hw"] == hw and tuple(item["image"].shape[1:]) == hw, (fmt, item["name"])
            np.testing.assert_allclose(item["boxes"][0].numpy(), box, atol=1e-3,
                                       err_msg=f"{fmt} {item['name']}")
            # the box frames the white rectangle in the decoded (oriented) image
            np.testing.assert_allclose(_lit_box(item["image"]), box, atol=1.01,
                                       err_msg=f"{fmt} {item['name']}")


def _messy_yolo(root: Path) -> Path:
    """Nine good images plus a corrupt image, a malformed label and a clipped box."""
    write_yolo_dataset(root, 9, seed=5, **SMALL)
    data = (root / "images" / "synth_0005_00000.jpg").read_bytes()
    (root / "images" / "broken.jpg").write_bytes(data[: len(data) // 2])
    (root / "labels" / "broken.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "images" / "bad_label.jpg").write_bytes(data)
    (root / "labels" / "bad_label.txt").write_text("0 0.5 0.5 0.2\n")
    with open(root / "labels" / "synth_0005_00004.txt", "a") as f:
        f.write("1 0.95 0.5 0.3 0.2\n")
    return root


@pytest.mark.mpi
def test_mpirun_np2_equals_np1(tmp_path: Path) -> None:
    src = _messy_yolo(tmp_path / "yolo")
    one = convert_dataset("yolo", src, tmp_path / "np1", shards=3)  # what mpirun -np 1 runs
    res = run_cli(["convert", "yolo", str(src), str(tmp_path / "np2"), "--shards", "3", "-q"],
                  np=2, timeout=240)
    assert "inputs 11 = written 9 + skipped 2" in res.output
    assert (one["inputs"], one["written"], one["skipped"], one["boxes_clipped"]) == (11, 9, 2, 1)
    a, b = datagen.shard_content(tmp_path / "np1"), datagen.shard_content(tmp_path / "np2")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], f"{key} differs between -np 1 and -np 2"
    created = json.loads((tmp_path / "np2" / "manifest.json").read_text())["created_by"]
    assert created["ranks"] == 2
