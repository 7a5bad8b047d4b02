"""Hostile and edited datasets: every reader (`shards verify`, `shards info`, `train`, `eval`,
`detect`) refuses a manifest whose shard names leave the dataset folder, that lists a shard
twice, or whose class names and counts were edited; `convert` never reads a COCO image outside
`--images`; a YAML config that gives a key twice is refused, naming both lines.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from hvd_yolo import checkpoint, cli
from hvd_yolo.config import Config
from hvd_yolo.model.yolov3 import build_model
from hvd_yolo.shards.format import manifest_digest
from tests.conftest import ShardSets
from tests.fixtures.datagen import coco
from tests.fixtures.train_runs import train_args
from tests.mpi_harness import VENV_BIN, run_argv


@pytest.fixture(scope="module")
def good(shard_sets: ShardSets) -> Path:
    return shard_sets.get(6, seed=4, shards=3, size_range=(64, 96))


@pytest.fixture(scope="module")
def ckpt(good: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sealed (untrained) yolov3-tiny checkpoint with the dataset's classes."""
    torch.manual_seed(0)
    names = json.loads((good / "manifest.json").read_text())["class_names"]
    cfg = Config()
    cfg.input.size = 64
    cfg.model.name = "yolov3-tiny"
    cfg.data.train = str(good)
    state = {"model": build_model("yolov3-tiny", len(names)).state_dict(), "ema": None,
             "config": cfg.to_dict(), "class_names": names,
             "category_ids": list(range(len(names))), "model_name": "yolov3-tiny", "step": 1}
    return checkpoint.save(state, tmp_path_factory.mktemp("ckpt"), 1, 1)


