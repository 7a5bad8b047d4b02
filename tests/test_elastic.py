"""Elastic training: `hvd-yolo train` under `horovodrun --gloo --min-np 2 --max-np 3
--host-discovery-script S` loses a worker mid-epoch, goes on with 2, and grows back to 3.

Three names of this machine (localhost, 127.0.0.1, its hostname) stand for three one-slot hosts;
the discovery script prints a hostfile the test edits, as an admin would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from hvd_yolo.data.dataset import ShardDataset
from hvd_yolo.data.sampler import ShardSampler
from tests.fixtures.datagen import synthetic_shards
from tests.fixtures.train_runs import read_jsonl

pytestmark = pytest.mark.mpi

VENV_BIN = Path(sys.executable).parent
# Every rank prints a checksum of its weights whenever the loop saves (the product's code runs).
WEIGHTS_AT_SAVE = """
import sys
from hvd_yolo import dist
average_buffers = dist.average_buffers
def spy(modules, name):
    average_buffers(modules, name)
    print(f"weights={sum(float(p.detach().double().sum()) for p in modules[0].parameters())!r}", flush=True)
dist.average_buffers = spy
from hvd_yolo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def local_names() -> list[str]:
    """Three names that horovodrun runs locally (each a local address)."""
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        pytest.skip(f"the hostname {host} does not resolve")
    local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
             if a.family == socket.AF_INET}
    if address not in local or host in ("localhost", "127.0.0.1"):
        pytest.skip(f"the hostname {host} is not a third local name")
    return ["localhost", "127.0.0.1", host]


def wait_for(cond, proc: subprocess.Popen, timeout: float, what: str) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return time.time()
        if proc.poll() is not None:
            raise AssertionError(f"horovodrun ended (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def worker_on(p: psutil.Process, host: str) -> bool:
    try:
        return p.environ().get("HOROVOD_HOSTNAME") == host and "train" in p.cmdline()
    except psutil.Error:  # a discovery script's shell that just ended
        return False


def commits(log: Path) -> list[dict]:
    return [r for r in read_jsonl(log) if r["event"] == "commit"] if log.exists() else []


def test_a_lost_worker_shrinks_the_job_and_a_new_one_grows_it(tmp_path: Path) -> None:
    names = local_names()
    shards = synthetic_shards(tmp_path / "data", 48, seed=5, shards=3, size_range=(64, 96))
    out, hosts = tmp_path / "out", tmp_path / "hosts"
    hosts.write_text("".join(f"{n}:1\n" for n in names))
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    script = tmp_path / "train_spy.py"
    script.write_text(WEIGHTS_AT_SAVE)
    argv = [str(VENV_BIN / "horovodrun"), "--gloo", "-np", "3", "--min-np", "2", "--max-np", "3",
            "--host-discovery-script", str(discover), "--network-interface", "lo",
            "--gloo-timeout-seconds", "10", "--blacklist-cooldown-range", "1", "2",
            sys.executable, str(script), "train", "--set", f"data.train={shards}",
            "--set", "data.workers=0", "--set", "input.size=64", "--set", "optim.batch_size=2",
            "--set", "optim.epochs=3", "--set", "optim.warmup_steps=2",
            "--set", f"run.out_dir={out}", "--set", "run.progress=false",
            "--set", "dist.threads=1", "--set", "run.log_every=0"]
    log = out / "ranks" / "elastic.jsonl"
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: any(c["world"] == 3 and c["step"] >= 3 for c in commits(log)), proc,
                 120, "3 steps on 3 ranks")
        victim = [p for p in psutil.Process(proc.pid).children(recursive=True)
                  if worker_on(p, names[2])]
        assert len(victim) == 1, victim
        hosts.write_text("".join(f"{n}:1\n" for n in names[:2]))  # the admin removes the host
        victim[0].kill()
        t_kill = time.time()
        t_shrunk = wait_for(lambda: any(c["world"] == 2 and c["t"] > t_kill for c in commits(log)),
                            proc, 90, "a step on 2 ranks")
        hosts.write_text("".join(f"{n}:1\n" for n in names))  # the host comes back
        wait_for(lambda: any(c["world"] == 3 and c["t"] > t_shrunk for c in commits(log)),
                 proc, 90, "a step on 3 ranks again")
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    (tmp_path / "horovodrun.txt").write_text(output)
    assert proc.returncode == 0, output[-4000:]
    print(f"kill -> first step on 2 ranks: {t_shrunk - t_kill:.1f} s")

    # Every sample of each epoch read once across the world changes: the committed ranges.
    sizes = ShardDataset(shards).shard_sizes
    seen: dict[int, Counter] = {e: Counter() for e in range(3)}
    worlds = []
    for c in commits(log):
        s = c["sampler"]
        worlds.append(s["world_size"])
        if s["epoch"] >= 3 or s["offset"] == c["from_offset"]:
            continue
        for r in range(s["world_size"]):
            sampler = ShardSampler(sizes, r, s["world_size"], seed=0, shuffle=True, tail="pad")
            sampler.load_state_dict(s)
            seen[s["epoch"]].update(sampler.epoch_indices()[c["from_offset"]:s["offset"]].tolist())
    assert 2 in worlds and worlds[-1] == 3 and worlds.index(2) > worlds.index(3)
    for epoch, count in seen.items():
        twice = {i: n for i, n in count.items() if n > 1}
        # pad repeats at most one sample per rank per deal; a re-deal drops at most a partial batch
        assert sum(n - 1 for n in twice.values()) <= 3, (epoch, twice)
        assert len(count) >= 48 - 2 * 2, (epoch, sorted(set(range(48)) - set(count)))

    # The final weights are the same on every rank: the last save's checksum of each of the 3
    # (horovodrun tags lines by slot, which a new worker may share with a lost one).
    sums = [line.split("weights=")[1] for line in output.splitlines() if "<stdout>:weights=" in line]
    assert len(sums) >= 3 and len(set(sums[-3:])) == 1, sums
