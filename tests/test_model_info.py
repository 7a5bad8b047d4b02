"""`hvd-yolo model info`: the figures it prints, JSON output, weights check, bad size."""

from __future__ import annotations

import json

import pytest

from hvd_yolo.cli import main
from hvd_yolo.model.darknet_io import save_darknet_weights
from hvd_yolo.model.yolov3 import build_model


def test_yolov3_info_text(capsys):
    assert main(["model", "info", "--model", "yolov3", "--classes", "80"]) == 0
    out = capsys.readouterr().out
    assert "parameters:  61,949,149" in out
    assert "62,001,757 floats" in out and "248,007,048 bytes" in out
    assert "shape [1, 3, 13, 13, 85]" in out and "shape [1, 3, 52, 52, 85]" in out
    assert "GFLOPs:      65.86 per image at 416x416" in out


def test_tiny_info_json_non_square(capsys):
    assert main(["model", "info", "--model", "yolov3-tiny", "--classes", "80", "--size",
                 "320x608", "--json", "-"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 8_852_366 and info["darknet_floats"] == 8_858_734
    assert [o["shape"] for o in info["outputs"]] == [[1, 3, 10, 19, 85], [1, 3, 20, 38, 85]]
    assert [o["stride"] for o in info["outputs"]] == [32, 16]
    assert info["input_hw"] == [320, 608]


def test_info_with_classes_and_weights(tmp_path, capsys):
    path = tmp_path / "tiny3.weights"
    save_darknet_weights(build_model("yolov3-tiny", 3), path, seen=64)
    assert main(["model", "info", "--model", "yolov3-tiny", "--classes", "3", "--size", "256",
                 "--weights", str(path)]) == 0
    out = capsys.readouterr().out
    assert "shape [1, 3, 8, 8, 8]" in out and "64 images seen" in out
    # The same file for an 80-class model: a clear error naming the file and the counts.
    assert main(["model", "info", "--model", "yolov3-tiny", "--weights", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "expected 8858734 floats" in err and "3 classes" in err


def test_size_not_divisible_by_32(capsys):
    assert main(["model", "info", "--size", "400"]) == 2
    assert "400x400 is not divisible by 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["model", "info", "--size", "abc"])
