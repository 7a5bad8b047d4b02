"""The scaling model: step time and efficiency of data-parallel training per communication mode.

Four inputs, each measured (``benchmarks/scaling_model.py`` and ``hvd-yolo plan`` measure them):

- ``alpha``: per-hop latency of a ring allreduce (a tiny allreduce across nodes: 2(n-1) hops);
- ``cycle``: Horovod's per-round overhead (cycle wait + negotiation), paid once per fused
  round, not per hop;
- ``bw``: the bytes per second one node's link carries during an allreduce;
- ``overlap``: the fraction of the gradient allreduce that backward hides when backward is long
  enough (from ``bench train`` with overlap on and off: 1 - wait_on / wait_off).

One more, measured from the same two runs: ``contention``, how much compute slows while a
transfer is in flight beside it (per second in flight: (compute_on - compute_off) / the
allreduce's time beside backward, wait_off or backward if shorter).
On CPU ranks the transfer's own work (Horovod's thread, the MPI and TCP stacks) shares the
compute's cores; on GPU nodes it runs on other cores and the model's projections take 0.

One allreduce of S bytes in R fused rounds on n nodes:
``t_ar = R (cycle + 2(n-1) alpha) + 2(n-1)/n S / bw``. A synchronous step (fp32, fp16) is
``compute + max((1 - overlap) t_ar, t_ar - backward)``: the part overlap cannot hide, or what
does not fit under backward. PowerSGD sends its P round from the backward hooks (overlapped like
the gradients) and its Q round after (never hidden), and adds its own compute. Local SGD does
no gradient collective; every k steps it averages the weights after the step (not hidden): each
rank's change in fp16 (``local_width`` 2, the default) or the fp32 weights (4), so each step
pays 1/k of it; overlapped (``local_overlap``, ``dist.local_overlap``) the average travels
during the next k steps' compute, and a step pays 1/k of what does not fit under it.
A transfer beside compute (a synchronous allreduce beside backward, PowerSGD's P round, the
overlapped average beside the next period) lengthens the compute by ``contention`` times the
seconds it is in flight there.
Hierarchical allreduce (g GPUs per node): reduce-scatter and
allgather inside the node at ``intra_bw``, the ring between nodes only, so the per-hop latency is
paid 2(n-1) times instead of 2(ng-1), and each node's link carries the gradient once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

MODES = ("fp32", "fp16", "powersgd", "local", "local_overlap", "fp16_hier")


@dataclass(frozen=True)
class Inputs:
    """What the model needs for one model on one cluster (seconds, bytes, bytes/s)."""

    compute_s: float  # forward + backward + update of one step on one GPU/rank
    backward_s: float  # the backward part of it
    params: int  # gradient numbers (fp32 bytes = 4 x params)
    batch: int  # images per GPU per step
    alpha_s: float  # per-hop latency
    cycle_s: float  # per fused round
    bw: float  # link bytes/s during an allreduce
    overlap: float  # fraction of the allreduce backward hides
    fusion_bytes: float = 128 * 2**20  # Horovod's fusion buffer: one round per this many bytes
    gpus_per_node: int = 1
    intra_bw: float = 100e9  # bytes/s inside a node (NVLink-class), hierarchical mode only
    powersgd_bytes: float = 0.0  # bytes per step at the chosen rank (P and Q rounds together)
    powersgd_compute_s: float = 0.0  # PowerSGD's own compute per step (QR, products)
    local_steps: int = 4
    local_width: int = 2  # bytes per number of local SGD's average (fp16 change; 4: fp32 weights)
    contention: float = 0.0  # compute's slowdown per second of transfer in flight beside it
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def allreduce_s(n: int, nbytes: float, rounds: int, alpha: float, cycle: float, bw: float) -> float:
    """One ring allreduce of ``nbytes`` over ``n`` participants in ``rounds`` fused rounds."""
    if n <= 1:
        return 0.0
    return rounds * (cycle + 2 * (n - 1) * alpha) + 2 * (n - 1) / n * nbytes / bw


def rounds_of(nbytes: float, fusion: float) -> int:
    return max(1, math.ceil(nbytes / fusion))


def overlap_of(wait_on: float, wait_off: float) -> float:
    """The share of the allreduce that backward hid, from the same steps run with overlap (their
    allreduce waited ``wait_on`` after backward) and without (``wait_off``); in [0, 1], and 0
    when nothing was waited for without overlap."""
    return min(1.0, max(0.0, 1 - wait_on / wait_off)) if wait_off > 0 else 0.0


def contention_of(compute_on: float, compute_off: float, wait_off: float,
                  backward: float) -> float:
    """Compute lost per second of allreduce in flight beside backward, from the same steps run
    with overlap (``compute_on``) and without (``compute_off``; its allreduce, after backward,
    waited ``wait_off``). At most 1, a whole core's worth: a short allreduce beside backward
    leaves the ratio mostly noise."""
    beside = min(wait_off, backward)
    return min(1.0, max(0.0, compute_on - compute_off) / beside) if beside > 0 else 0.0


def exposed_s(t_ar: float, backward: float, overlap: float) -> float:
    """What an allreduce started from backward's hooks adds to the step."""
    return max((1 - overlap) * t_ar, t_ar - backward, 0.0)


