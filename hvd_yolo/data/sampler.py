"""``ShardSampler``: rank-aware, deterministic per (seed, epoch), equal length on every rank.

Epoch ``e`` (``shuffle=True``):

1. permute the non-empty shards with ``seed + e`` (the same on every rank);
2. deal them to ranks, largest first (stable over that permutation), each to the rank holding
   the fewest samples so far: ranks read whole shards, with balanced counts;
3. shuffle each rank's samples (seed, epoch, rank);
4. equalise lengths: ``tail="pad"`` repeats a rank's own samples up to the longest rank (no
   sample is lost), ``tail="drop"`` cuts every rank to the shortest.

With fewer non-empty shards than ranks it falls back (with one warning per process) to striding
a global permutation of samples across ranks, padded or cut to a multiple of the world size.
``len()`` is the same on every rank. ``state_dict(consumed)`` / ``load_state_dict`` resume an epoch
exactly; ``worker_indices`` splits a rank's indices across DataLoader workers.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

TAILS = ("pad", "drop")
_warned: set[tuple[int, int]] = set()


class ShardSampler(Sampler[int]):
    """Global sample indices for one rank of ``world_size`` (indices follow ``shard_sizes``)."""

    def __init__(
        self,
        shard_sizes: Sequence[int],
        rank: int,
        world_size: int,
        seed: int = 0,
        shuffle: bool = True,
        tail: str = "pad",
    ) -> None:
        sizes = [int(s) for s in shard_sizes]
        if any(s < 0 for s in sizes):
            raise ValueError(f"shard sizes must be >= 0, got {sizes}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range for world size {world_size}")
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.shard_sizes = sizes
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.tail = tail
        self.epoch = 0
        self._offset = 0  # samples of this epoch already consumed (after a resume)
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_total = int(self._starts[-1])
        self.striding = sum(1 for s in sizes if s > 0) < world_size
        if self.striding and self.num_total and (len(sizes), world_size) not in _warned:
            _warned.add((len(sizes), world_size))
            warnings.warn(
                f"ShardSampler: {sum(1 for s in sizes if s > 0)} non-empty shards for "
                f"{world_size} ranks: falling back to sample striding across shards (each rank "
                f"reads from every shard); convert with --shards >= {world_size} to read whole "
                "shards per rank", RuntimeWarning, stacklevel=2)
        self._cache: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ the plan
    def assignment(self, epoch: int | None = None) -> list[list[int]] | None:
        """Shards dealt to each rank in ``epoch`` (None when striding)."""
        if self.striding:
            return None
        e = self.epoch if epoch is None else epoch
        nonempty = [s for s, n in enumerate(self.shard_sizes) if n > 0]
        if self.shuffle:
            order = [nonempty[i] for i in np.random.default_rng(self.seed + e)
                     .permutation(len(nonempty))]
        else:
            order = nonempty
        order.sort(key=lambda s: -self.shard_sizes[s])  # stable: ties keep the permuted order
        loads = [0] * self.world_size
        dealt: list[list[int]] = [[] for _ in range(self.world_size)]
        for s in order:
            r = min(range(self.world_size), key=lambda q: (loads[q], q))
            dealt[r].append(s)
            loads[r] += self.shard_sizes[s]
        return dealt

    def _rank_counts(self, epoch: int) -> list[int]:
        if self.striding:
            n, w = self.num_total, self.world_size
            return [(n + w - 1) // w if self.tail == "pad" else n // w] * w
        dealt = self.assignment(epoch)
        assert dealt is not None
        return [sum(self.shard_sizes[s] for s in d) for d in dealt]

    def epoch_length(self, epoch: int | None = None) -> int:
        """Samples per rank in a whole epoch (the same on every rank)."""
        counts = self._rank_counts(self.epoch if epoch is None else epoch)
        return max(counts) if self.tail == "pad" else min(counts)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's whole epoch (ignores a resume offset)."""
        e = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == e:
            return self._cache[1]
        out = self._striding(e) if self.striding else self._dealt(e)
        self._cache = (e, out)
        return out

    def _striding(self, e: int) -> np.ndarray:
        n, w = self.num_total, self.world_size
        perm = (np.random.default_rng(self.seed + e).permutation(n) if self.shuffle
                else np.arange(n))
        length = self.epoch_length(e)
        total = length * w
        if total > n:
            perm = np.resize(perm, total)  # repeats from the start
        return perm[:total][self.rank::w].astype(np.int64)

    def _dealt(self, e: int) -> np.ndarray:
        dealt = self.assignment(e)
        assert dealt is not None
        mine = [np.arange(self._starts[s], self._starts[s + 1]) for s in dealt[self.rank]]
        idx = np.concatenate(mine) if mine else np.zeros(0, np.int64)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, e, self.rank, 1])
            idx = idx[rng.permutation(len(idx))]
        length = self.epoch_length(e)
        if length > len(idx):
            idx = np.resize(idx, length)  # pad by repeating this rank's own samples
        return idx[:length].astype(np.int64)

    # ------------------------------------------------------------------ Sampler protocol
    def __len__(self) -> int:
        return max(0, self.epoch_length() - self._offset)

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self._offset:].tolist())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; keeps a loaded resume offset only for the loaded epoch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self._offset = 0
        self.epoch = int(epoch)

    def worker_indices(self, worker_id: int, num_workers: int) -> np.ndarray:
        """The part of this rank's remaining indices that DataLoader worker ``worker_id`` reads
        (strided, so the workers' outputs interleave back into the sampler's order)."""
        if num_workers < 1 or not 0 <= worker_id < num_workers:
            raise ValueError(f"worker {worker_id} is not in range for {num_workers} workers")
        return self.epoch_indices()[self._offset:][worker_id::num_workers]

    # ------------------------------------------------------------------ resume
    def state_dict(self, consumed: int = 0) -> dict[str, Any]:
        """State after ``consumed`` more samples of the current iteration (counted from the
        last ``set_epoch``/``load_state_dict``, so a resumed loop can count from zero again)."""
        if consumed < 0 or consumed > len(self):
            raise ValueError(f"consumed must be in 0..{len(self)}, got {consumed}")
        return {"epoch": self.epoch, "offset": self._offset + int(consumed), "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "shuffle": self.shuffle,
                "tail": self.tail, "num_total": self.num_total,
                "num_shards": len(self.shard_sizes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch after its consumed samples (same data, seed and ranks)."""
        for key, mine in (("seed", self.seed), ("world_size", self.world_size),
                          ("shuffle", self.shuffle), ("tail", self.tail),
                          ("num_total", self.num_total), ("num_shards", len(self.shard_sizes))):
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{mine!r}: resume with the same dataset, seed, world size and "
                                 "tail setting (or start the epoch afresh)")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if not 0 <= offset <= self.epoch_length(epoch):
            raise ValueError(f"sampler state offset {offset} exceeds the epoch length "
                             f"{self.epoch_length(epoch)}")
        self.epoch = epoch
        self._offset = offset

    def __repr__(self) -> str:
        mode = "striding" if self.striding else "shards"
        return (f"ShardSampler(rank={self.rank}/{self.world_size}, {self.num_total} samples in "
                f"{len(self.shard_sizes)} shards, {mode}, tail={self.tail}, epoch={self.epoch}, "
                f"len={len(self)})")
