"""mpi/slurm/train.sbatch on a real single-node Slurm cluster (munged, slurmctld, slurmd here).

The cluster comes from tests/slurm/cluster.py (Debian's slurm-wlm + munge, installed with
apt-get when missing and we are root). Where it cannot start, every test here is skipped with
the reason. Failures show the job's output and slurmd's log; HVD_YOLO_KEEP_SLURM=1 keeps the
cluster's folder (config, daemon logs) after the run. Jobs are submitted as a user would:
``sbatch mpi/slurm/train.sbatch ...`` from the checkout, with only ``--ntasks-per-node=2
--cpus-per-task=1`` overridden for a 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.fixtures.train_runs import read_jsonl
from tests.slurm.cluster import SlurmCluster, SlurmUnavailable, ensure_packages

pytestmark = pytest.mark.mpi

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "mpi" / "slurm" / "train.sbatch"
CONVERT_SBATCH = REPO / "mpi" / "slurm" / "convert.sbatch"
ALLREDUCE_JOB = REPO / "tests" / "slurm" / "allreduce_job.py"
TWO_TASKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def slurm():
    """A running single-node cluster for this module; torn down even when a test fails."""
    root = Path(tempfile.mkdtemp(prefix="hvd_yolo_slurm_"))  # short: unix socket paths
    cluster = SlurmCluster(root)
    try:
        ensure_packages(timeout=600)
        cluster.start(timeout=120)
    except SlurmUnavailable as exc:
        cluster.stop()
        reason = f"cannot start a test Slurm cluster: {exc}"
        print(reason, file=sys.stderr)
        pytest.skip(reason)
    try:
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("HVD_YOLO_KEEP_SLURM"):
            print(f"slurm test cluster stopped; its files are in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def job_report(slurm: SlurmCluster, info: dict[str, str], workdir: Path) -> str:
    """Everything a failing job left: its batch output, the launcher's log, slurmd's log."""
    parts = [f"job: {info}"]
    for f in sorted(workdir.glob("*.out")) + sorted(workdir.glob("logs/*/*")):
        parts.append(f"----- {f} -----\n{f.read_text(errors='replace')[-6000:]}")
    parts.append(slurm.tail("slurmd", 3000))
    return "\n".join(parts)


def submit(slurm: SlurmCluster, workdir: Path, args: list[str], env: dict[str, str] | None = None,
           script: Path = SBATCH) -> int:
    """``sbatch`` from the checkout (as a user does), job working directory ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    return slurm.sbatch([*TWO_TASKS, f"--chdir={workdir}", str(script), *args],
                        env={"OMP_NUM_THREADS": "1", **(env or {})}, cwd=REPO)


def wait_completed(slurm: SlurmCluster, job_id: int, workdir: Path, timeout: float = 240
                   ) -> dict[str, str]:
    info = slurm.wait_job(job_id, timeout)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        job_report(slurm, info, workdir)
    return info


# ------------------------------------------------------------------ Horovod allreduce job
@pytest.mark.parametrize("launcher", ["mpirun", "srun"])
def test_sbatch_runs_a_two_task_horovod_allreduce(slurm: SlurmCluster, tmp_path: Path,
                                                  launcher: str) -> None:
    """Both launchers of train.sbatch (mpirun inside the allocation; srun --mpi=pmix) start
    2 ranks that agree on an allreduce, with the per-job log folder filled."""
    work, out = tmp_path / "job", tmp_path / "out"
    env = {"HVD_YOLO_LAUNCHER": launcher}
    if launcher == "srun":  # the command through HVD_YOLO_CMD instead of script arguments
        env["HVD_YOLO_CMD"] = f"{sys.executable} {ALLREDUCE_JOB} {out}"
        args: list[str] = []
    else:
        args = [sys.executable, str(ALLREDUCE_JOB), str(out)]
    job_id = submit(slurm, work, args, env)
    info = wait_completed(slurm, job_id, work, timeout=180)
    report = job_report(slurm, info, work)
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, rec in enumerate(records):
        assert rec["rank"] == r and rec["size"] == 2, report
        assert rec["allreduce"] == 3.0 and rec["allgather"] == [0, 1], report
        assert rec["slurm_job_id"] == str(job_id), report
    if launcher == "srun":  # Slurm itself placed the ranks (PMIx), not Open MPI's mpirun
        assert {rec["slurm_procid"] for rec in records} == {"0", "1"}, report
    else:
        assert {rec["ompi_rank"] for rec in records} == {"0", "1"}, report
    logs = work / "logs" / f"hvd-yolo-{job_id}"
    assert "rank=1 size=2 allreduce=3.0" in (logs / "train.log").read_text(), report
    assert "job step exited with code 0" in (logs / "job.txt").read_text(), report


