"""Darknet .cfg import and export: the official yolov3-tiny pair in and out byte for byte,
OpenCV's Darknet reader on exported pairs, layouts outside yolov3/yolov3-tiny refused by line,
and `detect`/`eval` taking a .cfg/.weights pair directly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from hvd_yolo import cli
from hvd_yolo.checkpoint import restore_model
from hvd_yolo.launch import hvd_yolo_argv
from hvd_yolo.model.darknet_cfg import CfgError, cfg_text, read_cfg
from hvd_yolo.model.darknet_io import save_darknet_weights
from hvd_yolo.model.yolov3 import build_model
from tests.fixtures.datagen import write_image
from tests.fixtures.models import randomised_model
from tests.fixtures.official import official_tiny

torch.set_num_threads(1)
OFFICIAL_TINY_ANCHORS = [[(81, 82), (135, 169), (344, 319)], [(10, 14), (23, 27), (37, 58)]]


def _decoded(model, raw: list[torch.Tensor], size: int) -> list[np.ndarray]:
    """Our raw maps in OpenCV's Darknet-region layout: rows (y, x, anchor), columns centre x/y
    and w/h as fractions of the input, objectness, objectness x class probability."""
    out = []
    for r, anchors in zip(raw, model.anchor_wh):
        _, a, h, w, n = r.shape
        t = r[0].permute(1, 2, 0, 3).reshape(-1, n)
        gy, gx, ga = (g.reshape(-1) for g in torch.meshgrid(
            torch.arange(h), torch.arange(w), torch.arange(a), indexing="ij"))
        obj = t[:, 4].sigmoid()
        cols = [(t[:, 0].sigmoid() + gx) / w, (t[:, 1].sigmoid() + gy) / h,
                t[:, 2].exp() * anchors[ga, 0] / size, t[:, 3].exp() * anchors[ga, 1] / size, obj]
        out.append(torch.cat([torch.stack(cols, 1), obj[:, None] * t[:, 5:].sigmoid()], 1).numpy())
    return out


def _opencv_agrees(model, cfg: Path, weights: Path, size: int, seed: int = 0) -> float:
    """Run OpenCV's Darknet reader and ``model`` on the same input; assert every raw output
    agrees; return the largest difference."""
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (test dependency) missing")
    if not hasattr(cv2.dnn, "readNetFromDarknet"):
        pytest.skip(f"OpenCV {cv2.__version__} has no Darknet reader (it left in 5.0)")
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    g = torch.Generator().manual_seed(seed)
    # A smooth image with texture (not only noise), RGB in 0..1.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    x = torch.stack([xx, yy, (xx * yy) ** 0.5]) * 0.7 + 0.3 * torch.rand(3, size, size, generator=g)
    x = x[None].contiguous()
    net.setInput(x.numpy())
    theirs = net.forward(net.getUnconnectedOutLayersNames())
    with torch.no_grad():
        ours = _decoded(model, model(x), size)
    assert [o.shape for o in ours] == [t.shape for t in theirs]
    worst = 0.0
    for o, t in zip(ours, theirs):
        # boxes (fractions of the input) and objectness
        np.testing.assert_allclose(o[:, :5], t[:, :5], rtol=0, atol=1e-4)
        shown = t[:, 5:] > 0  # OpenCV zeroes class scores under its threshold (0.2)
        np.testing.assert_allclose(o[:, 5:][shown], t[:, 5:][shown], atol=1e-4)
        assert (o[:, 5:][~shown] <= 0.2 + 1e-4).all()
        worst = max(worst, float(np.abs(o[:, :5] - t[:, :5]).max()))
    return worst


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- official pair


@pytest.fixture(scope="module")
def official() -> tuple[Path, Path]:
    return official_tiny()


def test_official_tiny_cfg_is_read_as_yolov3_tiny(official):
    spec = read_cfg(official[0])
    assert (spec.name, spec.num_classes, spec.width, spec.height) == ("yolov3-tiny", 80, 416, 416)
    assert spec.anchors == [[(float(w), float(h)) for w, h in s] for s in OFFICIAL_TINY_ANCHORS]


def test_import_then_export_gives_back_the_official_files(official, tmp_path, capsys):
    cfg, weights = official
    ckpt = tmp_path / "tiny.pt"
    code, out, err = _main(["model", "import", "--cfg", str(cfg), "--weights", str(weights),
                            "--out", str(ckpt)], capsys)
    assert code == 0, err
    assert "yolov3-tiny, 80 classes" in out and "10x14 23x27 37x58" in out
    model, state = restore_model(ckpt)  # the checkpoint reader of detect and eval
    assert state["class_names"][:3] == ["person", "bicycle", "car"]
    assert model.anchor_wh.tolist() == [[list(map(float, a)) for a in s]
                                      for s in OFFICIAL_TINY_ANCHORS]
    code, out, err = _main(["model", "export", "--checkpoint", str(ckpt),
                            "--out", str(tmp_path / "exp" / "tiny.weights")], capsys)
    assert code == 0, err
    assert (tmp_path / "exp" / "tiny.weights").read_bytes() == weights.read_bytes()
    assert read_cfg(tmp_path / "exp" / "tiny.cfg") == read_cfg(cfg)
    assert (tmp_path / "exp" / "tiny.names").read_text().splitlines()[-1] == "toothbrush"
    # OpenCV reads the exported pair and computes what the imported model computes.
    _opencv_agrees(model, tmp_path / "exp" / "tiny.cfg", tmp_path / "exp" / "tiny.weights", 416)


def test_detect_takes_the_darknet_pair_directly(official, tmp_path, capsys):
    cfg, weights = official
    write_image(tmp_path / "img" / "a.jpg", 96, 80, seed=4)
    ckpt = tmp_path / "tiny.pt"
    assert _main(["model", "import", "--cfg", str(cfg), "--weights", str(weights),
                  "--out", str(ckpt)], capsys)[0] == 0
    common = [str(tmp_path / "img"), "--size", "128", "--conf", "0.001"]
    code, _, err = _main(["detect", "--cfg", str(cfg), "--weights", str(weights), *common,
                          "--out", str(tmp_path / "pair.json")], capsys)
    assert code == 0, err
    assert _main(["detect", "--checkpoint", str(ckpt), *common,
                  "--out", str(tmp_path / "ckpt.json")], capsys)[0] == 0
    pair = json.loads((tmp_path / "pair.json").read_text())
    assert pair and pair == json.loads((tmp_path / "ckpt.json").read_text())


# ----------------------------------------------------------------------------- any model out


@pytest.mark.parametrize("name,classes,size", [("yolov3-tiny", 3, 160), ("yolov3", 2, 128)])
def test_exported_pair_reads_in_opencv_and_back(name, classes, size, tmp_path):
    anchors = ([[(70, 60), (120, 150), (300, 280)], [(12, 18), (25, 30), (40, 50)]]
               if name == "yolov3-tiny" else None)
    model = randomised_model(name, classes, seed=5, anchors=anchors)
    cfg, weights = tmp_path / "m.cfg", tmp_path / "m.weights"
    cfg.write_text(cfg_text(model, size))
    save_darknet_weights(model, weights)
    spec = read_cfg(cfg)
    assert (spec.name, spec.num_classes, spec.width) == (name, classes, size)
    assert torch.tensor(spec.anchors).tolist() == model.anchor_wh.tolist()
    worst = _opencv_agrees(model, cfg, weights, size)
    print(f"{name} {classes} classes at {size}: largest difference to OpenCV {worst:.2e}")


# ----------------------------------------------------------------------------- refusals


def _tiny_cfg(tmp_path: Path) -> tuple[Path, list[str]]:
    lines = cfg_text(build_model("yolov3-tiny", 3), 416).splitlines()
    return tmp_path / "x.cfg", lines


def _line_of(lines: list[str], text: str, nth: int = 0) -> int:
    return [i for i, ln in enumerate(lines) if ln.strip() == text][nth]


@pytest.mark.parametrize("edit,expect", [
    (lambda ls: ls.insert(_line_of(ls, "[maxpool]"), "[dropout]\nprobability=.5\n"),
     r"line {L}: \[dropout\] is not supported"),
    (lambda ls: ls.insert(_line_of(ls, "filters=16") + 1, "groups=2"),
     r"line {L}: \[convolutional\]: groups=2 is not supported"),
    (lambda ls: ls.__setitem__(_line_of(ls, "filters=64"), "filters=48"),
     r"line {H}: \[convolutional\] \(layer 4\) is \[convolutional\] filters=48 .* but "
     r"yolov3-tiny .* has \[convolutional\] filters=64"),
    (lambda ls: ls.__setitem__(_line_of(ls, "activation=leaky"), "activation=mish"),
     r"line {L}: \[convolutional\]: activation=mish"),
    (lambda ls: ls.insert(_line_of(ls, "classes=3") + 1, "scale_x_y=1.05"),
     r"line {L}: \[yolo\]: scale_x_y=1.05 is not supported"),
    (lambda ls: ls.__setitem__(_line_of(ls, "mask = 3,4,5"), "mask = 3,4,9"),
     r"line {L}: \[yolo\]: mask \[3, 4, 9\] indexes past the 6 anchors"),
])
def test_unsupported_cfg_is_refused_naming_the_line(edit, expect, tmp_path):
    path, lines = _tiny_cfg(tmp_path)
    before = list(lines)
    edit(lines)
    text = "\n".join(lines)
    path.write_text(text)
    after = text.splitlines()
    changed = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
    header = max(i for i in range(changed + 1) if after[i].startswith("["))
    with pytest.raises(CfgError, match=expect.format(L=changed + 1, H=header + 1)):
        read_cfg(path)


def test_cfg_cut_short_names_what_is_missing(tmp_path):
    path, lines = _tiny_cfg(tmp_path)
    path.write_text("\n".join(lines[:_line_of(lines, "[route]")]))
    with pytest.raises(CfgError, match=r"layer 17\) is nothing \(the network ends\), but "
                                       r"yolov3-tiny .* has \[route\] layers 13"):
        read_cfg(path)


def test_import_refuses_a_bad_pair_in_one_line(tmp_path, capsys):
    model = randomised_model("yolov3-tiny", 3, seed=1)
    cfg, weights = tmp_path / "m.cfg", tmp_path / "m.weights"
    cfg.write_text(cfg_text(model, 416).replace("[maxpool]", "[maxpoool]", 1))
    save_darknet_weights(model, weights, cutoff=15)
    code, _, err = _main(["model", "import", "--cfg", str(cfg), "--weights", str(weights),
                          "--out", str(tmp_path / "m.pt")], capsys)
    assert code == 2 and "[maxpoool] is not supported" in err and "Traceback" not in err
    cfg.write_text(cfg_text(model, 416))
    code, _, err = _main(["model", "import", "--cfg", str(cfg), "--weights", str(weights),
                          "--out", str(tmp_path / "m.pt")], capsys)
    assert code == 2 and "too short" in err and "backbone-only" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m.pt").exists()


def test_eval_wants_a_checkpoint_or_a_pair(tmp_path):
    proc = subprocess.run(hvd_yolo_argv("eval", "--data", str(tmp_path), "--checkpoint", "a.pt",
                                        "--cfg", "b.cfg", "--weights", "b.weights"),
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("hvd-yolo eval: error: give --checkpoint, or --cfg and "
                                   "--weights (a Darknet pair)")


def test_eval_scores_a_pair_as_its_imported_checkpoint(tmp_path):
    from hvd_yolo.data.dataset import ShardDataset
    from tests.fixtures.datagen import synthetic_shards

    shards = synthetic_shards(tmp_path / "data", 6, seed=2, shards=1, size=64)
    names = ShardDataset(shards).class_names
    model = randomised_model("yolov3-tiny", len(names), seed=3)
    cfg, weights = tmp_path / "m.cfg", tmp_path / "m.weights"
    cfg.write_text(cfg_text(model, 64))
    save_darknet_weights(model, weights)
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    pair = ["--cfg", str(cfg), "--weights", str(weights), "--names", str(tmp_path / "classes.txt")]
    subprocess.run(hvd_yolo_argv("model", "import", *pair, "--out", str(tmp_path / "m.pt")),
                   check=True, capture_output=True, timeout=180)
    figures = []
    for how in (pair, ["--checkpoint", str(tmp_path / "m.pt")]):
        proc = subprocess.run(hvd_yolo_argv("eval", *how, "--data", str(shards), "--json", "-"),
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr
        figures.append(json.loads(proc.stdout))
    assert figures[0]["images"] == 6 and figures[0] == figures[1]
