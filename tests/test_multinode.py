"""Multi-node jobs on a simulated cluster (hvd_yolo.cluster): real sshd, real links, TCP only.

One module-scoped cluster of 2 nodes x 2 slots with 10 Gbit/s links (taken down in a
finalizer); jobs start on its login node with the package's mpirun line plus ``--network``
(``btl tcp,self``: no shared memory between nodes) or with ``mpi/horovodrun.sh --gloo``.
Skipped, with the reason, where network namespaces cannot be made (not root, no sshd).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvd_yolo import cluster
from hvd_yolo.launch import hvd_yolo_argv, mpirun_argv
from tests.fixtures import datagen
from tests.fixtures.models import simulated_cluster
from tests.fixtures.train_runs import losses
from tests.mpi_harness import JobResult, run_argv, run_cli, wait_for

pytestmark = pytest.mark.mpi
REPO = Path(__file__).resolve().parents[1]
NAME = f"t{os.getpid() % 100000}"
SUBNET = "198.18.2.0/24"
N1, N2 = cluster.hostname(NAME, 1), cluster.hostname(NAME, 2)


@pytest.fixture(scope="module")
def sim() -> Iterator[dict]:
    yield from simulated_cluster(cluster.Spec(name=NAME, nodes=2, slots=2, link="10gbit", subnet=SUBNET))


SHARDS = {"images": 8, "seed": 11, "shards": 2, "size_range": (96, 128)}


def on_login(argv: list[str], timeout: float = 180, check: bool = True) -> JobResult:
    """Run ``argv`` on the cluster's login node, from the checkout, with a timeout."""
    return run_argv(cluster.exec_argv(NAME, argv), timeout=timeout, cwd=REPO, check=check)


def mpirun(np: int, hosts: str) -> list[str]:
    return mpirun_argv(np, hosts=hosts, network=SUBNET, tag_output=True)


def train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--set", f"data.train={shards}", "--set", "data.workers=0",
            "--set", "input.size=96", "--set", "optim.batch_size=2", "--set", "optim.epochs=4",
            "--set", "optim.warmup_steps=2", "--set", "run.progress=false",
            "--set", "dist.threads=1", "--set", f"run.out_dir={out}", *extra]


# ------------------------------------------------------------------ collectives over the links
ALLREDUCE = """
    import json, socket, sys, torch
    from hvd_yolo.comm import horovod as dist
    ctx = dist.init(threads=1)
    n, iters = {numel}, {iters}
    t = torch.empty(n)
    for i in range(iters):
        t.fill_(ctx.rank + 1.0)
        dist.allreduce_(t, name=f"mn.{{i}}", average=False)
    ok = bool((t == ctx.size * (ctx.size + 1) / 2).all())
    print(f"host={{socket.gethostname()}}")
    print(f"ok={{ok}} sum={{t[0].item()}}")
"""


@pytest.mark.parametrize("per_node", [1, 2])
def test_allreduce_across_nodes_is_right_and_goes_over_the_links(sim: dict, per_node: int) -> None:
    """2 nodes x 1 and x 2 ranks: the sums are right on every rank, every rank says which node
    it is on, and each node's link carried at least what any allreduce must send between two
    nodes (each node's half of the reduce-scatter and of the allgather: S bytes per call)."""
    numel, iters = 1 << 20, 5  # 4 MiB fp32, 5 calls: >= 20 MiB out of each node
    np = 2 * per_node
    before = {k: cluster.interface_bytes(NAME, k) for k in (1, 2)}
    code = textwrap.dedent(ALLREDUCE.format(numel=numel, iters=iters))
    res = on_login(mpirun(np, f"{N1}:{per_node},{N2}:{per_node}") + [sys.executable, "-c", code])
    after = {k: cluster.interface_bytes(NAME, k) for k in (1, 2)}
    hosts = res.values("host")
    assert sorted(hosts.values()) == sorted([N1] * per_node + [N2] * per_node), res.output
    expected = np * (np + 1) / 2
    assert res.values("ok") == {r: f"True sum={expected}" for r in range(np)}, res.output
    need = iters * numel * 4
    for k in (1, 2):
        sent = after[k]["tx"] - before[k]["tx"]
        got = after[k]["rx"] - before[k]["rx"]
        assert sent >= need and got >= need, (k, sent, got, need)


