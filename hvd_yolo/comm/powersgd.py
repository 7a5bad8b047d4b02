"""PowerSGD gradient compression (Vogels et al., NeurIPS 2019) on Horovod allreduces, as a
:class:`~hvd_yolo.comm.base.GradSync` (``dist.compression=powersgd``).

Each compressible gradient (a conv weight viewed as ``M = [out, in*k*k]``) is sent as two
rank-``r`` factors instead of ``out*in*k*k`` numbers, with error feedback and a warm-started Q:

  M = grad + error                      (this rank's residual of the previous steps)
  P = M Q          -> allreduce (average)    started in the gradient's backward hook
  P = orthonormal basis of P (QR)       (identical on every rank: the same averaged P)
  Q = M^T P        -> allreduce (average)    at synchronize(), once every P has arrived
  M_hat = P Q^T    (the same on every rank: the update every rank applies)
  error = M - M_hat; Q is kept for the next step (warm start)

Tensors where rank r would not save at least ``MIN_RATIO`` x the bytes (biases, BatchNorm,
small convs) are averaged uncompressed (fp32), also started from their backward hooks. Before
``start_step`` every gradient is averaged whole, as in torch's PowerSGD hook
(``start_powerSGD_iter``), in ``warmup_compression``: fp16 by default (half the bytes of the
warm-up, which otherwise dominates a short run's communication), ``none`` for fp32.
Horovod's ``Compressor`` cannot keep per-tensor state or run two rounds, hence this GradSync
instead of ``hvd.DistributedOptimizer``. The error feedback is
this rank's own; it and Q are :meth:`PowerSGDSync.comm_state_dict`. With
AMP (CUDA) the factors and the error feedback are in the loss scale's units; a scale change
leaves the error one step in the old units.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from hvd_yolo.comm import horovod as dist
from hvd_yolo.comm.base import GradSync

MIN_RATIO = 2.0  # compress a matrix only where rank r sends at most half its elements


def matrix_shape(shape: torch.Size | tuple[int, ...], rank: int) -> tuple[int, int] | None:
    """``[out, in*k*k]`` for a tensor worth compressing at ``rank``; None to send it as is."""
    if len(shape) < 2:
        return None
    m = shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    if (m + n) * rank * MIN_RATIO > m * n:
        return None
    return m, n


def wire_elements(shape: torch.Size | tuple[int, ...], rank: int) -> int:
    """Numbers one rank sends for this gradient per compressed step (P and Q, or all of it)."""
    mn = matrix_shape(shape, rank)
    if mn is None:
        n = 1
        for d in shape:
            n *= d
        return n
    return (mn[0] + mn[1]) * rank


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis whose span holds the columns of ``p`` (reduced QR)."""
    return torch.linalg.qr(p, mode="reduced")[0]


