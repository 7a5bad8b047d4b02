"""Darknet .weights I/O: header layouts, cfg layer order, round trip, exact consumption."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hvd_yolo.model.darknet_io import (
    darknet_float_count,
    load_darknet_weights,
    read_header,
    save_darknet_weights,
)
from hvd_yolo.model.yolov3 import build_model
from tests.fixtures.models import randomised_model

torch.set_num_threads(1)


def test_tiny_round_trip_gives_identical_outputs(tmp_path):
    src = randomised_model("yolov3-tiny", 3, seed=1)
    path = tmp_path / "tiny.weights"
    n = save_darknet_weights(src, path, seen=123_456_789_012)
    assert n == darknet_float_count(src) and path.stat().st_size == 20 + 4 * n
    dst = randomised_model("yolov3-tiny", 3, seed=2)
    header = load_darknet_weights(dst, path)
    assert (header.major, header.minor, header.revision, header.seen) == (0, 2, 0, 123_456_789_012)
    x = torch.rand(2, 3, 160, 224)
    with torch.no_grad():
        for a, b in zip(src(x), dst(x)):
            assert torch.equal(a, b)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_yolov3_round_trip(tmp_path):
    src = randomised_model("yolov3", 2, seed=3)
    path = tmp_path / "yolov3.weights"
    save_darknet_weights(src, path)
    dst = build_model("yolov3", 2)
    load_darknet_weights(dst, path)
    for k, v in src.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, dst.state_dict()[k]), k


def test_file_layout_follows_darknet_order(tmp_path):
    # Hand-written file: header (0.2.0, int64 seen) then for the first conv (16 filters, BN)
    # beta, gamma, mean, var, weights [16,3,3,3]; the values are their own float index.
    model = build_model("yolov3-tiny", 1)
    n = darknet_float_count(model)
    path = tmp_path / "ordered.weights"
    with open(path, "wb") as f:
        np.array([0, 2, 0], "<i4").tofile(f)
        np.array([7], "<i8").tofile(f)
        np.arange(n, dtype="<f4").tofile(f)
    load_darknet_weights(model, path)
    first = model.layers[0]
    assert first.bn.bias.tolist() == list(range(0, 16))
    assert first.bn.weight.tolist() == list(range(16, 32))
    assert first.bn.running_mean.tolist() == list(range(32, 48))
    assert first.bn.running_var.tolist() == list(range(48, 64))
    assert first.conv.weight.flatten().tolist() == list(range(64, 64 + 432))
    assert model.layers[2].bn.bias[0].item() == 64 + 432  # next conv (cfg layer 2) follows
    # Last conv of the file: the stride-16 detection conv (bias, then weights), no BN.
    head = model.layers[22]
    assert head.bn is None
    assert head.conv.weight.flatten()[-1].item() == n - 1
    assert head.conv.bias[0].item() == n - 1 - head.conv.weight.numel() - head.conv.bias.numel() + 1


def test_old_header_with_int32_seen(tmp_path):
    src = randomised_model("yolov3-tiny", 2, seed=4)
    path = tmp_path / "old.weights"
    n = save_darknet_weights(src, path, seen=4321, version=(0, 1, 0))
    assert path.stat().st_size == 16 + 4 * n
    h = read_header(path)
    assert (h.major, h.minor, h.seen, h.nbytes) == (0, 1, 4321, 16)
    dst = build_model("yolov3-tiny", 2)
    load_darknet_weights(dst, path)
    assert torch.equal(dst.layers[22].conv.weight, src.layers[22].conv.weight)


@pytest.mark.parametrize("delta", [-1, 1, -1000])
def test_file_not_consumed_exactly_is_an_error(tmp_path, delta):
    src = randomised_model("yolov3-tiny", 3, seed=5)
    good = tmp_path / "good.weights"
    n = save_darknet_weights(src, good)
    bad = tmp_path / "bad.weights"
    data = good.read_bytes()
    bad.write_bytes(data[:len(data) + 4 * delta] if delta < 0 else data + b"\0" * 4 * delta)
    what = "too short" if delta < 0 else "too long"
    with pytest.raises(ValueError, match=rf"expected {n} floats.*holds {n + delta} \({what}"):
        load_darknet_weights(build_model("yolov3-tiny", 3), bad)


def test_truncated_mid_float_and_header(tmp_path):
    p = tmp_path / "odd.weights"
    p.write_bytes(np.array([0, 2, 0], "<i4").tobytes() + np.array([0], "<i8").tobytes() + b"\0" * 6)
    with pytest.raises(ValueError, match="not a whole number of float32"):
        load_darknet_weights(build_model("yolov3-tiny", 3), p)
    p.write_bytes(b"\0" * 5)
    with pytest.raises(ValueError, match="too short for a Darknet .weights header"):
        load_darknet_weights(build_model("yolov3-tiny", 3), p)


def test_backbone_file_loads_into_model_with_other_classes(tmp_path):
    src = randomised_model("yolov3-tiny", 80, seed=6)
    path = tmp_path / "yolov3-tiny.conv.15"
    n = save_darknet_weights(src, path, cutoff=15)
    assert n == darknet_float_count(src, 15)
    dst = build_model("yolov3-tiny", 3)
    head_before = dst.layers[15].conv.weight.clone()
    load_darknet_weights(dst, path, backbone=True)
    for i in range(15):
        for a, b in zip(src.layers[i].state_dict().values(), dst.layers[i].state_dict().values()):
            assert torch.equal(a, b)
    assert torch.equal(dst.layers[15].conv.weight, head_before)  # the head is left alone
    # Loading it as a full file says what it is.
    with pytest.raises(ValueError, match="backbone-only file.*backbone=True"):
        load_darknet_weights(build_model("yolov3-tiny", 3), path)


def test_darknet53_backbone_cutoff_74(tmp_path):
    src = randomised_model("yolov3", 80, seed=7)
    path = tmp_path / "darknet53.conv.74"
    save_darknet_weights(src, path, cutoff=74)
    assert path.stat().st_size == 162_482_580  # the published darknet53.conv.74
    dst = build_model("yolov3", 20)
    load_darknet_weights(dst, path, backbone=True)
    assert torch.equal(dst.layers[73].conv.weight, src.layers[73].conv.weight)
    assert torch.equal(dst.layers[73].bn.running_var, src.layers[73].bn.running_var)


def test_wrong_class_count_is_diagnosed(tmp_path):
    path = tmp_path / "coco.weights"
    save_darknet_weights(randomised_model("yolov3-tiny", 80, seed=8), path)
    with pytest.raises(ValueError, match="matches yolov3-tiny with 80 classes"):
        load_darknet_weights(build_model("yolov3-tiny", 3), path)


# ----------------------------------------------------------------- model.weights in `hvd-yolo train`


# 8 small synthetic images (3 classes) in 2 shards.
SHARDS = {"images": 8, "seed": 5, "shards": 2, "size": 64}


def _train(shards, out, weights, np: int):
    """`hvd-yolo train` for one step at a negligible LR from ``weights`` (BN statistics frozen),
    so the checkpoint's weights are those loaded, to 1e-6."""
    from tests.fixtures.train_runs import train_args
    from tests.mpi_harness import VENV_BIN, run_argv, run_cli

    args = train_args(shards, out, "--set", f"model.weights={weights}", "--set",
                      "run.max_steps=1", "--set", "optim.lr=1e-12", "--set", "model.freeze_bn=true",
                      "--set", "optim.ema=false", size=64, epochs=1)
    if np == 1:
        return run_argv([str(VENV_BIN / "hvd-yolo"), *args], check=False, timeout=180)
    return run_cli(args, np=np, check=False, timeout=180)