# ------------------------------------------------------------------ training
def test_training_on_two_nodes_follows_the_one_node_trajectory(sim: dict, shards: Path,
                                                                tmp_path: Path) -> None:
    one, two = tmp_path / "one_node", tmp_path / "two_nodes"
    steps = ("--set", "run.max_steps=4")
    run_cli(train_args(shards, one, *steps), np=2, timeout=300)
    on_login(mpirun(2, f"{N1}:1,{N2}:1") + hvd_yolo_argv(*train_args(shards, two, *steps)),
             timeout=300)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4], (a, b)
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])


def test_horovodrun_gloo_trains_across_nodes(sim: dict, shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = on_login([str(REPO / "mpi" / "horovodrun.sh"), "--gloo", "-np", "2", "-H",
                    f"{N1}:1,{N2}:1", "--network", SUBNET, "--start-timeout", "60",
                    *train_args(shards, out, "--set", "run.max_steps=2")], timeout=300)
    assert sorted(losses(out)) == [1, 2], res.output
    assert (out / "checkpoints" / "last.pt").exists(), res.output


def test_convert_across_nodes_writes_the_same_shards(sim: dict, tmp_path: Path) -> None:
    from hvd_yolo.data.synthetic import write_yolo_dataset
    from hvd_yolo.shards.convert import convert_dataset

    src = write_yolo_dataset(tmp_path / "src", 10, seed=4, size_range=(64, 96))
    convert_dataset("yolo", src, tmp_path / "local", shards=4)
    on_login(mpirun(4, f"{N1}:2,{N2}:2") + hvd_yolo_argv(
        "convert", "yolo", str(src), str(tmp_path / "nodes"), "--shards", "4", "-q"))
    a, b = datagen.shard_content(tmp_path / "local"), datagen.shard_content(tmp_path / "nodes")
    assert a.keys() == b.keys() and a, (a.keys(), b.keys())
    for key in a:
        assert a[key] == b[key], f"{key} differs between one process and 2 nodes x 2 ranks"
    created = json.loads((tmp_path / "nodes" / "manifest.json").read_text())["created_by"]
    assert created["ranks"] == 4


# ------------------------------------------------------------------ Slurm across nodes
@pytest.fixture(scope="module")
def slurm(sim: dict):
    """slurmctld on the login node, a slurmd on each node; torn down after the module."""
    from tests.slurm.cluster import SlurmUnavailable, ensure_packages
    from tests.slurm.multinode import MultiNodeSlurm

    root = Path(tempfile.mkdtemp(prefix="hvd_yolo_mn_slurm_"))  # short: unix socket paths
    slurm = MultiNodeSlurm(root, name=NAME, nodes=[1, 2])
    try:
        ensure_packages(timeout=600)
        slurm.start(timeout=120)
    except SlurmUnavailable as exc:
        slurm.stop()
        pytest.skip(f"cannot start a 2-node Slurm cluster: {exc}")
    yield slurm
    slurm.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("launcher", ["mpirun", "srun"])
def test_sbatch_nodes_2_runs_one_rank_on_each_node(slurm, tmp_path: Path, launcher: str) -> None:
    """``sbatch --nodes=2 mpi/slurm/train.sbatch``: mpirun inside the allocation (daemons
    started by srun) or srun --mpi=pmix puts one rank on each node; the allreduce is right."""
    work, out = tmp_path / "job", tmp_path / "out"
    work.mkdir()
    job = [sys.executable, str(REPO / "tests" / "slurm" / "allreduce_job.py"), str(out)]
    env = {"OMP_NUM_THREADS": "1", "HVD_YOLO_LAUNCHER": launcher,
           "HVD_YOLO_IFACE": cluster.IFACE}
    if launcher == "srun":
        env["HVD_YOLO_CMD"] = " ".join(job)
    job_id = slurm.sbatch(["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                           f"--chdir={work}", str(REPO / "mpi" / "slurm" / "train.sbatch"),
                           *([] if launcher == "srun" else job)], env=env, cwd=REPO)
    info = slurm.wait_job(job_id, 180)
    logs = "".join(f"\n--- {f}\n{f.read_text(errors='replace')[-3000:]}"
                   for f in sorted(work.rglob("*")) if f.is_file())
    assert info["JobState"] == "COMPLETED", f"{info}{logs}{slurm.tail('slurmd', 2000)}"
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["host"] for r in records] == [N1, N2], records
    assert all(r["allreduce"] == 3.0 and r["slurm_job_id"] == str(job_id) for r in records)


