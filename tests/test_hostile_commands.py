"""A user's mistakes and hostile inputs, through the installed `hvd-yolo` command: one line each
(`hvd-yolo CMD: error: ...`), no traceback, no hang, nothing written over an input.

Each case was a traceback, a hang, a silent wrong result or lost data before: outputs guarded
against inputs, strict JSON, capped counts and sizes, detect's options and checkpoints, 16-bit
PNGs, a truncated shard, a closed stdout, a corrupt image with a DataLoader worker, a batch
larger than the data, and a new run in a folder holding another run's checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hvd_yolo import checkpoint
from hvd_yolo.config import Config
from hvd_yolo.model.yolov3 import build_model
from tests.fixtures.datagen import flip_image_bytes, synthetic_shards
from tests.fixtures.train_runs import train_args

HVD_YOLO = str(Path(sys.executable).parent / "hvd-yolo")


def hvd_yolo(*args: str, timeout: float = 180, **kwargs: object) -> subprocess.CompletedProcess:
    """`hvd-yolo ARGS` as a user runs it (one process), output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([HVD_YOLO, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, **kwargs)  # type: ignore[call-overload]


def one_error(proc: subprocess.CompletedProcess, code: int, start: str) -> str:
    """Assert exit ``code`` with exactly one ``error:`` line, starting ``start``; return it."""
    text = proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error:" in line]
    assert proc.returncode == code, text
    assert len(errors) == 1 and errors[0].startswith(start), text
    assert "Traceback" not in text and "Exception ignored" not in text, text
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small shard set and an (untrained) checkpoint of its classes, at 64 px, whose config
    reads with one DataLoader worker and stops at a corrupt image."""
    from hvd_yolo.data.dataset import ShardDataset

    root = tmp_path_factory.mktemp("hostile")
    shards = synthetic_shards(root, 8, seed=5, shards=2, size=(96, 96))
    ds = ShardDataset(shards)
    torch.manual_seed(0)
    cfg = Config()
    cfg.data.train, cfg.data.workers, cfg.data.on_corrupt = str(shards), 1, "error"
    cfg.input.size = 64
    state = {"model": build_model("yolov3-tiny", len(ds.class_names)).state_dict(), "ema": None,
             "config": cfg.to_dict(), "class_names": list(ds.class_names),
             "category_ids": list(ds.category_ids), "model_name": "yolov3-tiny", "step": 1}
    ckpt = checkpoint.save(state, root / "ckpt", 1, 1)
    ds.close()
    return {"root": root, "shards": shards, "ckpt": ckpt, "images": root / "src" / "images"}


# ------------------------------------------------------------------ 5. guarded outputs
def test_no_command_writes_over_an_input(data: dict[str, Path], tmp_path: Path) -> None:
    ckpt, shards = data["ckpt"], data["shards"]
    before = {p: p.read_bytes() for p in [ckpt, *shards.iterdir()]}
    cases = [
        (["eval", "--checkpoint", str(ckpt), "--data", str(shards), "--results", str(ckpt)],
         f"hvd-yolo eval: error: --results {ckpt} would write over the input {ckpt}"),
        (["eval", "--checkpoint", str(ckpt), "--data", str(shards), "--json",
          str(shards / "manifest.json")],
         f"hvd-yolo eval: error: --json {shards / 'manifest.json'} would write over the input"),
        (["shards", "info", str(shards), "--json", str(shards / "shard-00000.h5")],
         "hvd-yolo shards info: error: --json"),
    ]
    photo = tmp_path / "photo.jpg"
    shutil.copy(next(data["images"].glob("*.jpg")), photo)
    cases.append((train_args(shards, tmp_path / "run", "--timeline", str(photo)),
                  f"hvd-yolo train: error: --timeline {photo} exists and is not a Horovod "
                  "timeline"))
    notes = tmp_path / "notes.json"
    notes.write_text('["my", "list"]')
    cases.append((["eval", "--checkpoint", str(ckpt), "--data", str(shards), "--json",
                   str(notes)], f"hvd-yolo eval: error: --json {notes} exists and is not an "
                  "earlier --json output"))
    for argv, start in cases:
        one_error(hvd_yolo(*argv), 2, start)
    assert {p: p.read_bytes() for p in before} == before
    assert photo.read_bytes() == next(data["images"].glob("*.jpg")).read_bytes()
    assert notes.read_text() == '["my", "list"]' and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 23a, 5: strict JSON, earlier outputs
def test_eval_json_is_strict_and_rewrites_its_own_outputs(data: dict[str, Path],
                                                          tmp_path: Path) -> None:
    figures, dets = tmp_path / "figures.json", tmp_path / "dets.json"
    figures.write_text('{"mAP": 0.5}')  # an earlier --json output
    dets.write_text("[]")  # an earlier (empty) detections file
    proc = hvd_yolo("eval", "--checkpoint", str(data["ckpt"]), "--data", str(data["shards"]),
                    "--json", str(figures), "--results", str(dets))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = figures.read_text()
    assert "NaN" not in text and "Infinity" not in text
    out = json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert out["images"] == 8 and out["AP_large"] is None  # no large objects: no figure
    assert isinstance(json.loads(dets.read_text()), list)


# ------------------------------------------------------------------ 13, 22: no hang after the error
def test_eval_with_a_worker_on_a_corrupt_image_exits_with_one_line(data: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    file, j, name = flip_image_bytes(shards, 3)
    proc = hvd_yolo("eval", "--checkpoint", str(data["ckpt"]), "--data", str(shards),
                    timeout=120)  # data.workers=1 from the checkpoint's config; hung before
    line = one_error(proc, 1, "hvd-yolo eval: error: rank 0: ")
    assert f"{file} sample {j} ({name!r}): CRC32 mismatch" in line
    assert "DataLoader worker" not in proc.stderr


# ------------------------------------------------------------------ 17, 9, 20b: detect
def test_detect_options_and_checkpoints_are_one_line(data: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    from hvd_yolo import cli

    images, out = str(data["images"]), str(tmp_path / "d.json")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data["ckpt"].read_bytes()[:5000])
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    for ckpt in ("missing.pt", "truncated.pt", "text.pt", "."):
        rc = cli.main(["detect", "--checkpoint", str(tmp_path / ckpt), images, "--out", out])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("hvd-yolo detect: error: "), (ckpt, err)
        assert len(err.strip().splitlines()) == 1, err
    for option, value, start in (("--conf", "1.5", "--conf 1.5: must be in [0, 1]"),
                                 ("--conf", "-0.5", "--conf -0.5: must be in [0, 1]"),
                                 ("--iou", "2", "--iou 2: must be in [0, 1]"),
                                 ("--max-det", "-1", "--max-det -1: must be in [1, "),
                                 ("--size", "100", "--size 100: must be a positive multiple of 32")):
        rc = cli.main(["detect", "--checkpoint", str(data["ckpt"]), images, "--out", out,
                       option, value])
        assert rc == 2 and capsys.readouterr().err.startswith(
            f"hvd-yolo detect: error: {start}"), (option, value)
    assert not Path(out).exists()


def test_detect_reads_16_bit_pngs_as_the_shard_reader_does(data: dict[str, Path],
                                                           tmp_path: Path) -> None:
    from PIL import Image

    pixels = np.asarray(Image.open(next(data["images"].glob("*.jpg"))).convert("RGB"))
    for bits, folder in ((8, "eight"), (16, "sixteen")):
        (tmp_path / folder).mkdir()
        if bits == 8:
            Image.fromarray(pixels).save(tmp_path / folder / "x.png")
        else:  # the same picture at 16 bits per channel (v * 257: exact); PIL writes no RGB48
            import zlib

            wide = pixels.astype(">u2") * 257
            h, w, _ = wide.shape
            raw = b"".join(b"\0" + wide[y].tobytes() for y in range(h))

            def chunk(kind: bytes, body: bytes) -> bytes:
                return (len(body).to_bytes(4, "big") + kind + body
                        + zlib.crc32(kind + body).to_bytes(4, "big"))

            png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", w.to_bytes(4, "big") + h.to_bytes(4, "big")
                                                 + bytes([16, 2, 0, 0, 0]))
                   + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
            (tmp_path / folder / "x.png").write_bytes(png)
    found = {}
    for folder in ("eight", "sixteen"):
        proc = hvd_yolo("detect", "--checkpoint", str(data["ckpt"]), str(tmp_path / folder),
                        "--out", str(tmp_path / f"{folder}.json"), "--conf", "0.001",
                        "--draw", str(tmp_path / f"{folder}-drawn"))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        found[folder] = json.loads((tmp_path / f"{folder}.json").read_text())
        assert (tmp_path / f"{folder}-drawn" / "x.png").is_file()
    assert found["eight"], "no detections at conf 0.001: the comparison would prove nothing"
    assert [d["category_id"] for d in found["sixteen"]] == [d["category_id"] for d in found["eight"]]
    boxes = {k: np.array([[*d["bbox"], d["score"]] for d in v]) for k, v in found.items()}
    assert np.allclose(boxes["sixteen"], boxes["eight"], atol=1e-4)


def test_detect_on_a_truncated_shard_is_one_line(data: dict[str, Path], tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    shard = shards / "shard-00001.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    proc = hvd_yolo("detect", "--checkpoint", str(data["ckpt"]), str(shards), "--out",
                    str(tmp_path / "d.json"))
    line = one_error(proc, 1, f"hvd-yolo detect: error: {shards}")
    assert "shard-00001.h5" in line and "shards verify" in line


# ------------------------------------------------------------------ 20a: closed stdout
@pytest.mark.parametrize("argv", [["shards", "info", "{shards}"], ["train", "--print-config"]],
                         ids=["shards-info", "print-config"])
def test_a_closed_stdout_ends_quietly(argv: list[str], data: dict[str, Path]) -> None:
    argv = [a.replace("{shards}", str(data["shards"])) for a in argv]
    proc = subprocess.Popen([HVD_YOLO, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the first line: `| head -0`
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == "", err  # as a process ended by SIGPIPE


# ------------------------------------------------------------------ 14: caps; empty out_dir
@pytest.mark.parametrize(("setting", "start"), [
    ("input.size=1e30", "input.size=1000000000000000019884624838656: at most 4096"),
    ("data.workers=100000000000000000000000", "data.workers=100000000000000000000000: at most 256"),
    ("optim.batch_size=1e9", "optim.batch_size=1000000000: at most 4096"),
    ("run.out_dir=", "run.out_dir is empty"),
])
def test_unbounded_values_are_named(setting: str, start: str, data: dict[str, Path],
                                    capsys: pytest.CaptureFixture) -> None:
    from hvd_yolo import cli

    rc = cli.main(train_args(data["shards"], data["root"] / "never", "--set", setting))
    assert rc == 2 and capsys.readouterr().err.startswith(f"hvd-yolo train: error: {start}")
    assert not (data["root"] / "never").exists()


# ------------------------------------------------------------------ 18, 4, 8: train
def test_a_batch_larger_than_the_data_is_one_line(data: dict[str, Path], tmp_path: Path) -> None:
    proc = hvd_yolo(*train_args(data["shards"], tmp_path / "run", "--set", "optim.batch_size=100",
                                "--set", "data.workers=0", size=64))
    line = one_error(proc, 2, "hvd-yolo train: error: ")
    assert "fewer than one step of optim.batch_size 100" in line


def test_a_used_out_dir_needs_resume_or_fresh(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = train_args(data["shards"], out, "--set", "data.workers=0", "--set", "run.max_steps=2",
                      size=64, epochs=1)
    # a killed save left only its temp file: --resume auto says it starts from step 0
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / ".step-00000002.pt.k1ll3d.tmp").write_bytes(b"PK" * 1000)
    proc = hvd_yolo(*args, "--resume", "auto")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("--resume auto: no checkpoint to resume in " f"{out / 'checkpoints'} (only 1 "
            "unfinished checkpoint write(s) of a killed run") in proc.stderr, proc.stderr
    assert "starting a new run from step 0" in proc.stderr
    saved = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    assert "last.pt" in saved
    # a new run (no --resume) into it is refused, naming the last step; nothing is touched
    proc = hvd_yolo(*args)
    line = one_error(proc, 1, f"hvd-yolo train: error: run.out_dir={out} holds the checkpoints "
                              "of an earlier run (last step 2")
    assert "--resume auto" in line and "--fresh" in line
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == saved
    # --fresh starts over on purpose, saying what it removed
    proc = hvd_yolo(*args, "--fresh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--fresh: removed the earlier run's" in proc.stdout and "(last step 2)" in proc.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "step"]
    assert steps == [1, 2]  # the old run's log went with it


# ------------------------------------------------------------------ 24: a stopped rank 0 resumes
STALL_RANK0 = """
import sys, time
from pathlib import Path
from hvd_yolo.stall import StallWatch

folder = Path(sys.argv[1])
watch = StallWatch(folder, 0, 2, warning_s=4.0, shutdown_s=6.0)
print("ready", flush=True)
step = 0
while not (folder / "end").exists():  # a step: 0.3 s of CPU time (none while stopped)
    step += 1
    watch.progress("computing a step", step)
    start = time.process_time()
    while time.process_time() - start < 0.3:
        pass
watch.close()
print("done", flush=True)
"""


def test_a_rank_stopped_and_resumed_does_not_call_its_own_pause_a_stall(tmp_path: Path) -> None:
    """Rank 0's watchdog, SIGSTOPped for 10 s mid-step while rank 1 has reported (its note):
    it used to wake past dist.stall_shutdown_s and end the job saying "every rank responded
    (none is frozen)"; it now names its own pause and goes on."""
    import signal
    import time

    (tmp_path / "stall-rank1.json").write_text(json.dumps(
        {"rank": 1, "step": 3, "where": "waiting for the other ranks' gradients", "idle_s": 4}))
    proc = subprocess.Popen([sys.executable, "-c", STALL_RANK0, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(10.0)
    os.kill(proc.pid, signal.SIGCONT)
    time.sleep(3.0)  # the watchdog wakes within a second
    (tmp_path / "end").write_text("")
    try:
        output = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the watched process did not end")
    assert "every rank responded" not in output, output
    assert proc.returncode == 0 and output.rstrip().endswith("done"), output
    assert "rank 0: this process was stopped for " in output, output
