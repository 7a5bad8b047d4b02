"""Anchors: `model.anchors`, `hvd-yolo anchors` (k-means on 1 - IoU + refinement, recall
figures, the YAML fragment), the training start's recall warning and the resume check."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hvd_yolo import config
from hvd_yolo.checkpoint import compare_run, restore_model
from hvd_yolo.cli import main
from hvd_yolo.config import DEFAULT_ANCHORS
from hvd_yolo.data.dataset import ShardDataset
from hvd_yolo.data.transforms import letterbox
from hvd_yolo.launch import hvd_yolo_argv
from hvd_yolo.model import anchors as A
from hvd_yolo.model.loss import YoloLoss
from hvd_yolo.model.yolov3 import build_model
from tests.fixtures.datagen import synthetic_shards
from tests.fixtures.train_runs import train_args

TINY = [[list(map(float, p)) for p in s] for s in DEFAULT_ANCHORS["yolov3-tiny"]]


# 12 drawn-shapes images of mixed sizes and aspect ratios in 2 shards.
SHARDS = {"images": 12, "seed": 5, "shards": 2, "size_range": (96, 160)}


def hvd_yolo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``hvd-yolo ARGS`` in its own process (training: Horovod initialises there)."""
    return subprocess.run(hvd_yolo_argv(*args), capture_output=True, text=True, timeout=timeout)


