"""`hvd-yolo export`: the ONNX file run by onnxruntime and the TorchScript file by torch.jit
give the PyTorch model's raw outputs (within 1e-4) and, after post-processing, its detections;
on drawn images and on real photos (ultralytics' bus.jpg and zidane.jpg)."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hvd_yolo import checkpoint, cli
from hvd_yolo.data.synthetic import CLASS_NAMES, make_samples
from hvd_yolo.data.transforms import letterbox
from hvd_yolo.model.postprocess import postprocess
from hvd_yolo.model.yolov3 import build_model

ort = pytest.importorskip("onnxruntime")
HVD_YOLO = Path(sys.executable).parent / "hvd-yolo"
ASSETS = Path.home() / ".cache" / "hvd_yolo" / "ultralytics-assets"
CONF, IOU = 0.05, 0.45
torch.set_num_threads(1)


def real_photos() -> list[Path]:
    """bus.jpg and zidane.jpg from the ultralytics wheel (``pip download --no-deps``), cached."""
    want = [ASSETS / "bus.jpg", ASSETS / "zidane.jpg"]
    if all(p.exists() for p in want):
        return want
    ASSETS.mkdir(parents=True, exist_ok=True)
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                          "ultralytics", "-d", str(ASSETS)], capture_output=True, text=True,
                         timeout=300, check=False)
    wheels = sorted(ASSETS.glob("ultralytics-*.whl"))
    if got.returncode or not wheels:
        pytest.skip(f"real photos unavailable: `pip download ultralytics` failed "
                    f"({(got.stderr or got.stdout).strip().splitlines()[-1:]})")
    with zipfile.ZipFile(wheels[-1]) as z:
        for p in want:
            p.write_bytes(z.read(f"ultralytics/assets/{p.name}"))
    for w in wheels:
        w.unlink()
    return want


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A sealed checkpoint as `hvd-yolo train` writes it, its model seeded and its
    objectness biases raised so that many boxes pass the threshold (NMS has work to do)."""
    torch.manual_seed(7)
    model = build_model("yolov3-tiny", len(CLASS_NAMES)).eval()
    with torch.no_grad():
        for layer in model.layers:
            if hasattr(layer, "conv") and layer.bn is None:  # the detection convs
                layer.conv.weight.mul_(30)  # scores spread over (0, 1), few near-ties
                layer.conv.bias.view(3, -1)[:, 4] = 1.0
    ckpt_dir = tmp_path_factory.mktemp("ckpt")
    state = {"model": model.state_dict(), "ema": None, "class_names": list(CLASS_NAMES),
             "model_name": "yolov3-tiny", "config": {"input": {"size": 256}}, "epoch": 1,
             "step": 1}
    return checkpoint.save(state, ckpt_dir, 1, 1), model


def images() -> list[tuple[str, torch.Tensor]]:
    """Drawn shapes and, when available, the two real photos, letterboxed to 256x320."""
    out = []
    for i, s in enumerate(make_samples(2, seed=4, size=None)):
        out.append((f"drawn{i}", torch.from_numpy(s.image.copy()).permute(2, 0, 1)))
    try:
        from PIL import Image

        for p in real_photos():
            out.append((p.name, torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy())
                        .permute(2, 0, 1)))
    except pytest.skip.Exception as e:
        print(f"real photos skipped: {e}")
    return [(n, letterbox(img, None, (256, 320))[0].float() / 255) for n, img in out]


def hvd_yolo(capsys, *args: str) -> tuple[int, str, str]:
    """``hvd-yolo ARGS`` in this process (the console script's ``main``): torch is loaded once."""
    capsys.readouterr()
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def export(capsys, ckpt: Path, out: Path, *args: str) -> str:
    code, stdout, err = hvd_yolo(capsys, "export", str(ckpt), "--out", str(out), *args)
    assert code == 0, err
    assert out.exists() and f"wrote {out}" in stdout.strip().splitlines()[-1]
    return stdout


def run_file(path: Path, x: torch.Tensor) -> list[torch.Tensor]:
    if path.suffix == ".onnx":
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [torch.from_numpy(o) for o in sess.run(None, {"images": x.numpy()})]
    with torch.no_grad():
        return list(torch.jit.load(str(path))(x))


