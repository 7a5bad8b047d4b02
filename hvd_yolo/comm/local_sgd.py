"""Local SGD (hybrid synchronisation): each rank steps on its own gradients, and every
``local_steps`` optimizer steps one grouped allreduce averages the weights.

What is averaged: the parameters and the floating-point buffers (BatchNorm statistics), and,
with ``sync_momentum``, the optimizer's floating-point state (SGD momentum, AdamW moments).
For the first ``warmup_steps`` steps the gradients are averaged instead, every step, by one
grouped allreduce after backward (post-local SGD, Lin et al., ICLR 2020). Before a checkpoint
or an evaluation :meth:`LocalSGDSync.average_all` averages everything, the EMA included,
so a checkpoint always holds the one model every rank has. Gradient clipping clips each rank's
own gradient.

With ``compression=fp16`` (the default) an average sends each rank's change in fp16, not its
weights: the weights become the tensors every rank last held alike plus the average change.
A few steps' change is small, so fp16 rounds it to about 1e-3 of itself, where rounding the
weights would lose 1e-3 of the weights: half the bytes of an fp32 average, for a copy of the
model's tensors on each rank. "Held alike": after the last average or checkpoint, or at the
start of the run or of a new elastic world (:meth:`LocalSGDSync.start_at`, which the loop
calls right after the broadcast), so a resume continues exactly. The first average after a
gradient warm-up is fp32: the warm-up leaves each rank its own BatchNorm statistics.

With ``overlap`` (the delayed averaging of CoCoD-SGD, Shen et al., IJCAI 2019) an average
does not stop the ranks: at a period's end each rank starts the allreduce of its
change (fp16 or fp32) and goes on training; Horovod's background thread moves it during the
next period, in ``local_steps`` slices, one started after each step (that thread runs one
collective at a time: the step's own small ones would otherwise wait behind the whole
average). At that period's end the rank waits for it (by then long done where the period's
compute outlasts the transfer), adds the average change to the tensors held alike, and swaps
its own change for the average in its weights, keeping what it learned while the average was
on the wire. So each average lands one period late, and the ranks never hold the same weights
between checkpoints; :meth:`LocalSGDSync.average_all` first lands the one in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hvd_yolo.comm import horovod as dist
from hvd_yolo.comm.base import GradSync


def float_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's floating-point state tensors, in parameter order (momentum, moments)."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0:
                    out.append(value)
    return out


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and floating-point buffers (BatchNorm running statistics)."""
    return [p.data for p in model.parameters()] + [
        b for b in model.buffers() if b.is_floating_point()]


@dataclass
class InFlight:
    """An overlapped average on its way: this rank's change (flat, the model's dtype), the flat
    wire buffer averaged in place (fp16 or a copy), its slices not started yet, and the
    Horovod handles of those started (None once waited for)."""

    own: torch.Tensor
    wire: torch.Tensor
    unsent: list[torch.Tensor]
    handles: list[int | None]


