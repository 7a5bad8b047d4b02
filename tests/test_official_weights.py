"""The official yolov3-tiny weights against an independent Darknet reader, on real photos.

The reader is OpenCV's dnn module (``cv2.dnn.readNetFromDarknet``: its own cfg parser, weight
loader, layers and YOLO decoding). Both networks get the same letterboxed pixels. Its YOLO
layers output, per cell and anchor, ``(cx, cy, w, h)`` as fractions of the input, objectness,
and objectness x class probability (zeroed at or below ``OPENCV_CLASS_THRESH``); hvd_yolo's
raw maps decoded the same way must equal them within 1e-4, and ``hvd-yolo detect`` must find
what OpenCV's detections + NMS find. The files are fetched once and cached
(``tests/fixtures/official.py``); without them, or without OpenCV, the tests skip and say why.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from hvd_yolo.checkpoint import atomic_save
from hvd_yolo.config import DEFAULT_ANCHORS, Config
from hvd_yolo.data.transforms import letterbox
from hvd_yolo.launch import hvd_yolo_argv
from hvd_yolo.model.darknet_io import load_darknet_weights
from hvd_yolo.model.yolov3 import build_model
from hvd_yolo.shards.format import decode_rgb
from tests.fixtures.official import Unavailable, official_file

cv2 = pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless) is not installed")
if not hasattr(cv2.dnn, "readNetFromDarknet"):  # OpenCV 5 dropped the Darknet importer
    pytest.skip(f"OpenCV {cv2.__version__} has no Darknet reader (needs OpenCV 4)",
                allow_module_level=True)

SIZE = 416
PHOTOS = ("bus.jpg", "zidane.jpg")
OPENCV_CLASS_THRESH = 0.2  # OpenCV's [yolo] import zeroes class scores at or below this
TOL = 1e-4


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    try:
        return {name: official_file(name) for name in
                ("yolov3-tiny.cfg", "yolov3-tiny.weights", "coco.names", *PHOTOS)}
    except Unavailable as e:
        pytest.skip(f"official yolov3-tiny files unavailable: {e}")


@pytest.fixture(scope="module")
def model(files: dict[str, Path]) -> torch.nn.Module:
    m = build_model("yolov3-tiny", 80).eval()  # the official default anchors
    load_darknet_weights(m, files["yolov3-tiny.weights"])
    return m


@pytest.fixture(scope="module")
def opencv(files: dict[str, Path]):
    net = cv2.dnn.readNetFromDarknet(str(files["yolov3-tiny.cfg"]), str(files["yolov3-tiny.weights"]))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    return net


def letterboxed(path: Path) -> tuple[torch.Tensor, dict]:
    """The photo as ``hvd-yolo detect`` feeds it: decoded RGB, letterboxed, ``[1, 3, S, S]``."""
    image, _, meta = letterbox(decode_rgb(path.read_bytes()), None, SIZE)
    return (image.float() / 255)[None], meta


def opencv_rows(net, x: torch.Tensor) -> list[np.ndarray]:
    """OpenCV's YOLO layer outputs, ``[cells * anchors, 85]`` per output, large stride first."""
    net.setInput(x.numpy())
    return list(net.forward(net.getUnconnectedOutLayersNames()))