def ranks(x: Inputs, nodes: int) -> int:
    return nodes * x.gpus_per_node


def _flat(x: Inputs, nodes: int, nbytes: float, rounds: int) -> float:
    n = ranks(x, nodes)
    # With g GPUs per node and one link per node, a flat ring still carries the gradient once
    # per link (one ring hop enters and one leaves each node), but pays 2(ng-1) hops.
    return allreduce_s(n, nbytes, rounds, x.alpha_s, x.cycle_s, x.bw)


def _hier(x: Inputs, nodes: int, nbytes: float, rounds: int) -> float:
    g = x.gpus_per_node
    intra = 2 * (g - 1) / g * nbytes / x.intra_bw if g > 1 else 0.0
    return intra + allreduce_s(nodes, nbytes, rounds, x.alpha_s, x.cycle_s, x.bw)


def step_s(x: Inputs, nodes: int, mode: str) -> float:
    """Seconds per optimizer step on ``nodes`` nodes in ``mode`` (one of :data:`MODES`)."""
    if ranks(x, nodes) <= 1:
        return x.compute_s
    if mode in ("fp32", "fp16", "fp16_hier"):
        nbytes = x.params * (4 if mode == "fp32" else 2)
        rounds = rounds_of(nbytes, x.fusion_bytes)
        t_ar = (_hier if mode == "fp16_hier" else _flat)(x, nodes, nbytes, rounds)
        beside = x.contention * min(x.backward_s, t_ar)  # in flight beside backward
        return x.compute_s + beside + exposed_s(t_ar, x.backward_s, x.overlap)
    if mode == "powersgd":
        half = x.powersgd_bytes / 2  # P and Q rounds carry about the same numbers
        t_p = _flat(x, nodes, half, 1)
        t_q = _flat(x, nodes, half, 1)
        beside = x.contention * min(x.backward_s, t_p)
        return (x.compute_s + x.powersgd_compute_s + beside
                + exposed_s(t_p, x.backward_s, x.overlap) + t_q)
    if mode in ("local", "local_overlap"):
        nbytes = x.local_width * x.params
        t_avg = _flat(x, nodes, nbytes, rounds_of(nbytes, x.fusion_bytes))
        if mode == "local":  # after the step, nothing beside it
            return x.compute_s + t_avg / x.local_steps
        # Overlapped: in flight beside the next period's compute, which it slows; a step pays
        # 1/k of what does not fit under that period.
        period = x.local_steps * x.compute_s
        period += x.contention * min(period, t_avg)
        return max(period, t_avg) / x.local_steps
    raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")


def predict(x: Inputs, nodes: int, modes: tuple[str, ...] = MODES) -> dict[str, dict]:
    """Per mode: step time, img/s of the whole job, scaling efficiency against one GPU."""
    out = {}
    for mode in modes:
        if mode == "fp16_hier" and (x.gpus_per_node <= 1 or nodes <= 1):
            continue
        if mode == "powersgd" and x.powersgd_bytes <= 0:
            continue
        st = step_s(x, nodes, mode)
        out[mode] = {"step_s": st, "img_per_sec": ranks(x, nodes) * x.batch / st,
                     "efficiency": x.compute_s / st}
    return out


def recommend(pred: dict[str, dict], floor: float = 0.10) -> str:
    """The fastest mode, preferring exact synchronous modes unless another gains > ``floor``
    (PowerSGD and local SGD change the optimisation: fp16 is kept when they barely help)."""
    exact = [m for m in pred if m in ("fp16", "fp16_hier", "fp32")]
    best_exact = max(exact, key=lambda m: pred[m]["img_per_sec"]) if exact else None
    best = max(pred, key=lambda m: pred[m]["img_per_sec"])
    if best_exact and pred[best]["img_per_sec"] <= (1 + floor) * pred[best_exact]["img_per_sec"]:
        return best_exact
    return best


def powersgd_wire_elements(shape: tuple[int, ...], rank: int, min_ratio: float = 2.0) -> int:
    """Numbers one rank sends per step for a gradient of ``shape`` under PowerSGD at ``rank``
    (P and Q for a ``[out, in*k*k]`` matrix worth compressing, else the whole tensor)."""
    numel = math.prod(shape)
    if len(shape) < 2:
        return numel
    m, n = shape[0], numel // shape[0]
    if (m + n) * rank * min_ratio > m * n:
        return numel
    return (m + n) * rank


def with_link(x: Inputs, link_bps: float, link_fraction: float) -> Inputs:
    """The same inputs on another link rate (bytes/s = rate / 8 x the measured fraction)."""
    return replace(x, bw=link_bps / 8 * link_fraction)