# ------------------------------------------------------------------ a node dies
def test_a_killed_node_ends_the_job_and_the_run_resumes_on_the_node_left(
        sim: dict, shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ("--set", "run.checkpoint_every=2", "--set", "optim.epochs=50")
    argv = cluster.exec_argv(NAME, mpirun(2, f"{N1}:1,{N2}:1") + hvd_yolo_argv(
        *train_args(shards, out, *common)))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True)
    try:
        ckpt = out / "checkpoints" / "step-00000002.pt"
        wait_for(ckpt.exists, 240, "step-2 checkpoint", proc)
        cluster.kill_node(NAME, 2)  # its sshd, Open MPI daemon and rank
        t0 = time.monotonic()
        try:
            output = proc.communicate(timeout=90)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            pytest.fail("the job did not end within 90 s of node 2 dying:\n" + _drain(proc))
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.start_node(NAME, 2)  # later tests get their node back
    assert proc.returncode != 0, output
    assert N2 in output, f"the dead node {N2} is not named:\n{output}"
    print(f"job ended {waited:.1f} s after the node died, rc {proc.returncode}")

    res = on_login(mpirun(1, f"{N1}:1") + hvd_yolo_argv(*train_args(
        shards, out, *common, "--set", "run.max_steps=6", "--resume", "auto")), timeout=300)
    assert any(note in res.output for note in (  # the 2-node checkpoint goes on, on 1 rank
        "world size is 2 in the checkpoint but 1 now", "resuming a 2-rank checkpoint on 1 ranks")
    ), res.output
    assert max(losses(out)) == 6, res.output


def _drain(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()[0].decode(errors="replace")


# ------------------------------------------------------------------ the scaling model's fit
def test_alpha_beta_fit_recovers_the_model_it_was_made_from() -> None:
    from benchmarks.scaling_model import fit, ring_time

    alpha, bw = 40e-6, 1.1e8
    points = [(n, s, ring_time(n, s, alpha, bw)) for n in (2, 3, 4)
              for s in (2**16, 2**20, 2**24, 2**26)]
    got_alpha, got_bw = fit(points)
    assert abs(got_alpha / alpha - 1) < 1e-6 and abs(got_bw / bw - 1) < 1e-6


# ------------------------------------------------------------------ the command's errors
@pytest.mark.parametrize("args,message", [
    (["up", "--link", "fast"], "link rate 'fast' is not a tc rate"),
    (["up", "--subnet", "10.0.0.0/24"], "must lie inside 198.18.0.0/15"),
    (["up", "--name", "Bad-Name"], "cluster name 'Bad-Name'"),
    (["up", "--nodes", "0"], "--nodes must be 1..64"),
    (["exec", "--name", "absent", "--", "true"], "cluster 'absent' is not up"),
])
def test_cluster_command_rejects_bad_input_clearly(args: list[str], message: str) -> None:
    proc = subprocess.run(hvd_yolo_argv("cluster", *args), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc
    assert proc.stderr.startswith(f"hvd-yolo cluster {args[0]}: error: "), proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_cluster_up_without_net_admin_names_what_is_missing() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the command without CAP_NET_ADMIN")
    # Root without CAP_NET_ADMIN (dropped from the bounding and inheritable sets): the checkout
    # may sit in a folder another user cannot enter, so the user stays root.
    argv = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin",
            *hvd_yolo_argv("cluster", "up", "--name", "noroot")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    assert "missing: root / CAP_NET_ADMIN" in proc.stderr, proc.stderr