# ------------------------------------------------------------------ hvd-yolo convert
def test_convert_sbatch_writes_shards_from_two_tasks(slurm: SlurmCluster, tmp_path: Path) -> None:
    from hvd_yolo.data.dataset import ShardDataset
    from hvd_yolo.data.synthetic import write_yolo_dataset

    src = write_yolo_dataset(tmp_path / "src", 9, seed=2, size_range=(64, 96))
    work, out = tmp_path / "job", tmp_path / "shards"
    job_id = submit(slurm, work, ["yolo", str(src), str(out), "--shards", "4"],
                    script=CONVERT_SBATCH)
    info = wait_completed(slurm, job_id, work, timeout=180)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] and len(manifest["shards"]) == 4, job_report(slurm, info, work)
    ds = ShardDataset(out)
    assert len(ds) == 9 and sum(ds.shard_sizes) == 9, job_report(slurm, info, work)


# ------------------------------------------------------------------ hvd-yolo train


def write_config(path: Path, shards: Path, out: Path, val: bool, epochs: int) -> Path:
    """A tiny run: 64 px inputs, batch 2 per rank, 13 images -> 3 steps per epoch on 2 ranks
    (7 samples per rank, one padded: 3 whole batches)."""
    lines = ["data:", f"  train: {shards}", "  workers: 0"]
    if val:
        lines.append(f"  val: {shards}")
    lines += ["model:", "  name: yolov3-tiny", "input:", "  size: 64",
              "optim:", "  batch_size: 2", f"  epochs: {epochs}", "  warmup_steps: 1",
              "run:", f"  out_dir: {out}", "  progress: false", "dist:", "  threads: 1"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sbatch_trains_on_two_tasks(slurm: SlurmCluster, shards: Path, tmp_path: Path) -> None:
    """`sbatch train.sbatch --config cfg.yaml`: 2 ranks train, evaluate, checkpoint, log."""
    work, out = tmp_path / "job", tmp_path / "run"
    cfg = write_config(tmp_path / "tiny.yaml", shards, out, val=True, epochs=1)
    job_id = submit(slurm, work, ["--config", str(cfg)])
    info = wait_completed(slurm, job_id, work, timeout=300)
    report = job_report(slurm, info, work)
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3, report
    metrics = read_jsonl(out / "metrics.jsonl")
    summary = [m for m in metrics if m["type"] == "summary"][-1]
    assert summary["steps"] == 3 and not summary["stopped"], report
    assert any(m["type"] == "eval" for m in metrics), report
    for r in (0, 1):  # every rank took every step
        assert len(read_jsonl(out / "ranks" / f"rank{r}.jsonl")) == 3, report


@pytest.mark.slow
def test_time_limit_warning_checkpoints_requeues_and_resumes(slurm: SlurmCluster, shards: Path,
                                                             tmp_path: Path) -> None:
    """What `#SBATCH --signal=B:USR1@120` does before the time limit, sent by hand: the batch
    shell asks every rank to stop, rank 0 checkpoints, the job is requeued and the second run
    resumes from the checkpoint (--resume auto) and finishes the schedule."""
    work, out = tmp_path / "job", tmp_path / "run"
    cfg = write_config(tmp_path / "long.yaml", shards, out, val=False, epochs=50)
    job_id = submit(slurm, work, ["--config", str(cfg), "--set", "run.max_steps=12"])
    rank0 = out / "ranks" / "rank0.jsonl"
    slurm.wait_for(lambda: rank0.exists() and len(read_jsonl(rank0)) >= 2, 240,
                   f"job {job_id} to log 2 steps", job_id)
    slurm.run(["scancel", "--signal=USR1", "--batch", str(job_id)])

    # Requeued: Slurm holds a requeued job back ~2 min (BeginTime) so that the new launch's
    # credential is younger than the old run's revocation (1 s granularity). Wait until the job
    # is pending again and the clock is 2 whole seconds past that, and let it start at once.
    slurm.wait_for(lambda: slurm.job(job_id).get("Restarts") == "1"
                   and slurm.job(job_id)["JobState"] == "PENDING", 180,
                   f"job {job_id} to be requeued", job_id)
    requeued = int(time.time())
    slurm.wait_for(lambda: int(time.time()) >= requeued + 2, 10, "2 s past the requeue", job_id)
    slurm.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
    info = wait_completed(slurm, job_id, work, timeout=300)
    report = job_report(slurm, info, work)

    summaries = [m for m in read_jsonl(out / "metrics.jsonl") if m["type"] == "summary"]
    assert len(summaries) == 2, report
    first, second = summaries
    assert first["stopped"] and 2 <= first["steps"] < 12, report
    assert not second["stopped"] and second["steps"] == 12, report
    steps = [s["step"] for s in read_jsonl(rank0)]
    assert steps == list(range(1, 13)), f"steps lost or repeated across the requeue: {steps}"
    log = (work / "logs" / f"hvd-yolo-{job_id}" / "train.log").read_text()
    assert "stop requested (SIGUSR1)" in log, report
    assert f"step {first['steps']}" in log.split("resumed from", 1)[1].splitlines()[0], report
    job_txt = (work / "logs" / f"hvd-yolo-{job_id}" / "job.txt").read_text()
    assert "requeueing job" in job_txt and "restart 1" in job_txt, report
