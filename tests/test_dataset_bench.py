"""`hvd-yolo bench data`: shard vs folder-of-files read+decode images/s, table and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hvd_yolo import cli


def test_bench_data_synthetic_then_existing_shards(tmp_path: Path, capsys: Any) -> None:
    work = tmp_path / "work"
    rc = cli.main(["bench", "data", "--images", "12", "--size", "48", "--workers", "0,1",
                   "--passes", "1", "--rounds", "3", "--batch-size", "4", "--workdir", str(work),
                   "--json", str(tmp_path / "bench.json")])
    assert rc == 0
    table = capsys.readouterr().out
    out = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["reader"], r["workers"]) for r in out["results"]] == [
        ("shards", 0), ("shards-nocrc", 0), ("files", 0), ("shards", 1), ("shards-nocrc", 1),
        ("files", 1)]
    for r in out["results"]:
        assert r["images"] == 12 and r["images_per_s"] > 0 and r["mb_per_s"] > 0
        rounds = r["rounds_images_per_s"]  # the median of 3 alternating rounds
        assert len(rounds) == 3 and r["images_per_s"] == sorted(rounds)[1]
    assert out["images"] == 12 and out["env"]["torch"]
    assert "images/s" in table and "vs files" in table and "bytes only" in table
    assert [r["reader"] for r in out["bytes_only"]] == ["shards", "shards-nocrc", "files"]
    assert all(r["images"] == 12 * 5 and r["images_per_s"] > 0 for r in out["bytes_only"])
    assert len([ln for ln in table.splitlines() if " shards" in ln or " files " in ln]) == 6
    assert "without the CRC32 check" in table

    # an existing shard directory, a subset of its images
    rc = cli.main(["bench", "data", "--shards", str(work / "shards"), "--workers", "0",
                   "--passes", "1", "--rounds", "1", "--limit", "5", "--json", str(tmp_path / "b2.json")])
    assert rc == 0
    assert [r["images"] for r in json.loads((tmp_path / "b2.json").read_text())["results"]] == [
        5, 5, 5]

    # the originals are gone: a clear message instead of a crash
    for p in (work / "yolo" / "images").iterdir():
        p.unlink()
    capsys.readouterr()
    rc = cli.main(["bench", "data", "--shards", str(work / "shards"), "--workers", "0"])
    err = capsys.readouterr().err  # a usage mistake: argparse style, exit 2
    assert rc == 2 and "hvd-yolo bench data: error: " in err and "--image-root DIR" in err
