"""The stack itself: Horovod's collectives give the right numbers on real ranks, a crashing
rank ends the whole job (no hang), and `hvd-yolo env` reports a complete build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mpi_harness import VENV_BIN, run_python

COLLECTIVES = """
    import torch
    from hvd_yolo.comm import horovod as dist
    ctx = dist.init(threads=1)
    import horovod.torch as hvd
    r, n = ctx.rank, ctx.size
    x = torch.arange(4, dtype=torch.float32) + 10 * r
    s = hvd.allreduce(x, op=hvd.Sum, name="sum")
    a = hvd.allreduce(x, op=hvd.Average, name="avg")
    h = hvd.allreduce(x, op=hvd.Average, name="fp16", compression=hvd.Compression.fp16)
    g = hvd.allgather(torch.full((r + 1, 2), float(r)), name="gather")
    b = hvd.broadcast(torch.tensor([float(r + 7)]), root_rank=1, name="bcast")
    objs = dist.allgather_object({"rank": r})
    m = dist.allreduce_mean(float(r), name="mean")
    print(f"size={n}")
    print(f"sum={s.tolist()}")
    print(f"avg={a.tolist()}")
    print(f"fp16={h.tolist()}")
    print(f"gather_rows={g[:, 0].tolist()}")
    print(f"bcast={b.item()}")
    print(f"objs={[o['rank'] for o in objs]}")
    print(f"mean={m.item()}")
"""


@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_collectives_give_the_right_numbers_on_two_ranks(launcher: str) -> None:
    res = run_python(COLLECTIVES, np=2, launcher=launcher, timeout=180)
    for key, expected in {
        "size": "2",
        "sum": str([10.0, 12.0, 14.0, 16.0]),  # [0,1,2,3] + [10,11,12,13]
        "avg": str([5.0, 6.0, 7.0, 8.0]),
        "fp16": str([5.0, 6.0, 7.0, 8.0]),  # exactly representable in fp16
        "gather_rows": str([0.0, 1.0, 1.0]),  # rank 0 sends 1 row, rank 1 sends 2
        "bcast": "8.0",  # rank 1's value r + 7
        "objs": str([0, 1]),
        "mean": "0.5",
    }.items():
        got = res.values(key)
        assert got == {0: expected, 1: expected}, f"{key}: {got}\n{res.output}"


@pytest.mark.mpi
def test_a_rank_that_raises_ends_the_whole_job_non_zero() -> None:
    code = """
        import time
        from hvd_yolo.comm import horovod as dist
        ctx = dist.init(threads=1)
        import horovod.torch as hvd, torch
        hvd.allreduce(torch.ones(1), name="before")
        if ctx.rank == 1:
            raise RuntimeError("rank 1 failed on purpose")
        # rank 0 waits in a collective that rank 1 never joins: without crash propagation
        # this would hang until the harness timeout.
        hvd.allreduce(torch.ones(1), name="after")
        time.sleep(600)
    """
    res = run_python(code, np=2, timeout=90, check=False)
    assert not res.timed_out, "the job hung instead of ending when rank 1 raised:\n" + res.output
    assert res.returncode != 0
    rank1 = "\n".join(res.rank_lines(1))
    assert "Traceback" in rank1 and "rank 1 failed on purpose" in rank1, res.output


@pytest.mark.mpi
def test_harness_timeout_kills_a_hung_job_and_shows_output() -> None:
    code = """
        import time
        print("about to hang", flush=True)
        time.sleep(600)
    """
    res = run_python(code, np=2, timeout=8, check=False)
    assert res.timed_out and res.returncode != 0
    assert "about to hang" in res.output


def test_horovod_check_build_lists_pytorch_mpi_and_gloo() -> None:
    out = subprocess.run([str(VENV_BIN / "horovodrun"), "--check-build"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for piece in ("PyTorch", "MPI", "Gloo"):
        assert f"[X] {piece}" in out, out


def test_env_command_names_every_version_and_exits_zero() -> None:
    proc = subprocess.run([str(VENV_BIN / "hvd-yolo"), "env", "--json", "-"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads(proc.stdout)
    for key in ("python", "torch", "torchvision", "horovod", "mpi_library", "h5py", "hdf5"):
        assert info.get(key), f"{key} missing from hvd-yolo env: {info}"
    assert info["horovod_controllers"] == {"mpi": True, "gloo": True}
    assert info["problems"] == []


def test_env_command_exits_non_zero_naming_a_missing_piece(tmp_path: Path) -> None:
    # Shadow mpi4py with a module that fails to import: env must say so and exit 1.
    (tmp_path / "mpi4py").mkdir()
    (tmp_path / "mpi4py" / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from hvd_yolo.cli import main; sys.exit(main(['env']))"],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(tmp_path), "PATH": ""},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "'mpi4py' cannot be imported" in proc.stderr
    assert "mpirun not found" in proc.stderr