def anchors_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``hvd-yolo anchors ARGS`` through the entry point, in this process (no start-up cost):
    ``(exit code, stdout, stderr)``."""
    capsys.readouterr()
    code = main(["anchors", *args])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ box statistics and figures
def test_box_sizes_are_the_letterboxed_training_boxes(shards: Path) -> None:
    ds = ShardDataset(shards)
    expected = []
    for i in range(len(ds)):  # what training's letterbox makes of each image's boxes
        s = ds[i]
        _, boxes, _ = letterbox(s["image"], s["boxes"], 128)
        expected.append((boxes[:, 2:] - boxes[:, :2]).double().numpy())
    got = A.box_sizes(shards, 128)
    assert got.shape == (sum(len(e) for e in expected), 2) and len(got) > 12
    np.testing.assert_allclose(got, np.concatenate(expected), rtol=1e-5)
    np.testing.assert_allclose(A.box_sizes(shards, 256), 2 * got, rtol=1e-6)


def test_recall_figures_by_hand() -> None:
    wh = np.array([[10.0, 10.0], [30.0, 30.0], [45.0, 9.0], [1000.0, 1000.0]])
    stats = A.recall_stats(wh, [[(10, 10)], [(40, 40)]])
    # 10x10: 10x10 only (40x40 is 4x: not within); 30x30: both; 45x9: 10x10 is 4.5x wide,
    # 40x40 4.4x high -> none; 1000x1000: none.
    assert stats["bpr"] == pytest.approx(2 / 4)
    assert stats["aat"] == pytest.approx((1 + 2 + 0 + 0) / 4)
    ious = [1.0, (30 * 30) / (40 * 40), (40 * 9) / (45 * 9 + 40 * 40 - 40 * 9), 1600 / 1e6]
    assert stats["mean_best_iou"] == pytest.approx(np.mean(ious))


def test_the_recall_threshold_is_the_losss() -> None:
    assert YoloLoss(build_model("yolov3-tiny", 2)).anchor_t == A.THRESHOLD


def test_kmeans_on_iou_finds_planted_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[12, 16], [30, 60], [64, 40], [120, 100], [200, 260], [350, 300]], float)
    wh = np.concatenate([c * rng.uniform(0.93, 1.07, (300, 2)) for c in centres])
    got = A.kmeans_iou(wh, 6, np.random.default_rng(1))
    got = got[np.argsort(got.prod(1))]
    np.testing.assert_allclose(got, centres, rtol=0.04)


def test_compute_anchors_is_seeded_ordered_and_beats_a_poor_set() -> None:
    rng = np.random.default_rng(3)  # long thin boxes: the official tiny anchors miss many
    wh = np.stack([rng.uniform(4, 40, 3000), rng.uniform(60, 300, 3000)], 1)
    new = A.compute_anchors(wh, 2, 3, seed=7, generations=100)
    assert new == A.compute_anchors(wh, 2, 3, seed=7, generations=100)  # deterministic
    assert len(new) == 2 and all(len(s) == 3 for s in new)
    areas = [[w * h for w, h in s] for s in new]  # as Darknet's cfgs: the large stride's
    assert min(areas[0]) >= max(areas[1])  # (largest) anchors first, each scale's ascending
    assert all(a == sorted(a) for a in areas)
    assert all(float(v).is_integer() and v >= 1 for s in new for p in s for v in p)
    old, now = A.recall_stats(wh, TINY), A.recall_stats(wh, new)
    assert old["bpr"] < 0.9 and now["bpr"] > 0.99 and now["aat"] > old["aat"]


def test_refinement_never_lowers_fitness() -> None:
    rng = np.random.default_rng(4)
    wh = rng.lognormal(3.5, 0.8, (2000, 2))
    start = A.kmeans_iou(wh, 6, np.random.default_rng(0))
    refined = A.evolve(wh, start, np.random.default_rng(0), generations=60)
    assert A.fitness(wh, refined) >= A.fitness(wh, start)
    assert not np.array_equal(refined, start)  # 60 generations improved it at least once


def test_too_few_boxes_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="5 boxes of at least 2 px, fewer than the 9 anchors"):
        A.compute_anchors(np.full((5, 2), 20.0), 3, 3)


# ------------------------------------------------------------------ the config key
def test_config_anchors_default_validated_and_named() -> None:
    cfg = config.load(None, ["data.train=x"])
    assert cfg.model.anchors == TINY  # empty: the official default, recorded explicitly
    cfg = config.load(None, ["data.train=x", "model.name=yolov3"])
    assert cfg.model.anchors == [[list(map(float, p)) for p in s] for s in DEFAULT_ANCHORS["yolov3"]]
    mine = "[[[50, 60], [70, 80]], [[5, 6], [7, 8.5]]]"
    cfg = config.load(None, ["data.train=x", f"model.anchors={mine}"])
    assert cfg.model.anchors == [[[50.0, 60.0], [70.0, 80.0]], [[5.0, 6.0], [7.0, 8.5]]]
    bad = {"[[[50, 60]], [[5, 6]], [[1, 2]]]": "3 scales given, the model has 2 outputs",
           "[[[50, 60], [1, 1]], [[5, 6]]]": r"same number of anchors, got \[2, 1\]",
           "[[[50, -60]], [[5, 6]]]": "positive pixels",
           "[[50, 60], [5, 6]]": r"a list of \[w, h\] pairs",
           "7": r"a list of \[w, h\] pairs"}
    for value, message in bad.items():
        with pytest.raises(config.ConfigError, match=r"^model\.anchors=.*: .*" + message):
            config.load(None, ["data.train=x", f"model.anchors={value}"])


def test_a_checkpoint_from_before_model_anchors_is_compared_by_its_weights() -> None:
    # Such a checkpoint has no model.anchors in its config, and its weights hold the anchors
    # under "anchors": yolov3-tiny's were then (23,27) (37,58) (81,82) at stride 16.
    weights = build_model("yolov3-tiny", 2).state_dict()
    weights["anchors"] = torch.tensor([TINY[0], [[23, 27], [37, 58], [81, 82]]])
    del weights["anchor_wh"]
    saved = config.load(None, ["data.train=x"]).to_dict()
    del saved["model"]["anchors"]
    state = {"model": weights, "config": saved}
    now = config.load(None, ["data.train=x"]).to_dict()
    refusals, _ = compare_run(state, now, 1, [], 0, 0)
    assert len(refusals) == 1 and refusals[0].startswith(
        "model.anchors is [[[81.0, 82.0], [135.0, 169.0], [344.0, 319.0]], [[23.0, 27.0]")
    same = config.load(None, ["data.train=x", "model.anchors=[[[81, 82], [135, 169], [344, 319]], "
                                              "[[23, 27], [37, 58], [81, 82]]]"]).to_dict()
    assert compare_run(state, same, 1, [], 0, 0)[0] == []


# ------------------------------------------------------------------ hvd-yolo anchors, train
def test_anchors_command_fragment_trains_and_resume_refuses_other_anchors(
        shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    frag, figures_json = tmp_path / "anchors.yaml", tmp_path / "anchors.json"
    code, out, err = anchors_cli(capsys, str(shards), "--model", "yolov3-tiny", "--size", "128",
                                 "--generations", "100", "--out", str(frag), "--json",
                                 str(figures_json))
    assert code == 0, err
    figures = json.loads(figures_json.read_text())
    assert figures["current"]["anchors"] == TINY
    assert figures["new"]["bpr"] >= figures["current"]["bpr"] and figures["new"]["bpr"] > 0.98
    for name in ("current", "new"):  # printed: BPR and AAT of both
        line = next(ln for ln in out.splitlines() if ln.startswith(name))
        assert f"{figures[name]['bpr']:.4f}" in line and f"{figures[name]['aat']:.2f}" in line
    new = figures["new"]["anchors"]
    assert yaml.safe_load(frag.read_text()) == {"model": {"name": "yolov3-tiny", "anchors": new}}
    code, out, _ = anchors_cli(capsys, str(shards), "--size", "128", "--generations", "100",
                               "--out", str(frag), "--json", "-")
    assert code == 0 and json.loads(out)["new"]["anchors"] == new  # seeded; own file replaced

    # The fragment is a training config: the run uses its anchors and its checkpoint keeps them.
    out = tmp_path / "run"
    run = hvd_yolo(*train_args(shards, out, "--config", str(frag), "--set", "run.max_steps=1",
                               "--set", "optim.ema=false", epochs=1), timeout=300)
    assert run.returncode == 0, run.stderr
    assert "best-possible recall" not in run.stderr  # the data's own anchors: no warning
    assert json.loads((out / "config.json").read_text())["model"]["anchors"] == new
    model, state = restore_model(out / "checkpoints" / "last.pt")  # as eval and detect load it
    assert model.anchors == [[tuple(p) for p in s] for s in new]
    assert state["config"]["model"]["anchors"] == new

    # Resuming with other anchors (ones far from the data's boxes) is refused by name, after
    # rank 0 warned at start that they cannot reach this data's boxes.
    huge = "[[[900, 900], [950, 950], [999, 999]], [[600, 600], [700, 700], [800, 800]]]"
    res = hvd_yolo(*train_args(shards, out, "--config", str(frag), "--set", "run.max_steps=2",
                               "--set", f"model.anchors={huge}", epochs=1), "--resume", "auto",
                   timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert "best-possible recall on" in res.stderr and "is 0.0000 (below 0.98)" in res.stderr
    assert f"hvd-yolo anchors {shards} --model yolov3-tiny --size 128" in res.stderr
    error = [ln for ln in res.stderr.splitlines() if "hvd-yolo train: error:" in ln]
    assert error and f"model.anchors is {new!r} in the checkpoint but [[[900.0, 900.0]" in error[0]


def test_anchors_command_errors_are_one_line(shards: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("keep me\n")
    few = synthetic_shards(tmp_path / "few", 1, seed=1, shards=1, size_range=(96, 96))
    cases = [
        ((str(tmp_path / "nope"),), 2, "no such directory"),
        ((str(shards), "--size", "100"), 2, "--size 100: must be a positive multiple of 32"),
        ((str(shards), "--out", str(mine)), 2, "exists and was not written by hvd-yolo anchors"),
        ((str(shards), "--anchors", "[[[1, 2]]]"), 2, "1 scales given, the model has 2 outputs"),
        ((str(few), "--model", "yolov3"), 1, "fewer than the 9 anchors to fit at input size 416"),
        ((str(tmp_path),), 1, "manifest.json not found"),
    ]
    for args, expected, message in cases:
        code, _, err = anchors_cli(capsys, *args)
        lines = err.strip().splitlines()
        assert code == expected and len(lines) == 1, (args, err)
        assert lines[0].startswith("hvd-yolo anchors: error: ") and message in lines[0], lines
    assert mine.read_text() == "keep me\n"
