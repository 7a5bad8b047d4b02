"""A checkpoint never runs code: a real malicious pickle on every command that loads one.

The payload is what an attacker ships: an object whose ``__reduce__`` calls ``os.system`` to
create a marker file. It is saved with ``torch.save`` (plain, and once with a valid
``hvd_yolo.sha256`` record, which anyone can compute). Every command must leave the marker
uncreated, print one error line and exit non-zero.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hvd_yolo import checkpoint, cli
from tests.fixtures.datagen import write_image
from tests.fixtures.train_runs import train_args
from tests.mpi_harness import VENV_BIN, run_argv


class Payload:
    """Runs ``touch MARKER`` when unpickled by a loader that allows arbitrary globals."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def evil_checkpoint(path: Path, marker: Path, sealed: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(marker), "step": 1, "epoch": 0}, path)
    if sealed:
        checkpoint._seal(path)  # a valid checksum record: the seal is no proof of safety
    return path


SHARDS = {"images": 8, "seed": 4, "shards": 2, "size_range": (64, 96)}


def hvd_yolo(*args: str) -> tuple[int, str]:
    res = run_argv([str(VENV_BIN / "hvd-yolo"), *args], timeout=300, check=False)
    return res.returncode, res.output


def assert_refused(rc: int, out: str, marker: Path, command: str, why: str) -> None:
    assert not marker.exists(), f"the payload ran under hvd-yolo {command}:\n{out}"
    assert rc != 0, out
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if f"hvd-yolo {command}: error:" in ln]
    assert len(errors) == 1 and why in errors[0], out


UNSEALED = "no hvd_yolo.sha256 record"
NOT_DATA = "holds objects other than tensors and plain values (posix.system)"


def test_eval_and_detect_refuse_a_malicious_checkpoint(shards: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    sealed = evil_checkpoint(tmp_path / "sealed.pt", marker, sealed=True)
    rc, out = hvd_yolo("eval", "--checkpoint", str(sealed), "--data", str(shards))
    assert_refused(rc, out, marker, "eval", NOT_DATA)
    write_image(tmp_path / "img" / "a.jpg", 48, 40, seed=1)
    for path, why, extra in ((sealed, NOT_DATA, []),
                             (evil_checkpoint(tmp_path / "evil.pt", marker), UNSEALED, []),
                             (tmp_path / "evil.pt", NOT_DATA, ["--trust-checkpoint"])):
        rc = cli.main(["detect", "--checkpoint", str(path), str(tmp_path / "img"), "--out",
                       str(tmp_path / "dets.json"), *extra])
        res = capsys.readouterr()
        assert_refused(rc, res.out + res.err, marker, "detect", why)
    assert not (tmp_path / "dets.json").exists()


def test_train_resume_refuses_a_malicious_checkpoint(shards: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    out_dir = tmp_path / "run"
    args = train_args(shards, out_dir, "--set", "model.name=yolov3-tiny", size=64, epochs=1)
    sealed = evil_checkpoint(tmp_path / "evil.pt", marker, sealed=True)
    rc, out = hvd_yolo(*args, "--resume", str(sealed))
    assert_refused(rc, out, marker, "train", NOT_DATA)
    # --resume auto with a last.pt dropped into the run's folder (and an unsealed step file)
    evil_checkpoint(out_dir / "checkpoints" / "last.pt", marker, sealed=True)
    evil_checkpoint(out_dir / "checkpoints" / "step-00000002.pt", marker)
    rc, out = hvd_yolo(*args, "--resume", "auto")
    assert_refused(rc, out, marker, "train", "no usable checkpoint for --resume auto")
    assert NOT_DATA in out and UNSEALED in out