def edited(good: Path, tmp_path: Path, edit: Any, reseal: bool = True) -> Path:
    """A copy of ``good`` whose manifest ``edit`` changed (resealed: what a careful forger does)."""
    root = tmp_path / "shards"
    shutil.copytree(good, root)
    manifest = json.loads((root / "manifest.json").read_text())
    edit(root, manifest)
    if reseal:
        manifest["manifest_sha256"] = manifest_digest(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def shards_cmd(capsys: Any, *args: str) -> tuple[int, str]:
    rc = cli.main(["shards", *args])
    out = capsys.readouterr()
    return rc, out.out + out.err


def hvd_yolo(*args: str) -> tuple[int, str]:
    res = run_argv([str(VENV_BIN / "hvd-yolo"), *args], timeout=300, check=False)
    return res.returncode, res.output


def assert_one_error(rc: int, out: str, command: str, why: str) -> None:
    assert rc != 0 and "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if f"hvd-yolo {command}: error:" in ln]
    assert len(errors) == 1 and why in errors[0], out


def every_reader_refuses(root: Path, ckpt: Path, capsys: Any, tmp_path: Path, why: str) -> None:
    for action in ("verify", "info"):
        rc, out = shards_cmd(capsys, action, str(root))
        assert_one_error(rc, out, f"shards {action}", why)
    rc = cli.main(["detect", "--checkpoint", str(ckpt), str(root), "--out",
                   str(tmp_path / "dets.json")])
    out = capsys.readouterr()
    assert_one_error(rc, out.out + out.err, "detect", why)
    assert not (tmp_path / "dets.json").exists()
    rc, out = hvd_yolo("eval", "--checkpoint", str(ckpt), "--data", str(root))
    assert_one_error(rc, out, "eval", why)
    rc, out = hvd_yolo(*train_args(root, tmp_path / "run", "--set", "model.name=yolov3-tiny",
                                   size=64, epochs=1))
    assert_one_error(rc, out, "train", why)


# ------------------------------------------------------------------ shard names (#2)
def test_shard_names_outside_the_dataset_are_refused_by_every_reader(
        good: Path, ckpt: Path, tmp_path: Path, capsys: Any) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(good / "shard-00000.h5", outside / "evil.h5")

    def escape(root: Path, m: dict) -> None:
        m["shards"][0]["file"] = "../../outside/evil.h5"
        (root / "shard-00000.h5").unlink()

    root = edited(good, tmp_path / "rel", escape)
    every_reader_refuses(root, ckpt, capsys, tmp_path,
                         "shard entry 0 names '../../outside/evil.h5': shard files must be "
                         "plain file names inside")
    root = edited(good, tmp_path / "abs", lambda r, m: m["shards"][1].update(
        file=str(outside / "evil.h5")))
    for action in ("verify", "info"):
        rc, out = shards_cmd(capsys, action, str(root))
        assert_one_error(rc, out, f"shards {action}", f"shard entry 1 names "
                         f"'{outside / 'evil.h5'}': shard files must be plain file names")


# ------------------------------------------------------------------ a shard listed twice (#10)
def test_a_shard_listed_twice_is_refused_by_every_reader(good: Path, ckpt: Path, tmp_path: Path,
                                                         capsys: Any) -> None:
    def twice(root: Path, m: dict) -> None:
        m["shards"].append(dict(m["shards"][0]))
        m["num_samples"] += m["shards"][0]["count"]
        m["num_boxes"] += m["shards"][0]["boxes"]
        m["num_shards"] += 1

    root = edited(good, tmp_path / "twice", twice)
    every_reader_refuses(root, ckpt, capsys, tmp_path,
                         "lists shard-00000.h5 twice (shard entries 0 and 3)")
    # the same shard under a second name: its attributes and image ids give it away
    def copied(root: Path, m: dict) -> None:
        shutil.copy(root / "shard-00000.h5", root / "shard-00003.h5")
        twice(root, m)
        m["shards"][3]["file"] = "shard-00003.h5"

    root = edited(good, tmp_path / "copied", copied)
    rc, out = shards_cmd(capsys, "info", str(root))
    assert_one_error(rc, out, "shards info", "shard-00003.h5: shard 0 by its attributes but "
                     "entry 3 in manifest.json: a shard listed twice")


# ------------------------------------------------------------------ edited manifests (#11)
def test_edited_class_names_and_counts_are_named(good: Path, tmp_path: Path, capsys: Any) -> None:
    def swap(root: Path, m: dict) -> None:
        m["class_names"] = m["class_names"][::-1]

    root = edited(good, tmp_path / "swap", swap, reseal=False)
    for action in ("verify", "info"):
        rc, out = shards_cmd(capsys, action, str(root))
        assert_one_error(rc, out, f"shards {action}", "manifest.json: its contents do not match "
                         "its manifest_sha256 (the class names, counts or shard list were edited)")
    root = edited(good, tmp_path / "count", lambda r, m: m.update(num_samples=1000),
                  reseal=False)
    rc, out = shards_cmd(capsys, "info", str(root))
    assert_one_error(rc, out, "shards info", "do not match its manifest_sha256")
    # resealed, the count still disagrees with the shard entries: named
    root = edited(good, tmp_path / "count2", lambda r, m: m.update(num_samples=1000))
    rc, out = shards_cmd(capsys, "info", str(root))
    assert_one_error(rc, out, "shards info", "num_samples is 1000 but its shard entries add up "
                     "to 6")
    # an unsealed manifest: verify says so; info counts from the shards, never from the manifest
    root = edited(good, tmp_path / "unsealed", lambda r, m: m.pop("manifest_sha256"),
                  reseal=False)
    rc, out = shards_cmd(capsys, "verify", str(root))
    assert_one_error(rc, out, "shards verify", "no manifest_sha256 (written before manifests "
                     "were sealed, or edited)")
    with pytest.warns(UserWarning, match="no manifest_sha256"):
        rc, out = shards_cmd(capsys, "info", str(root), "--json", "-")
    assert rc == 0 and json.loads(out)["num_samples"] == 6


def test_verify_names_an_unlisted_shard_file(good: Path, tmp_path: Path, capsys: Any) -> None:
    root = edited(good, tmp_path, lambda r, m: shutil.copy(r / "shard-00001.h5",
                                                          r / "shard-00004.h5"))
    rc, out = shards_cmd(capsys, "verify", str(root))
    assert_one_error(rc, out, "shards verify", "shard-00004.h5: in ")
    assert "not listed in manifest.json" in out
    (root / "shard-00004.h5").unlink()
    assert shards_cmd(capsys, "verify", str(root))[0] == 0


# ------------------------------------------------------------------ COCO file_name (#3)
def test_coco_file_names_outside_images_are_skipped_and_reported(tmp_path: Path,
                                                                 capsys: Any) -> None:
    src = coco(tmp_path)
    secret = tmp_path / "secret"
    secret.mkdir()
    ann = src / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    n = len(data["images"])
    shutil.copy(src / "val2017" / data["images"][0]["file_name"], secret / "private.jpg")
    shutil.copy(src / "val2017" / data["images"][1]["file_name"], secret / "abs.jpg")
    data["images"][0]["file_name"] = "../../secret/private.jpg"
    data["images"][1]["file_name"] = str(secret / "abs.jpg")
    ann.write_text(json.dumps(data))
    out = tmp_path / "out"
    rc = cli.main(["convert", "coco", str(src), str(out), "--images", str(src / "val2017"), "-q"])
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads((out / "manifest.json").read_text())["report"]
    assert (report["inputs"], report["written"], report["skipped"]) == (n, n - 2, 2)
    reasons = {i["item"]: i["reason"] for i in report["skipped_items"]}
    assert "leads outside --images ('..'): refused" in reasons["../../secret/private.jpg"]
    assert "is an absolute path, outside --images: refused (--allow-absolute-paths" in \
        reasons[str(secret / "abs.jpg")]
    assert f"inputs {n} = written {n - 2} + skipped 2" in text
    names = [s for e in json.loads((out / "manifest.json").read_text())["shards"]
             for s in __import__("h5py").File(out / e["file"], "r")["images/name"].asstr()[:]]
    assert not any("secret" in s for s in names)
    # absolute paths on request; '..' never
    rc = cli.main(["convert", "coco", str(src), str(tmp_path / "abs"), "--images",
                   str(src / "val2017"), "--allow-absolute-paths", "-q"])
    assert rc == 0
    report = json.loads((tmp_path / "abs" / "manifest.json").read_text())["report"]
    assert (report["written"], report["skipped"]) == (n - 1, 1)


# ------------------------------------------------------------------ YAML (#12)
def test_duplicate_yaml_keys_are_refused_naming_both_lines(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.02\n  momentum: 0.9\n  lr: 0.5\n")
    assert cli.main(["train", "--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"hvd-yolo train: error: {path}: key 'lr' is given twice, at line 2 "
                           "and line 4: keep one")
    path.write_text("optim:\n  lr: 0.02\ndata:\n  workers: 1\noptim:\n  epochs: 3\n")
    assert cli.main(["train", "--config", str(path), "--print-config"]) == 2
    assert "key 'optim' is given twice, at line 1 and line 5" in capsys.readouterr().err
    # merges may still override what they bring in
    path.write_text("optim:\n  <<: {lr: 0.02, momentum: 0.8}\n  lr: 0.5\n")
    assert cli.main(["train", "--config", str(path), "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "lr: 0.5" in text and "momentum: 0.8" in text