def _trained(out):
    from hvd_yolo.checkpoint import restore_model

    model, _ = restore_model(out / "checkpoints" / "last.pt", use_ema=False)
    return model


def test_train_starts_from_80_class_weights_on_two_ranks(shards, tmp_path):
    src = randomised_model("yolov3-tiny", 80, seed=11)
    path = tmp_path / "coco80.weights"
    save_darknet_weights(src, path)
    res = _train(shards, tmp_path / "out", path, np=2)
    assert res.returncode == 0, res.output
    said = [ln for ln in res.output.splitlines() if "model.weights" in ln]
    assert len(said) == 1, res.output  # rank 0 says it once
    assert ("80-class file for a 3-class model: kept 11 convs (cfg layers 0, 2, 4, 6, 8, 10, "
            "12-14, 18, 21); re-initialised 2 convs (cfg layers 15, 22)") in said[0]
    model = _trained(tmp_path / "out")
    for i in (0, 13, 21):  # kept: the file's values
        torch.testing.assert_close(model.layers[i].conv.weight, src.layers[i].conv.weight,
                                   atol=1e-6, rtol=0)
        assert torch.equal(model.layers[i].bn.running_var, src.layers[i].bn.running_var)
    for i in (15, 22):  # re-initialised: 3-class heads with the objectness prior
        conv = model.layers[i].conv
        assert conv.out_channels == 3 * (5 + 3)
        prior = math.log(8 / (640 / model.layers[i + 1].stride) ** 2)
        torch.testing.assert_close(conv.bias.view(3, -1)[:, 4], torch.full((3,), prior),
                                   atol=1e-4, rtol=0)


def test_train_starts_from_a_backbone_only_file(shards, tmp_path):
    src = randomised_model("yolov3-tiny", 80, seed=12)
    path = tmp_path / "yolov3-tiny.conv.15"
    save_darknet_weights(src, path, cutoff=15)
    res = _train(shards, tmp_path / "out", path, np=1)
    assert res.returncode == 0, res.output
    assert ("backbone-only file: cfg layers 0, 2, 4, 6, 8, 10, 12-14 (9 convs); re-initialised "
            "4 convs (cfg layers 15, 18, 21-22)") in res.output
    model = _trained(tmp_path / "out")
    torch.testing.assert_close(model.layers[14].conv.weight, src.layers[14].conv.weight,
                               atol=1e-6, rtol=0)
    assert not torch.allclose(model.layers[18].conv.weight, src.layers[18].conv.weight)


def test_train_refuses_weights_of_another_layout_in_one_line(shards, tmp_path):
    path = tmp_path / "yolov3.weights"
    save_darknet_weights(randomised_model("yolov3", 3, seed=13), path)
    res = _train(shards, tmp_path / "out", path, np=1)
    errors = [ln for ln in res.output.splitlines() if ": error:" in ln]
    assert res.returncode == 2 and len(errors) == 1, res.output
    assert errors[0].startswith(f"hvd-yolo train: error: model.weights: {path}: expected ")
    assert "Traceback" not in res.output
