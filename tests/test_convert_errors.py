"""Bad input: every case is skipped and reported (or stops with --strict), with counts that add up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hvd_yolo import cli
from hvd_yolo.data.dataset import ShardDataset
from hvd_yolo.data.synthetic import write_yolo_dataset
from hvd_yolo.shards.comm import world_comm
from hvd_yolo.shards.convert import ConversionError, StrictError, convert_dataset
from tests.fixtures import datagen

SMALL = {"size": (48, 64)}


def _reasons(report: dict[str, Any], kind: str = "skipped_items") -> dict[str, dict[str, Any]]:
    return {i["item"] + (f"@{i['line']}" if kind == "box_issues" else ""): i
            for i in report[kind]}


def _balanced(report: dict[str, Any]) -> None:
    assert report["inputs"] == report["written"] + report["skipped"]
    assert report["skipped"] == len(report["skipped_items"])
    assert report["boxes_seen"] == (report["boxes_written"] + report["boxes_dropped"]
                                    + report["boxes_in_skipped_items"])
    assert report["boxes_clipped"] + report["boxes_dropped"] == len(report["box_issues"])


def _messy_yolo(root: Path) -> Path:
    write_yolo_dataset(root, 3, seed=2, **SMALL)  # synth_0002_0000{0,1,2}: good
    img, lab = root / "images", root / "labels"
    good = (img / "synth_0002_00000.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (lab / "truncated.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (img / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    (lab / "garbage.txt").write_text("")
    (img / "bitmap.bmp").write_bytes(datagen.image_bytes(32, 32, "BMP"))
    (lab / "bitmap.txt").write_text("")
    (img / "no_label.jpg").write_bytes(good)
    (lab / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (img / "columns.jpg").write_bytes(good)
    (lab / "columns.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n")
    (img / "polygon.jpg").write_bytes(good)
    (lab / "polygon.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    (img / "text.jpg").write_bytes(good)
    (lab / "text.txt").write_text("0 0.5 0.5 0.2 0.2\n\n2 0.5 abc 0.2 0.2\n")
    (img / "floatclass.jpg").write_bytes(good)
    (lab / "floatclass.txt").write_text("1.5 0.5 0.5 0.2 0.2\n")
    (img / "unknown.jpg").write_bytes(good)
    (lab / "unknown.txt").write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n")
    (img / "twin.jpg").write_bytes(good)
    (img / "twin.png").write_bytes(datagen.image_bytes(64, 48, "PNG"))
    (lab / "twin.txt").write_text("")
    # an image whose boxes need fixing: kept, with its bad boxes clipped or dropped
    (img / "boxes.jpg").write_bytes(good)  # 64 wide, 48 high
    (lab / "boxes.txt").write_text(
        "0 0.5 0.5 0.25 0.25\n"      # 1 fine
        "1 0.95 0.5 0.3 0.2\n"       # 2 sticks out on the right: clipped
        "2 0.5 0.5 0 0.2\n"          # 3 zero width: dropped
        "0 0.5 0.5 -0.1 0.2\n"       # 4 negative width: dropped
        "1 nan 0.5 0.1 0.1\n"        # 5 NaN: dropped
        "2 1.5 1.5 0.2 0.2\n"        # 6 entirely outside: dropped
        "0 0.1 0.1 0.2 0.2\n")       # 7 corner (0,0) touching: kept, not clipped
    return root


def test_yolo_bad_items_are_skipped_and_reported(tmp_path: Path, capsys: Any) -> None:
    src = _messy_yolo(tmp_path / "yolo")
    out = tmp_path / "shards"
    rc = cli.main(["convert", "yolo", str(src), str(out), "--shards", "2", "-q",
                   "--max-issues", "100"])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "manifest.json").read_text())["report"]
    _balanced(report)
    assert (report["inputs"], report["written"], report["skipped"]) == (16, 4, 12)
    assert "inputs 16 = written 4 + skipped 12" in printed  # always printed at the end
    skipped = _reasons(report)
    expect = {
        "truncated.jpg": "corrupt or unreadable JPEG image",
        "garbage.jpg": "unsupported image format (unknown)",
        "bitmap.bmp": "unsupported image format (BMP)",
        "no_label.jpg": "label file missing",
        "orphan.txt": "label file has no image",
        "columns.jpg": "line has 4 columns, expected 5",
        "polygon.jpg": "segmentation polygons are not supported",
        "text.jpg": "non-numeric value 'abc'",
        "floatclass.jpg": "class id '1.5' is not an integer",
        "unknown.jpg": "unknown class id 7 (data.yaml lists 3 classes, ids 0..2)",
        "twin.jpg": "duplicate image name: twin.jpg, twin.png would share labels/twin.txt",
        "twin.png": "duplicate image name",
    }
    assert set(skipped) == set(expect)
    for name, reason in expect.items():
        assert reason in skipped[name]["reason"], (name, skipped[name])
        assert reason.split(" (")[0].split(":")[0] in printed
    lines = {n: skipped[n]["line"] for n in ("columns.jpg", "polygon.jpg", "text.jpg",
                                               "floatclass.jpg", "unknown.jpg")}
    assert lines == {"columns.jpg": 2, "polygon.jpg": 1, "text.jpg": 3, "floatclass.jpg": 1,
                     "unknown.jpg": 2}
    assert skipped["columns.jpg"]["file"] == "labels/columns.txt"
    assert skipped["truncated.jpg"]["file"] == "images/truncated.jpg"
    # boxes: 7 in boxes.txt -> 3 kept (1 clipped), 4 dropped; the rest come from good images
    box = _reasons(report, "box_issues")
    assert report["boxes_clipped"] == 1 and report["boxes_dropped"] == 4
    assert box["boxes.jpg@2"]["kind"] == "clipped" and "clipped to" in box["boxes.jpg@2"]["reason"]
    assert "zero or negative area" in box["boxes.jpg@3"]["reason"]
    assert "zero or negative area" in box["boxes.jpg@4"]["reason"]
    assert "NaN or infinite" in box["boxes.jpg@5"]["reason"]
    assert "lies outside the 64x48 image" in box["boxes.jpg@6"]["reason"]
    ds = ShardDataset(out)
    names = {ds.annotations(i)["name"]: i for i in range(len(ds))}
    a = ds.annotations(names["boxes.jpg"])
    np.testing.assert_allclose(a["boxes"].numpy(), [[24, 18, 40, 30], [51.2, 19.2, 64, 28.8],
                                                    [0, 0, 12.8, 9.6]], atol=1e-4)
    assert a["classes"].tolist() == [0, 1, 0]


def test_allow_missing_labels_writes_background_images(tmp_path: Path) -> None:
    src = write_yolo_dataset(tmp_path / "yolo", 3, seed=4, **SMALL)
    (src / "labels" / "synth_0004_00001.txt").unlink()
    report = convert_dataset("yolo", src, tmp_path / "a")
    assert (report["written"], report["skipped"]) == (2, 1)
    assert "label file missing" in report["skipped_items"][0]["reason"]
    report = convert_dataset("yolo", src, tmp_path / "b", allow_missing_labels=True)
    assert (report["written"], report["skipped"]) == (3, 0)
    assert any("1 images had no label file" in n for n in report["notes"])


@pytest.mark.parametrize("content, where, reason", [
    ("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n", "labels/synth_0006_00001.txt:2",
     "line has 4 columns"),
    ("0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n", "labels/synth_0006_00001.txt:2",
     "unknown class id 5"),
    ("0 0.5 0.5 0.2 0.2\n0 1.1 0.5 0.4 0.2\n", "labels/synth_0006_00001.txt:2",
     "extends outside the 64x48 image"),
    ("0 0.5 0.5 0.2 0.2\n0 nan 0.5 0.4 0.2\n", "labels/synth_0006_00001.txt:2",
     "NaN or infinite"),
])
def test_strict_stops_at_first_bad_item_naming_file_and_line(
        tmp_path: Path, content: str, where: str, reason: str) -> None:
    src = write_yolo_dataset(tmp_path / "yolo", 4, seed=6, **SMALL)
    (src / "labels" / "synth_0006_00001.txt").write_text(content)
    (src / "labels" / "synth_0006_00003.txt").write_text("x\n")  # a later bad item
    with pytest.raises(StrictError) as err:
        convert_dataset("yolo", src, tmp_path / "out", strict=True)
    msg = str(err.value)
    assert f"{where}: " in msg and reason in msg and "--strict" in msg
    assert not (tmp_path / "out" / "manifest.json").exists()
    # without --strict the same input converts, skipping and reporting
    report = convert_dataset("yolo", src, tmp_path / "out2")
    _balanced(report)
    assert report["skipped"] >= 1


def test_strict_cli_message_and_exit_code(tmp_path: Path, capsys: Any) -> None:
    src = write_yolo_dataset(tmp_path / "yolo", 2, seed=7, **SMALL)
    (src / "labels" / "synth_0007_00000.txt").write_text("0 0.5 oops 0.2 0.2\n")
    rc = cli.main(["convert", "yolo", str(src), str(tmp_path / "o"), "--strict", "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "labels/synth_0007_00000.txt:1: non-numeric value 'oops'" in err


def test_empty_source_and_output_dir_rules(tmp_path: Path) -> None:
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "labels").mkdir()
    with pytest.raises(ConversionError, match="no images in .* and no labels"):
        convert_dataset("yolo", tmp_path / "empty", tmp_path / "o1")
    (tmp_path / "voc").mkdir()
    with pytest.raises(ConversionError, match="no .xml annotation files found"):
        convert_dataset("voc", tmp_path / "voc", tmp_path / "o1")
    with pytest.raises(ConversionError, match="expected a YOLO dataset with images/ and labels/"):
        convert_dataset("yolo", tmp_path / "voc", tmp_path / "o1")
    with pytest.raises(ConversionError, match="no COCO json found"):
        convert_dataset("coco", tmp_path / "voc", tmp_path / "o1")

    src = write_yolo_dataset(tmp_path / "yolo", 5, seed=8, **SMALL)
    out = tmp_path / "out"
    convert_dataset("yolo", src, out, shards=4)
    assert len(list(out.glob("shard-*.h5"))) == 4
    with pytest.raises(ConversionError, match="is not empty .* pass --overwrite"):
        convert_dataset("yolo", src, out, shards=2)
    assert len(list(out.glob("shard-*.h5"))) == 4  # untouched
    (out / "notes.txt").write_text("mine")
    convert_dataset("yolo", src, out, shards=2, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt",
                                                     "shard-00000.h5", "shard-00001.h5"]
    with pytest.raises(ConversionError, match="give --shards or --shard-size, not both"):
        convert_dataset("yolo", src, tmp_path / "o3", shards=2, shard_size_mb=1)
    for label in (src / "labels").glob("*.txt"):
        label.write_text("x\n")
    with pytest.raises(ConversionError, match="all 5 inputs were skipped; first: labels/synth"):
        convert_dataset("yolo", src, tmp_path / "o4")


def test_horovodrun_without_mpi_is_refused(monkeypatch: Any) -> None:
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE",
                "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOROVOD_SIZE", "2")
    with pytest.raises(ConversionError, match="use `mpirun -np N hvd-yolo convert"):
        world_comm()


def test_coco_bad_input(tmp_path: Path) -> None:
    src = datagen.coco(tmp_path)
    ann = src / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["images"].append(dict(data["images"][0], id=5))  # duplicate file_name
    data["images"].append({"id": 6, "file_name": "missing.jpg", "width": 10, "height": 10})
    data["images"].append({"id": 7, "file_name": "wrongsize.jpg", "width": 300, "height": 200})
    datagen.write_image(src / "val2017" / "wrongsize.jpg", 64, 48)
    data["images"].append({"id": 8, "file_name": "badcat.jpg", "width": 64, "height": 48})
    datagen.write_image(src / "val2017" / "badcat.jpg", 64, 48)
    data["images"].append({"id": 9, "file_name": "badbox.jpg", "width": 64, "height": 48})
    datagen.write_image(src / "val2017" / "badbox.jpg", 64, 48)
    data["annotations"] += [
        {"id": 50, "image_id": 8, "category_id": 99, "bbox": [1, 1, 5, 5], "iscrowd": 0},
        {"id": 51, "image_id": 9, "category_id": 1, "bbox": [1, 1, 5], "iscrowd": 0},
        {"id": 52, "image_id": 397133, "category_id": 1, "bbox": [10, 10, 0, 5], "iscrowd": 0},
        {"id": 53, "image_id": 12345, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0},
    ]
    ann.write_text(json.dumps(data))
    datagen.write_image(src / "val2017" / "unlisted.jpg", 16, 16)
    report = convert_dataset("coco", src, tmp_path / "out")
    _balanced(report)
    assert (report["inputs"], report["written"], report["skipped"]) == (8, 3, 5)
    reasons = {i["item"] + str(i["reason"][:20]): i["reason"] for i in report["skipped_items"]}
    joined = "\n".join(reasons.values())
    assert "duplicate image name '000000397133.jpg' (image ids 397133 and 5)" in joined
    assert "missing.jpg" in {i["item"] for i in report["skipped_items"]}
    assert "cannot read image" in joined
    assert "annotation says the image is 300x200 but val2017/wrongsize.jpg is 64x48" in joined
    assert "annotation id 50: unknown category_id 99 (categories: [1, 3, 18])" in joined
    assert "annotation id 51: bbox must be 4 numbers" in joined
    assert report["boxes_dropped"] == 1
    assert "annotation id 52: box (10, 10, 10, 15) has zero or negative area" in \
        report["box_issues"][0]["reason"]
    assert any("1 annotations refer to image ids not in `images`" in n for n in report["notes"])
    assert any("1 image files in" in n and "not in instances_val2017.json" in n
               for n in report["notes"])
    ann.write_text("{not json")
    with pytest.raises(ConversionError, match="instances_val2017.json: not a readable JSON"):
        convert_dataset("coco", src, tmp_path / "out2")


def test_voc_bad_input(tmp_path: Path) -> None:
    src = datagen.voc_devkit(tmp_path)
    ann, jpg = src / "Annotations", src / "JPEGImages"
    good = (ann / "2007_000039.xml").read_text()
    (ann / "broken.xml").write_text("<annotation>\n<filename>x.jpg</filename>\n<object>\n"
                                    "</annotation>\n")
    (ann / "nobox.xml").write_text(good.replace("2007_000039", "nobox").replace(
        "<xmax>100</xmax>", "<xmax>wide</xmax>"))
    datagen.write_image(jpg / "nobox.jpg", 100, 80)
    (ann / "noimage.xml").write_text(good.replace("2007_000039", "noimage"))
    (ann / "copy.xml").write_text(good)  # a second annotation of 2007_000039.jpg
    (ann / "alien.xml").write_text(good.replace("2007_000039", "alien").replace(
        "tvmonitor", "alien"))
    datagen.write_image(jpg / "alien.jpg", 100, 80)
    datagen.write_image(jpg / "lonely.jpg", 20, 20)
    report = convert_dataset("voc", src, tmp_path / "out",
                             names=["aeroplane", "person", "tvmonitor"])
    _balanced(report)
    assert (report["inputs"], report["written"], report["skipped"]) == (9, 3, 6)
    by_file = {(i["file"], i["line"]): i["reason"] for i in report["skipped_items"]}
    assert by_file[("Annotations/broken.xml", 4)].startswith("malformed XML (mismatched tag)")
    assert "<xmax> of 'tvmonitor' is missing or non-numeric ('wide')" in by_file[
        ("Annotations/nobox.xml", 23)]
    assert "image not found (filename 'noimage.jpg'" in by_file[("Annotations/noimage.xml", None)]
    dup = [r for (f, _), r in by_file.items() if f in ("Annotations/copy.xml",
                                                        "Annotations/2007_000039.xml")]
    assert len(dup) == 1 and "duplicate image name: 2007_000039.jpg is also annotated by" in dup[0]
    assert "unknown class name 'alien' (known: aeroplane, person, tvmonitor)" in by_file[
        ("Annotations/alien.xml", 15)]
    assert "no annotation file refers to this image (expected Annotations/lonely.xml)" in by_file[
        ("JPEGImages/lonely.jpg", None)]
