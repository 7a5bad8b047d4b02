"""`convert --reencode png`: TIFF, BMP and other images the shard format cannot keep as they are
are stored re-encoded losslessly as PNG (same pixels, boxes oriented as for a JPEG), each one
listed in the report; by default they are skipped with a reason that names the option."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from hvd_yolo import cli
from hvd_yolo.data.dataset import ShardDataset
from hvd_yolo.shards.convert import ConversionError, convert_dataset


def _encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _aerial(root: Path) -> dict[str, Image.Image]:
    """A YOLO dataset of TIFF/BMP/WEBP tiles, one box each; returns each image as Pillow sees it."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    grey16 = Image.fromarray(rng.integers(0, 65535, (40, 56), dtype=np.uint16))
    cmyk = Image.fromarray(rng.integers(0, 255, (40, 56, 4), dtype=np.uint8), mode="CMYK")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 40 wide and 56 high
    files = {
        "tile_rgb.tif": (_encode(rgb, "TIFF", compression="tiff_lzw"), rgb),
        "tile_grey16.tiff": (_encode(grey16, "TIFF"), grey16),
        "tile_cmyk.tif": (_encode(cmyk, "TIFF"), cmyk.convert("RGB")),
        "tile_rotated.tif": (_encode(rgb, "TIFF", exif=exif),
                             rgb.transpose(Image.Transpose.ROTATE_270)),
        "tile_bmp.bmp": (_encode(rgb, "BMP"), rgb),
        "tile_webp.webp": (_encode(rgb, "WEBP", lossless=True), rgb),
        "tile_float.tif": (_encode(Image.fromarray(rng.random((40, 56), dtype=np.float32)),
                                   "TIFF"), None),
    }
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("building\n")
    for name, (data, _) in files.items():
        (root / "images" / name).write_bytes(data)
        (root / "labels" / (Path(name).stem + ".txt")).write_text("0 0.5 0.5 0.25 0.5\n")
    return {name: img for name, (_, img) in files.items() if img is not None}


def test_reencode_png_stores_other_formats_losslessly(tmp_path: Path, capsys: Any) -> None:
    expected = _aerial(tmp_path / "src")
    out = tmp_path / "shards"
    assert cli.main(["convert", "yolo", str(tmp_path / "src"), str(out), "--reencode", "png",
                     "-q", "--shards", "2"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "manifest.json").read_text())["report"]
    assert (report["inputs"], report["written"], report["skipped"]) == (7, 6, 1)
    assert "re-encoded losslessly as PNG (--reencode png): 6 of the written images" in printed
    reasons = {i["item"]: i["reason"] for i in report["reencoded"]}
    assert sorted(reasons) == sorted(expected)
    assert reasons["tile_rgb.tif"] == "TIFF re-encoded losslessly as PNG"
    assert reasons["tile_cmyk.tif"] == ("TIFF re-encoded losslessly as PNG (colour mode CMYK "
                                        "converted to RGB)")
    assert reasons["tile_bmp.bmp"] == "BMP re-encoded losslessly as PNG"
    skipped = {i["item"]: i["reason"] for i in report["skipped_items"]}
    assert skipped["tile_float.tif"] == (
        "cannot re-encode this TIFF image as PNG: TIFF with pixel mode F cannot be stored as PNG "
        "exactly: convert it to 8- or 16-bit RGB or grey first")
    assert not (out / ".reencoded").exists()  # the spilled PNGs are gone
    ds = ShardDataset(out)
    for i in range(len(ds)):
        s = ds[i]
        stem = ds.annotations(i)["name"]
        img = expected[stem]
        want = np.asarray(img.convert("RGB")) if img.mode != "I;16" else None
        h, w = s["image"].shape[1:]
        assert (w, h) == img.size, stem
        if want is not None:  # 8-bit: the same pixels, exactly
            assert torch.equal(s["image"].permute(1, 2, 0), torch.from_numpy(want)), stem
        # the box follows the displayed image (YOLO labels are display-frame)
        assert s["boxes"].tolist() == [[w * 0.375, h * 0.25, w * 0.625, h * 0.75]], stem
    raw = ds.image_bytes(next(i for i in range(len(ds)) if "grey16" in ds.annotations(i)["name"]))
    with Image.open(io.BytesIO(raw)) as png:  # 16-bit grey kept at 16 bits
        assert png.format == "PNG"
        assert np.array_equal(np.asarray(png), np.asarray(expected["tile_grey16.tiff"]))


def test_without_reencode_other_formats_are_skipped_naming_the_option(tmp_path: Path) -> None:
    _aerial(tmp_path / "src")
    with pytest.raises(ConversionError, match="all 7 inputs were skipped.*--reencode png"):
        convert_dataset("yolo", tmp_path / "src", tmp_path / "shards")
    with pytest.raises(ConversionError, match="--reencode must be one of png, got 'jpeg'"):
        convert_dataset("yolo", tmp_path / "src", tmp_path / "shards", reencode="jpeg")