class LocalSGDSync(GradSync):
    """Wraps a torch optimizer for ``dist.sync=local``; the loop calls ``synchronize()`` before
    the step and ``after_step()`` after it, on every rank."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                 local_steps: int = 4, warmup_steps: int = 0, sync_momentum: bool = False,
                 compression: str = "fp16", overlap: bool = False) -> None:
        super().__init__(optimizer)
        self.model, self.local_steps, self.warmup_steps = model, local_steps, warmup_steps
        self.sync_momentum, self.compression, self.overlap = sync_momentum, compression, overlap
        self.averages = 0  # weight averages taken (every rank)
        # compression=fp16 or overlap: the model's tensors every rank holds alike (after the
        # last average, or at start_at); None when there are none (the warm-up, a discarded step)
        self.start: list[torch.Tensor] | None = None
        self.in_flight: InFlight | None = None  # overlap: the average on its way

    def sends_change(self) -> bool:
        """Whether an average sends the change since the tensors held alike (not the weights)."""
        return self.compression == "fp16" or self.overlap

    def start_at(self, step: int) -> None:
        """The run's step; every rank holds the same tensors now (the loop calls this after the
        broadcast): the first change is from them, unless the warm-up comes first."""
        super().start_at(step)
        self.start, self.in_flight = None, None
        if self.sends_change() and step >= self.warmup_steps:
            self.start = [t.clone() for t in model_tensors(self.model)]

    def synchronize(self) -> None:
        """During the warm-up, average the gradients; afterwards each rank keeps its own."""
        if self.steps < self.warmup_steps:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            # Horovod: the warm-up's gradients averaged in one grouped allreduce
            dist.grouped_allreduce_(grads, "local_sgd.grads", self.compression)
            self.bytes_sent += sum(g.numel() for g in grads) * (
                2 if self.compression == "fp16" else 4)
        self.steps += 1

    def due(self) -> bool:
        """Whether the step just taken ends a local period (every rank decides the same)."""
        local = self.steps - self.warmup_steps
        return local > 0 and local % self.local_steps == 0

    def after_step(self) -> bool:
        """Average the weights if this step ends a local period; returns whether it did."""
        if not self.due():
            self._send_slice()  # overlap: the next slice of the average in flight
            return False
        momentum = float_state(self.optimizer) if self.sync_momentum else []
        if self.start is None:  # the weights (the first average after a warm-up: fp32)
            self._average(model_tensors(self.model) + momentum)
            if self.sends_change():  # the next average sends the change from here
                self.start = [t.clone() for t in model_tensors(self.model)]
        elif self.overlap:
            self._land_change()  # the last period's average, in flight since then
            self._send_change()  # this period's, landing at the next period's end
            if momentum:
                self._average(momentum)
        else:
            self._average_change()
            if momentum:
                self._average(momentum)
        self.averages += 1
        return True

    def settle(self) -> None:
        """Wait for the slices of the overlapped average started so far; their result stays in
        the wire buffer until the average lands, as it would have."""
        flight = self.in_flight
        if flight is None:
            return
        for i, handle in enumerate(flight.handles):
            if handle is not None:
                dist.wait(handle)  # Horovod: a slice every rank started at the same step
                flight.handles[i] = None

    def before_save(self, model: torch.nn.Module, ema: torch.nn.Module | None) -> None:
        """Every rank holds the same weights, buffers, optimizer state and EMA afterwards."""
        self.average_all(ema)

    def discard_step(self) -> None:
        """Also forget the last average: the elastic reset rolled the weights back to a
        commit (``start_at`` takes them, after the sync)."""
        super().discard_step()
        self.start, self.in_flight = None, None

    def comm_state_dict(self) -> dict[str, torch.Tensor]:
        # A checkpoint follows an average of everything: the count is all that is this rank's.
        return {"averages": torch.tensor(self.averages)}

    def load_comm_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averages = int(state["averages"])

    def reset_comm_state(self) -> None:
        self.averages, self.start, self.in_flight = 0, None, None

    def average_all(self, ema: torch.nn.Module | None = None) -> None:
        """Average the weights, buffers, optimizer state and ``ema``'s weights and buffers:
        before a checkpoint or an evaluation, so every rank holds the same model."""
        self._land_change()
        tensors = model_tensors(self.model) + float_state(self.optimizer)
        if ema is not None:
            tensors += [t for t in ema.state_dict().values() if t.is_floating_point()]
        self._average(tensors)
        self.averages += 1
        if self.start is not None:  # the next change is from here (as after a resume from it)
            for t, s in zip(model_tensors(self.model), self.start):
                s.copy_(t)

    def _average(self, tensors: list[torch.Tensor]) -> None:
        # Horovod: one grouped allreduce (fp32) averages all of them
        dist.grouped_allreduce_(tensors, "local_sgd.average", "none")
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)

    def _average_change(self) -> None:
        """The model's tensors = the last average + the ranks' average change since (fp16)."""
        tensors = model_tensors(self.model)
        change = [t - s for t, s in zip(tensors, self.start)]
        # Horovod: one grouped allreduce (fp16 on the wire) averages every rank's change
        dist.grouped_allreduce_(change, "local_sgd.change", self.compression)
        for t, s, c in zip(tensors, self.start, change):
            t.copy_(s + c)
            s.copy_(t)  # the next change is from here
        self.bytes_sent += sum(c.numel() for c in change) * 2

    def _send_change(self) -> None:
        """Start averaging this rank's change since the tensors held alike (its first slice
        now, one more after each following step); return at once."""
        tensors = model_tensors(self.model)
        own = torch.cat([(t - s).flatten() for t, s in zip(tensors, self.start)])
        wire = own.half() if self.compression == "fp16" else own.clone()
        self.in_flight = InFlight(own, wire, list(wire.chunk(self.local_steps)), [])
        self._send_slice()

    def _send_slice(self) -> None:
        """Start the next slice of the average in flight, if one is left."""
        flight = self.in_flight
        if flight is None or not flight.unsent:
            return
        part = flight.unsent.pop(0)
        # Horovod: one slice of the average, in place, started now: Horovod's background thread
        # runs one collective at a time, so the next step's own (the stop and non-finite
        # decision) queues behind this slice alone, not behind the whole average
        flight.handles.append(dist.allreduce_async_(part, f"local_sgd.change.{len(flight.handles)}"))
        self.bytes_sent += part.numel() * part.element_size()

    def _land_change(self) -> None:
        """The tensors held alike += the average change in flight; this rank's weights swap
        their own change for it (what the rank learned since stays). Nothing if none."""
        flight = self.in_flight
        if flight is None:
            return
        while flight.unsent:  # (an average of everything mid-period: the rest goes now)
            self._send_slice()
        self.settle()  # Horovod: the slices started since the period's end (every rank)
        self.in_flight = None
        average, at = flight.wire.to(flight.own.dtype), 0
        for t, s in zip(model_tensors(self.model), self.start):
            a = average[at:at + t.numel()].view_as(t)
            c = flight.own[at:at + t.numel()].view_as(t)
            s.add_(a)
            t.add_(a - c)
            at += t.numel()
