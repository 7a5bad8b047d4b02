"""`hvd-yolo detect` writes only its own outputs: never over inputs, a checkpoint or foreign files;
drawings keep the input's subfolders; detections carry file names; unreadable files are skipped
with their reason (BMP is read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hvd_yolo import checkpoint, cli
from hvd_yolo.config import Config
from hvd_yolo.model.yolov3 import build_model
from tests.fixtures.datagen import write_image


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) yolov3-tiny checkpoint at 64 px: these tests are about files, not boxes."""
    torch.manual_seed(0)
    cfg = Config()
    cfg.input.size = 64
    state = {"model": build_model("yolov3-tiny", 3).state_dict(), "ema": None,
             "config": cfg.to_dict(), "class_names": ["a", "b", "c"], "category_ids": [0, 1, 2],
             "model_name": "yolov3-tiny", "step": 1}
    ckpt_dir = tmp_path_factory.mktemp("ckpt")
    return checkpoint.save(state, ckpt_dir, 1, 1)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_image(root / "a" / "x.jpg", 40, 32, seed=1)
    write_image(root / "b" / "x.jpg", 48, 32, seed=2)  # same basename, another subfolder
    write_image(root / "c.png", 32, 40, seed=3)
    from PIL import Image

    Image.new("RGB", (36, 30), (200, 10, 10)).save(root / "d.bmp")  # listed as supported
    (root / "broken.jpg").write_bytes(b"not an image at all" * 20)
    (root / "notes.txt").write_text("not an image suffix: ignored")
    return root


def detect(ckpt: Path, capsys: Any, *args: str) -> tuple[int, str]:
    rc = cli.main(["detect", "--checkpoint", str(ckpt), "--conf", "0.001", *args])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_detect_refuses_to_write_over_what_it_did_not_write(ckpt: Path, images: Path,
                                                            tmp_path: Path, capsys: Any) -> None:
    original = ckpt.read_bytes()
    rc, out = detect(ckpt, capsys, str(images), "--out", str(ckpt))
    assert rc == 2 and f"hvd-yolo detect: error: --out {ckpt} would write over the input {ckpt}" in out
    assert ckpt.read_bytes() == original
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    rc, out = detect(ckpt, capsys, str(images), "--out", str(notes))
    assert rc == 2 and "is not a detections file written by hvd-yolo detect" in out
    assert notes.read_text() == '{"mine": 1}'
    before = {p: p.read_bytes() for p in images.rglob("*") if p.is_file()}
    for inside in (images, images / "a"):
        rc, out = detect(ckpt, capsys, str(images), "--out", str(tmp_path / "d.json"),
                         "--draw", str(inside))
        assert rc == 2 and f"--draw {inside} is inside the input" in out
    assert {p: p.read_bytes() for p in images.rglob("*") if p.is_file()} == before
    foreign = tmp_path / "photos"
    write_image(foreign / "keep.png", 8, 8)
    rc, out = detect(ckpt, capsys, str(images), "--out", str(tmp_path / "d.json"),
                     "--draw", str(foreign))
    assert rc == 2 and "is not an empty folder or an earlier --draw folder" in out
    assert not (tmp_path / "d.json").exists()
    with pytest.raises(SystemExit) as e:  # no default detections.json in the current directory
        cli.main(["detect", "--checkpoint", str(ckpt), str(images)])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_detect_keeps_subfolders_and_names_files(ckpt: Path, images: Path, tmp_path: Path,
                                                 capsys: Any) -> None:
    out, drawn = tmp_path / "dets.json", tmp_path / "drawn"
    rc, text = detect(ckpt, capsys, str(images), "--out", str(out), "--draw", str(drawn))
    assert rc == 0, text
    assert f"hvd-yolo detect: skipped {images / 'broken.jpg'}: not a readable image" in text
    assert "4 images" in text and "1 skipped" in text
    assert sorted(p.relative_to(drawn).as_posix() for p in drawn.rglob("*.png")) == [
        "a/x.png", "b/x.png", "c.png", "d.png"]
    dets = json.loads(out.read_text())
    assert {d["file_name"] for d in dets} == {"a/x.jpg", "b/x.jpg", "c.png", "d.bmp"}
    # its own outputs may be written again
    rc, text = detect(ckpt, capsys, str(images), "--out", str(out), "--draw", str(drawn))
    assert rc == 0, text
