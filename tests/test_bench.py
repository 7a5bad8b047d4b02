"""`hvd-yolo bench train|allreduce` on 2 real ranks, tiny settings: the JSON is complete and sane.

No speed assertions (speed lives in benchmarks/); these check that the benchmarks run every
backend/mode, that gradients really are averaged (ranks end with bitwise equal weights) and
that the reported quantities are consistent (fp16 halves the bytes, bus = alg bandwidth at 2).
"""

from __future__ import annotations

import json
import math

import pytest

from tests.mpi_harness import run_cli

TINY = ["--model", "yolov3-tiny", "--size", "64", "--batch-size", "1", "--classes", "3",
        "--iterations", "2", "--warmup", "1", "--quiet"]


def _train(tmp_path, *extra: str, np: int = 2) -> dict:
    out = tmp_path / "train.json"
    res = run_cli(["bench", "train", *TINY, *extra, "--json", str(out)], np=np, timeout=240)
    assert "img/s per rank" in "\n".join(res.rank_lines(0)), res.output
    return json.loads(out.read_text())


def _check_common(r: dict, np: int, iterations: int = 2) -> None:
    assert r["benchmark"] == "train" and r["world_size"] == np
    assert r["threads"]["intra_op"] >= 1 and r["threads"]["inter_op"] >= 1
    assert r["versions"]["torch"] and r["parameters"] > 1_000_000
    assert [p["rank"] for p in r["per_iteration"]] == list(range(np))
    for p in r["per_iteration"]:
        assert len(p["compute_s"]) == len(p["allreduce_wait_s"]) == iterations
        assert all(t > 0 for t in p["compute_s"]) and all(t >= 0 for t in p["allreduce_wait_s"])
    assert len(r["step_time_s"]) == iterations
    assert math.isfinite(r["img_per_sec_per_rank"]) and r["img_per_sec_per_rank"] > 0
    assert r["img_per_sec_total"] == pytest.approx(np * r["img_per_sec_per_rank"])
    # Throughput is all the timed images over all the timed steps' time (not the mean of the
    # steps' rates, which overstates uneven steps such as local SGD's averaging ones).
    assert r["img_per_sec_per_rank"] == pytest.approx(
        r["batch"] * r["accumulate"] * iterations / sum(r["step_time_s"]))
    # Gradients were averaged: every rank holds bitwise the same weights after the steps.
    assert r["weights_max_abs_diff"] == 0.0


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["horovod", "ddp"])
def test_bench_train_overlap_fp16(tmp_path, backend):
    r = _train(tmp_path, "--backend", backend, "--compression", "fp16", "--overlap", "on")
    _check_common(r, 2)
    assert (r["backend"], r["compression"], r["overlap"]) == (backend, "fp16", "on")
    assert r["allreduce_bytes_per_step"] == 2 * r["parameters"]  # half of fp32's 4 bytes
    if backend == "horovod":
        assert r["allreduce_wait_mean_s"] >= 0
        # CPU ranks get the project's measured cycle time unless the user exported one.
        assert r["env"]["HOROVOD_CYCLE_TIME"] == "10.0"
    else:  # DDP waits inside backward: not separable, reported as null
        assert r["allreduce_wait_mean_s"] is None


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["horovod", "ddp"])
def test_bench_train_no_overlap_accumulate(tmp_path, backend):
    r = _train(tmp_path, "--backend", backend, "--overlap", "off", "--accumulate", "2")
    _check_common(r, 2)
    assert r["accumulate"] == 2 and r["allreduce_bytes_per_step"] == 4 * r["parameters"]
    # Without overlap the whole allreduce is waited for after backward: strictly positive.
    assert r["allreduce_wait_mean_s"] > 0
    assert 0 < r["allreduce_wait_fraction"] < 1


@pytest.mark.mpi
def test_bench_train_powersgd_and_local_sgd_count_their_bytes(tmp_path):
    """PowerSGD rank 1 (from the first step) and local SGD every 2 steps report the payload
    their optimizers sent over the timed steps: PowerSGD's is exactly its P, Q and
    uncompressed tensors per step; local SGD's is one average of the parameters and BatchNorm
    statistics every 2 steps: fp32, or their change in fp16; overlapped, the same bytes in a
    slice a step."""
    from hvd_yolo.comm.powersgd import wire_elements
    from hvd_yolo.model.yolov3 import build_model

    model = build_model("yolov3-tiny", 3)
    ps = _train(tmp_path, "--compression", "powersgd", "--powersgd-rank", "1")
    _check_common(ps, 2)  # every rank applies the same update
    assert ps["allreduce_bytes_counted"] and ps["powersgd_rank"] == 1
    assert ps["allreduce_bytes_per_step"] == 4 * sum(wire_elements(p.shape, 1)
                                                     for p in model.parameters())
    assert ps["allreduce_bytes_per_step"] < ps["parameters"] / 10  # < 1/20 of fp16's bytes
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    # the weights; the change in fp16; the change in fp16, overlapped
    for compression, width, extra in (("none", 4, []), ("fp16", 2, []),
                                      ("fp16", 2, ["--local-overlap"])):
        local = _train(tmp_path, "--sync", "local", "--local-steps", "2",
                       "--compression", compression, *extra)
        assert local["allreduce_bytes_counted"] and local["local_steps"] == 2
        assert local["local_overlap"] == bool(extra)
        assert local["allreduce_bytes_per_step"] == width * (ps["parameters"] + buffers) / 2