def assert_same_detections(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """One to one: each PyTorch detection has an exported one of its class with the same box
    (to 1e-3 px) and score (to 1e-5)."""
    assert got.shape == want.shape, f"{what}: {len(got)} detections, PyTorch {len(want)}"
    if not len(want):
        return
    dist = (want[:, None, :4] - got[None, :, :4]).abs().amax(-1)
    dist[want[:, None, 5] != got[None, :, 5]] = math.inf
    nearest = dist.argmin(1)
    assert len(set(nearest.tolist())) == len(want), f"{what}: not one to one"
    assert float(dist.min(1).values.max()) <= 1e-3, what
    assert float((got[nearest, 4] - want[:, 4]).abs().max()) <= 1e-5, what


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_raw_export_matches_pytorch(trained, tmp_path, fmt, capsys):
    """Dynamic batch and size: exported at one shape, run at another (a batch of 4 at 256x320)."""
    ckpt, model = trained
    path = tmp_path / f"yolo.{fmt}"
    export(capsys, ckpt, path, "--format", fmt, "--dynamic")
    named = images()
    x = torch.stack([img for _, img in named])
    with torch.no_grad():
        want = model(x)
    got = run_file(path, x)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert float((g - w).abs().max()) <= 1e-4
    ref = postprocess(want, model, CONF, IOU, max_det=1000)
    out = postprocess(got, model, CONF, IOU, max_det=1000)
    assert sum(len(r) for r in ref) > 4 * len(named)  # enough boxes for NMS to matter
    for (name, _), g, w in zip(named, out, ref):
        assert_same_detections(g, w, f"{fmt} {name}")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_with_nms_gives_the_detections_of_postprocess(trained, tmp_path, fmt, capsys):
    ckpt, model = trained
    path = tmp_path / f"nms.{fmt}"
    export(capsys, ckpt, path, "--format", fmt, "--size", "256x320", "--nms", "--conf", str(CONF),
           "--iou", str(IOU))
    for name, img in images():
        x = img[None]
        with torch.no_grad():
            want = postprocess(model(x), model, CONF, IOU, max_det=10_000)[0]
        (det,) = run_file(path, x)
        assert det.shape[1] == 7 and (det[:, 0] == 0).all()
        assert len(want) > 3, name
        assert_same_detections(det[:, 1:], want, f"{fmt} {name}")


def test_decoded_export_and_fixed_size(trained, tmp_path, capsys):
    """--decode: boxes and scores equal the PyTorch decoding (ONNX, fixed size 256)."""
    from hvd_yolo.export import ExportModel

    ckpt, model = trained
    path = tmp_path / "dec.onnx"
    export(capsys, ckpt, path, "--format", "onnx", "--decode")  # the checkpoint's training size: 256
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [tuple(i.shape) for i in sess.get_inputs()] == [(1, 3, 256, 256)]
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        boxes, scores = ExportModel(model, decode=True)(x)
    got = run_file(path, x)
    assert float((got[0] - boxes).abs().max()) <= 1e-3  # pixels
    assert float((got[1] - scores).abs().max()) <= 1e-5
    assert math.isclose(float(boxes.max()), 256, abs_tol=1e-3) or float(boxes.max()) < 256


def test_export_refuses_bad_input_in_one_line(trained, tmp_path, capsys):
    ckpt, _ = trained
    cases = [(["--format", "onnx", "--size", "100"], "--size 100: expected S or HxW"),
             (["--format", "onnx", "--conf", "1.5"], "--conf must be in [0, 1)"),
             (["--format", "torchscript", "--size", "256", "--dynamic"], "not allowed with")]
    for args, msg in cases:
        with pytest.raises(SystemExit) if "not allowed" in msg else _nothing():
            code, _, err = hvd_yolo(capsys, "export", str(ckpt), "--out", str(tmp_path / "x"),
                                    *args)
        if "not allowed" in msg:  # argparse's own error
            err = capsys.readouterr().err
            code = 2
        assert code == 2 and msg in err and "Traceback" not in err, (args, err)
    res = subprocess.run([str(HVD_YOLO), "export", str(tmp_path / "missing.pt"), "--format",
                          "onnx", "--out", str(tmp_path / "x.onnx")], capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 2 and "missing.pt" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.onnx").exists()


@contextlib.contextmanager
def _nothing():
    yield
