"""Every command reports a mistake the same way: `hvd-yolo CMD: error: ...`, exit 2, no traceback.

Each case is a bad input found before any work, run as users run it (the installed script).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hvd_yolo.launch import hvd_yolo_argv

# command -> (argv with {tmp} for the test's folder, the error's expected start)
BAD_INPUTS: dict[str, tuple[list[str], str]] = {
    "env": (["env", "--no-such-option"], "hvd-yolo env: error: unrecognized arguments"),
    "convert": (["convert", "yolo", "{tmp}/missing", "{tmp}/out"],
                "hvd-yolo convert: error: {tmp}/missing: no such file or directory"),
    "shards": (["shards", "verify", "{tmp}/missing"],
               "hvd-yolo shards verify: error: {tmp}/missing: no such directory"),
    "model": (["model", "info", "--size", "100"], "hvd-yolo model info: error: "),
    "train": (["train", "--config", "{tmp}/bad.yaml"],
              "hvd-yolo train: error: {tmp}/bad.yaml: not valid YAML"),
    "eval": (["eval", "--checkpoint", "{tmp}/missing.pt", "--data", "{tmp}"],
             "hvd-yolo eval: error: {tmp}/missing.pt: no such checkpoint file"),
    "detect": (["detect", "--checkpoint", "{tmp}/missing.pt", "{tmp}/missing", "--out",
                "{tmp}/d.json"], "hvd-yolo detect: error: "),
    "bench": (["bench", "train", "--size", "100"],
              "hvd-yolo bench train: error: --size must be a positive multiple of 32, got 100"),
    "demo": (["demo", "--size", "100", "--out", "{tmp}/demo"],
             "hvd-yolo demo: error: --size must be a positive multiple of 32, got 100"),
    "cluster": (["cluster", "start", "abc", "--name", "clitest"],
                "hvd-yolo cluster start: error: node must be a number 1..N, got 'abc'"),
}


@pytest.mark.parametrize("command", sorted(BAD_INPUTS))
def test_bad_input_reported_argparse_style(command: str, tmp_path: Path) -> None:
    argv, expected = BAD_INPUTS[command]
    (tmp_path / "bad.yaml").write_text("optim: [1, 2\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run(hvd_yolo_argv(*argv), capture_output=True, text=True, timeout=180,
                          cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if ": error:" in line]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    assert errors[0].startswith(expected.replace("{tmp}", str(tmp_path))), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "demo").exists()  # refused before any work