class PowerSGDSync(GradSync):
    """Wraps a torch optimizer: backward hooks start each gradient's first round; call
    ``synchronize()`` on every rank once per optimizer step, then ``step()``."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named_parameters: Iterable[tuple[str, torch.nn.Parameter]], rank: int = 4,
                 start_step: int = 0, accumulate: int = 1, seed: int = 0,
                 warmup_compression: str = "fp16") -> None:
        super().__init__(optimizer)
        self.rank, self.start_step, self.accumulate = rank, start_step, accumulate
        self.warmup_compression = warmup_compression
        self.params = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.shapes = {n: matrix_shape(p.shape, rank) for n, p in self.params}
        self.q: dict[str, torch.Tensor] = {}
        self.error: dict[str, torch.Tensor] = {}
        self.passes: dict[str, int] = {n: 0 for n, _ in self.params}
        # name -> (handle, M or None, the tensor on the wire): this step's first round, in flight
        self.pending: dict[str, tuple[int, torch.Tensor | None, torch.Tensor]] = {}
        self.seed = seed
        self.index = {n: i for i, (n, _) in enumerate(self.params)}
        for name, p in self.params:
            p.register_post_accumulate_grad_hook(self._hook(name))

    def compressing(self) -> bool:
        return self.steps >= self.start_step

    def _hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            self.passes[name] += 1
            if self.passes[name] == self.accumulate:
                self._start(name, p)
        return hook

    def _initial_q(self, name: str, n: int, device: torch.device) -> torch.Tensor:
        """The same random Q on every rank (seeded by the run's seed and the tensor's index)."""
        g = torch.Generator().manual_seed(self.seed * 100003 + self.index[name])
        return orthonormalize(torch.randn(n, self.rank, generator=g)).to(device)

    def _start(self, name: str, p: torch.Tensor) -> None:
        """This gradient's first (or only) allreduce, started as soon as it is complete."""
        if p.grad is None:  # a parameter the loss did not reach: a zero gradient on every rank
            p.grad = torch.zeros_like(p)
        shape = self.shapes[name]
        if shape is None or not self.compressing():
            # Horovod: the whole gradient averaged, in place (fp32), or as an fp16 copy during
            # the warm-up with warmup_compression=fp16 (Horovod's fp16 compressor's cast)
            wire = p.grad
            if not self.compressing():
                wire = dist.compressor(self.warmup_compression).compress(p.grad)[0]
            self.pending[name] = (dist.allreduce_async_(wire, f"powersgd.grad.{name}"), None,
                                  wire)
            self.bytes_sent += wire.numel() * wire.element_size()
            return
        m = p.grad.reshape(shape).float()
        if name in self.error:
            m = m + self.error[name]
        if name not in self.q:
            self.q[name] = self._initial_q(name, shape[1], m.device)
        pm = m @ self.q[name]
        # Horovod: P = M Q averaged over ranks, started from the backward hook
        self.pending[name] = (dist.allreduce_async_(pm, f"powersgd.P.{name}"), m, pm)
        self.bytes_sent += pm.numel() * pm.element_size()

    def synchronize(self) -> None:
        """Finish the step's communication; afterwards every ``p.grad`` holds the update every
        rank applies (the average gradient, or PowerSGD's approximation of it)."""
        for name, p in self.params:  # gradients whose hook did not fire (unused parameters)
            if name not in self.pending:
                self._start(name, p)
        second = []
        for name, p in self.params:
            handle, m, pm = self.pending.pop(name)
            dist.wait(handle)  # Horovod: the first round (P, or the whole gradient)
            if m is None:
                if pm is not p.grad:  # the fp16 copy: back into the fp32 gradient
                    p.grad.copy_(pm)
                continue
            pm = orthonormalize(pm)
            qm = m.t() @ pm
            # Horovod: Q = M^T P averaged over ranks (needs the orthonormal P: second round)
            second.append((name, p, m, pm, qm, dist.allreduce_async_(qm, f"powersgd.Q.{name}")))
            self.bytes_sent += qm.numel() * qm.element_size()
        for name, p, m, pm, qm, handle in second:
            dist.wait(handle)  # Horovod: the second round
            approx = pm @ qm.t()
            # A non-finite gradient (an AMP overflow step, which the scaler skips; a NaN loss,
            # which stops the run) must not stay in the error feedback.
            error = m - approx
            self.error[name] = error if bool(torch.isfinite(error).all()) else torch.zeros_like(m)
            # Warm start: next step's Q is this one. A column of zeros (a zero gradient) would
            # stay zero, and a non-finite one spread: start that Q afresh (Q is the same on
            # every rank, so is this choice).
            norms = qm.norm(dim=0)
            self.q[name] = qm if bool((norms > 0).all() and torch.isfinite(norms).all()) else (
                self._initial_q(name, qm.shape[0], qm.device))
            p.grad.copy_(approx.reshape(p.grad.shape))
        for name in self.passes:
            self.passes[name] = 0
        self.steps += 1

    def discard_step(self) -> None:
        """Also drop the cut-short step's first-round allreduces and backward-pass counts: a
        stale handle would be waited for, and a count past ``accumulate`` would never start
        its gradient's allreduce (the ranks would hang in the next step)."""
        super().discard_step()
        self.pending.clear()
        for name in self.passes:
            self.passes[name] = 0

    def comm_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """This rank's error feedback and the warm-started Q (the same on every rank)."""
        return {"q": dict(self.q), "error": dict(self.error)}

    def load_comm_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        device = {n: p.device for n, p in self.params}
        self.q = {n: t.to(device[n]) for n, t in state["q"].items() if n in device}
        self.error = {n: t.to(device[n]) for n, t in state["error"].items() if n in device}

    def reset_comm_state(self) -> None:
        self.q, self.error = {}, {}