@pytest.mark.mpi
def test_bench_train_one_rank(tmp_path):
    r = _train(tmp_path, "--threads", "1", np=1)
    _check_common(r, 1)
    assert r["allreduce_bytes_per_step"] == 0 and r["threads"]["intra_op"] == 1


@pytest.mark.mpi
def test_bench_allreduce(tmp_path):
    out = tmp_path / "ar.json"
    run_cli(["bench", "allreduce", "--models", "yolov3-tiny", "--classes", "3",
             "--sizes-kib", "4,256", "--dtypes", "fp32,fp16", "--seconds-per-case", "0.05",
             "--min-iterations", "2", "--max-iterations", "5", "--memcpy-mib", "8",
             "--fusion-threshold-mb", "1", "--json", str(out)], np=2, timeout=240)
    r = json.loads(out.read_text())
    assert r["env"]["HOROVOD_FUSION_THRESHOLD"] == str(2**20)
    assert r["benchmark"] == "allreduce" and r["world_size"] == 2
    assert r["memcpy_GBps"] > 0 and len(r["memcpy_GBps_per_rank"]) == 2
    cases = {(c["buffer"], c["dtype"]): c for c in r["cases"]}
    assert set(cases) == {(b, d) for b in ("yolov3-tiny gradients", "flat 4 KiB", "flat 256 KiB")
                          for d in ("fp32", "fp16")}
    grads32, grads16 = cases["yolov3-tiny gradients", "fp32"], cases["yolov3-tiny gradients", "fp16"]
    assert grads16["bytes"] * 2 == grads32["bytes"] and grads32["tensors"] > 10
    assert cases["flat 256 KiB", "fp32"]["bytes"] == cases["flat 256 KiB", "fp16"]["bytes"] == 262144
    for c in r["cases"]:
        assert c["iterations"] >= 2 and c["time_median_s"] > 0
        # 2 ranks: bus bandwidth = algorithm bandwidth * 2(n-1)/n = algorithm bandwidth
        assert c["busbw_GBps"] == pytest.approx(c["algbw_GBps"])
        assert c["busbw_vs_memcpy"] == pytest.approx(c["busbw_GBps"] / r["memcpy_GBps"])


def test_bench_memory_tiny_with_a_budget() -> None:
    """`hvd-yolo bench memory` (one process per configuration, no mpirun): every row measured,
    checkpointing compared with none, and the budget's answer is what its probes measured."""
    import subprocess

    from hvd_yolo.launch import hvd_yolo_argv

    budget_gb = 0.16
    proc = subprocess.run(hvd_yolo_argv(
        "bench", "memory", "--models", "yolov3-tiny", "--sizes", "64", "--checkpoint", "none,all",
        "--classes", "3", "--iterations", "1", "--threads", "1", "--budget-gb", str(budget_gb),
        "--max-batch", "2", "--json", "-"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)  # --json -: the JSON alone on stdout
    assert "bench memory: cpu" in proc.stderr
    rows = {row["checkpoint"]: row for row in r["rows"]}
    assert set(rows) == {"none", "all"} and r["benchmark"] == "memory"
    for row in rows.values():
        assert row["activation_peak_mb"] > 0 and row["img_per_sec"] > 0
        assert row["peak_per_rank_mb"] == pytest.approx(row["state_mb"] + row["activation_peak_mb"])
    assert "time_overhead" in rows["all"] and "activation_saving" in rows["all"]
    budget_mb = budget_gb * 1024
    for b in r["budget"]["largest_batch"]:
        probes = b["probes"]
        assert probes[0]["batch"] == 1
        for p in probes:
            assert p["fits"] == (p["peak_per_rank_mb"] is not None
                                 and p["peak_per_rank_mb"] <= budget_mb), p
        fitting = [p["batch"] for p in probes if p["fits"]]
        assert b["batch"] == max(fitting, default=0)
        if not b["capped"]:  # doubling, then bisection down to a neighbour that does not fit
            assert any(p["batch"] == b["batch"] + 1 and not p["fits"] for p in probes), probes


def test_bench_memory_refuses_a_size_by_name() -> None:
    import subprocess

    from hvd_yolo.launch import hvd_yolo_argv

    proc = subprocess.run(hvd_yolo_argv("bench", "memory", "--sizes", "320,100"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--sizes 100: input sizes must be positive multiples of 32" in proc.stderr