def our_rows(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    """hvd_yolo's raw maps decoded the way OpenCV writes its rows (cell-major, then anchor)."""
    with torch.no_grad():
        raw = model(x)
    rows = []
    for p, anchors in zip(raw, model.anchors):
        _, a, h, w, _ = p.shape
        gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        anchor = torch.tensor(anchors).view(1, a, 1, 1, 2)
        xy = (p[..., :2].sigmoid() + torch.stack((gx, gy), -1)) / torch.tensor([w, h])
        wh = p[..., 2:4].exp() * anchor / SIZE
        obj = p[..., 4:5].sigmoid()
        decoded = torch.cat((xy, wh, obj, obj * p[..., 5:].sigmoid()), -1)
        rows.append(decoded[0].permute(1, 2, 0, 3).reshape(-1, p.shape[-1]).numpy())
    return rows


def test_the_official_cfg_sets_our_default_anchors(files: dict[str, Path]) -> None:
    sections, current = [], None
    for line in files["yolov3-tiny.cfg"].read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("["):
            current = {"type": line}
            sections.append(current)
        elif "=" in line and current is not None:
            key, value = (s.strip() for s in line.split("=", 1))
            current[key] = value
    yolos = [s for s in sections if s["type"] == "[yolo]"]
    values = [float(v) for v in yolos[0]["anchors"].replace(",", " ").split()]
    pairs = list(zip(values[::2], values[1::2]))
    from_cfg = [[pairs[int(i)] for i in s["mask"].split(",")] for s in yolos]  # in cfg order
    assert [s["mask"].replace(" ", "") for s in yolos] == ["3,4,5", "0,1,2"]
    assert from_cfg == build_model("yolov3-tiny", 80).anchors
    assert from_cfg == [[tuple(map(float, p)) for p in s] for s in DEFAULT_ANCHORS["yolov3-tiny"]]


@pytest.mark.parametrize("photo", PHOTOS)
def test_raw_outputs_equal_opencvs(photo: str, files: dict[str, Path], model, opencv) -> None:
    x, _ = letterboxed(files[photo])
    theirs, ours = opencv_rows(opencv, x), our_rows(model, x)
    assert [t.shape for t in theirs] == [o.shape for o in ours] == [(507, 85), (2028, 85)]
    for t, o in zip(theirs, ours):
        np.testing.assert_allclose(o[:, :5], t[:, :5], rtol=0, atol=TOL)  # boxes, objectness
        kept = t[:, 5:] > 0
        assert kept.any()
        np.testing.assert_allclose(o[:, 5:][kept], t[:, 5:][kept], rtol=0, atol=TOL)
        assert o[:, 5:][~kept].max() <= OPENCV_CLASS_THRESH + TOL


def test_the_forks_stride16_anchors_would_not_match(files: dict[str, Path], model, opencv) -> None:
    # The check has teeth: with mask 1,2,3 at stride 16 the widths and heights are far off.
    fork = build_model("yolov3-tiny", 80, anchors=[model.anchors[0], [(23, 27), (37, 58), (81, 82)]])
    fork.load_state_dict({k: v for k, v in model.state_dict().items() if k != "anchor_wh"},
                         strict=False)
    x, _ = letterboxed(files["bus.jpg"])
    stride16 = np.abs(our_rows(fork.eval(), x)[1][:, 2:4] - opencv_rows(opencv, x)[1][:, 2:4])
    assert stride16.max() > 0.1


def opencv_detections(net, x: torch.Tensor, meta: dict, conf: float, iou: float
                      ) -> list[tuple[int, np.ndarray]]:
    """OpenCV's post-processing: best class per row above ``conf``, per-class
    ``cv2.dnn.NMSBoxes``; boxes ``(x, y, w, h)`` in original pixels."""
    rows = np.concatenate(opencv_rows(net, x))
    cls = rows[:, 5:].argmax(1)
    score = rows[np.arange(len(rows)), 5 + cls]
    keep = score > conf
    rows, cls, score = rows[keep], cls[keep], score[keep]
    left, top = meta["pad"]
    xywh = np.stack([(rows[:, 0] - rows[:, 2] / 2) * SIZE - left,
                     (rows[:, 1] - rows[:, 3] / 2) * SIZE - top,
                     rows[:, 2] * SIZE, rows[:, 3] * SIZE], 1) / meta["scale"]
    found = []
    for c in np.unique(cls):
        idx = np.flatnonzero(cls == c)
        for i in np.array(cv2.dnn.NMSBoxes(xywh[idx].tolist(), score[idx].tolist(), conf, iou)).ravel():
            found.append((int(c), xywh[idx[i]]))
    return found


def iou_xywh(a: np.ndarray, b: np.ndarray) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_detect_finds_what_opencv_finds(files: dict[str, Path], model, opencv, tmp_path: Path
                                        ) -> None:
    names = files["coco.names"].read_text().split("\n")[:80]
    cfg = Config()
    cfg.model.anchors = [[list(p) for p in s] for s in model.anchors]
    cfg.input.size = SIZE
    ckpt = tmp_path / "official.pt"  # the official weights as a checkpoint detect can take
    atomic_save({"model": model.state_dict(), "class_names": names, "model_name": "yolov3-tiny",
                 "config": cfg.to_dict()}, ckpt)
    out = tmp_path / "detections.json"
    conf, iou = 0.25, 0.45
    photos = [str(files[p]) for p in PHOTOS]
    res = subprocess.run(hvd_yolo_argv("detect", "--checkpoint", str(ckpt), *photos, "--out",
                                       str(out), "--conf", str(conf), "--iou", str(iou)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    ours = json.loads(out.read_text())
    found_names = set()
    for photo in PHOTOS:
        x, meta = letterboxed(files[photo])
        theirs = opencv_detections(opencv, x, meta, conf, iou)
        mine = [(d["category_id"], np.array(d["bbox"])) for d in ours if d["file_name"] == photo]
        assert sorted(c for c, _ in mine) == sorted(c for c, _ in theirs), photo
        for c, box in theirs:  # each of OpenCV's boxes has its own match in ours
            best = max((iou_xywh(box, b), j) for j, (k, b) in enumerate(mine) if k == c)
            assert best[0] >= 0.95, (photo, names[c], best[0])
            mine.pop(best[1])
        found_names |= {names[c] for c, _ in theirs}
    assert {"bus", "person"} <= found_names  # the photos' obvious objects
