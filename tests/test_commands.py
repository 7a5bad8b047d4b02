"""`hvd-yolo eval` and `hvd-yolo detect` on a real checkpoint, as users run them.

A short 1-rank training run makes the checkpoint; eval runs under mpirun on 1 and 2 ranks and
must give the same figures; detect runs on a folder of images and on the shards of the same
images and must find the same boxes, drawing one PNG per image.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.datagen import flip_image_bytes
from tests.mpi_harness import run_cli

pytestmark = pytest.mark.mpi
HVD_YOLO = str(Path(sys.executable).parent / "hvd-yolo")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hvd_yolo.data.synthetic import write_yolo_dataset
    from hvd_yolo.shards.convert import convert_dataset

    root = tmp_path_factory.mktemp("commands")
    for split, n, seed in (("train", 8, 11), ("val", 6, 12)):
        write_yolo_dataset(root / "src" / split, n, seed=seed, size_range=(96, 128))
        convert_dataset("yolo", root / "src" / split, root / split, shards=2)
    out = root / "run"
    run_cli(["train", "--set", f"data.train={root / 'train'}", "--set", "data.workers=0",
             "--set", "input.size=96", "--set", "optim.batch_size=2", "--set", "optim.epochs=1",
             "--set", "run.progress=false", "--set", "dist.threads=1",
             "--set", f"run.out_dir={out}"], np=1, timeout=300)
    return {"checkpoint": out / "checkpoints" / "last.pt", "val": root / "val",
            "images": root / "src" / "val" / "images", "root": root}


def test_eval_on_two_ranks_equals_one_rank(trained: dict[str, Path], tmp_path: Path) -> None:
    figures = {}
    for np in (1, 2):
        res = run_cli(["eval", "--checkpoint", str(trained["checkpoint"]), "--data",
                       str(trained["val"]), "--json", str(tmp_path / f"np{np}.json"),
                       "--results", str(tmp_path / f"dets{np}.json")], np=np, timeout=300)
        figures[np] = json.loads((tmp_path / f"np{np}.json").read_text())
        assert "mAP@0.5:0.95" in res.output
    assert figures[1]["images"] == figures[2]["images"] == 6
    for key in ("mAP", "mAP50", "detections"):
        assert figures[1][key] == pytest.approx(figures[2][key], abs=1e-9), key
    dets = json.loads((tmp_path / "dets2.json").read_text())
    assert len(dets) == figures[2]["detections"]
    assert dets and set(dets[0]) >= {"image_id", "category_id", "bbox", "score"}


def test_eval_on_a_corrupt_image_names_it_and_fails_on_every_rank(trained: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    val = tmp_path / "val"
    shutil.copytree(trained["val"], val)
    file, j, name = flip_image_bytes(val, 4)
    res = run_cli(["eval", "--checkpoint", str(trained["checkpoint"]), "--data", str(val)],
                  np=2, timeout=300, check=False)
    assert res.returncode == 1 and not res.timed_out, res.output
    assert "hvd-yolo eval: error: rank " in res.output
    assert f"{file} sample {j} ({name!r}): CRC32 mismatch" in res.output
    assert "Traceback" not in res.output


def detect(trained: dict[str, Path], source: Path, out: Path, draw: Path | None = None
           ) -> subprocess.CompletedProcess:
    argv = [HVD_YOLO, "detect", "--checkpoint", str(trained["checkpoint"]), str(source),
            "--out", str(out), "--conf", "0.001"]
    return subprocess.run(argv + (["--draw", str(draw)] if draw else []), capture_output=True,
                          text=True, timeout=300)


def test_detect_on_images_and_on_shards_finds_the_same_boxes(trained: dict[str, Path],
                                                             tmp_path: Path) -> None:
    res = detect(trained, trained["images"], tmp_path / "files.json", tmp_path / "drawn")
    assert res.returncode == 0, res.stdout + res.stderr
    from_files = json.loads((tmp_path / "files.json").read_text())
    assert from_files and all(len(d["bbox"]) == 4 and 0 <= d["score"] <= 1 for d in from_files)
    assert len(list((tmp_path / "drawn").glob("*.png"))) == 6
    res = detect(trained, trained["val"], tmp_path / "shards.json")
    assert res.returncode == 0, res.stdout + res.stderr
    from_shards = json.loads((tmp_path / "shards.json").read_text())

    def boxes(dets: list[dict]) -> list[tuple]:
        return sorted((d["category_id"], *(round(v, 2) for v in d["bbox"]), round(d["score"], 4))
                      for d in dets)

    assert boxes(from_files) == boxes(from_shards)  # same pixels, same detections


def test_detect_names_a_missing_input(trained: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    res = detect(trained, missing, tmp_path / "x.json")
    assert res.returncode != 0 and str(missing) in res.stdout + res.stderr
