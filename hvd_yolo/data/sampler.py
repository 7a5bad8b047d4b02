"""``ShardSampler``: rank-aware, deterministic per (seed, epoch), equal length on every rank.

Epoch ``e`` (``shuffle=True``):

1. cut every shard into contiguous blocks of ``block_size`` samples (fewer when the data is
   small: every rank gets at least ``MIN_BLOCKS_PER_RANK`` blocks' worth of samples);
2. permute the blocks with ``(seed, e)``, the same on every rank;
3. cut the permuted sequence into ``world_size`` contiguous parts whose sizes differ by at most
   one sample: each rank reads whole blocks plus parts of the two at its ends;
4. shuffle inside the rank's part with ``(seed, e, rank)``;
5. equalise lengths: ``tail="pad"`` repeats a rank's own samples (at most one per rank; a rank
   with no sample of its own, when there are fewer samples than ranks, borrows one),
   ``tail="drop"`` cuts every rank to the shortest (at most one sample per rank is left out).
   ``pad_to=m`` (with ``tail="pad"``) pads every rank's share on to a multiple of ``m``
   samples: with ``m`` = one optimizer step's samples no deal leaves a partial step to be
   cut, so the loop reads every sample (elastic runs; ``padded()`` counts the repeats read).

``shuffle=False`` (evaluation) gives rank ``r`` the ``r``-th contiguous part in index order.
``len()`` is the same on every rank, at any world size and shard sizes. ``EpochIndices`` turns
the indices into ``(epoch, index)`` pairs for the augmenting dataset.

Resume. ``state_dict(consumed)`` records the epoch, the samples each rank has read (``offset``)
and the world size; ``load_state_dict(state)`` continues it:

- on the same world size, exactly where it stopped;
- on another world size, the samples of that epoch the old world had not read (and would have
  read) are re-dealt the same way over the new world (blocks of the remaining samples, permuted,
  cut into equal parts); ``len()`` is then what is left of the epoch. Later epochs are dealt
  afresh. A chain of such resumes within one epoch is recorded in the state (``legs``: the
  world size, offset and ``pad_to`` of each earlier deal). A state of another ``pad_to`` is
  continued the same way (its deal becomes a leg).

For a caller that resumes on another world size::

    sampler.load_state_dict(saved)      # saved: state_dict() of any world size
    len(sampler)                        # samples left on this rank in the resumed epoch
    sampler.fraction_done()             # fraction of the epoch's samples already read
    sampler.unread(epoch, [(w_old, offset, pad_to)])  # sorted global indices not yet read
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from hvd_yolo.config import TAILS

BLOCK_SIZE = 32  # samples per block: a few dozen keeps reads shard-local and dealing balanced
MIN_BLOCKS_PER_RANK = 4  # smaller blocks when the data is small, so ranks' shares stay mixed


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
        block_size: int = BLOCK_SIZE,
        pad_to: int = 1,
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
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if pad_to < 1 or (pad_to > 1 and tail != "pad"):
            raise ValueError(f"pad_to must be >= 1 (and 1 unless tail='pad'), got {pad_to}")
        self.shard_sizes = sizes
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.tail = tail
        self.block_size = int(block_size)
        self.pad_to = int(pad_to)
        self.epoch = 0
        self._offset = 0  # samples of the current deal already read (after a resume)
        self._legs: list[tuple[int, int, int]] = []  # earlier deals: (world, offset, pad_to)
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_total = int(self._starts[-1])
        self._cache: tuple[tuple[Any, ...], np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ the deal
    def _length(self, n: int, world: int, pad_to: int) -> int:
        """Samples per rank when ``n`` samples are dealt to ``world`` ranks."""
        if self.tail == "drop":
            return n // world
        return -(-n // world) if pad_to == 1 else -(-n // (world * pad_to)) * pad_to

    def _order(self, pool: np.ndarray, world: int, epoch: int, leg: int) -> np.ndarray:
        """``pool`` (sorted global indices) as one sequence of permuted blocks."""
        n = len(pool)
        if not self.shuffle or n == 0:
            return pool
        block = max(1, min(self.block_size, n // (world * MIN_BLOCKS_PER_RANK)))
        # Blocks: runs of the pool inside one shard, cut every `block` samples.
        shard = np.searchsorted(self._starts, pool, side="right") - 1
        new_run = np.concatenate([[True], shard[1:] != shard[:-1]])
        run_start = np.flatnonzero(new_run)
        pos = np.arange(n) - np.repeat(run_start, np.diff(np.append(run_start, n)))
        block_id = np.cumsum(pos % block == 0) - 1
        # Permute the blocks (the same on every rank) and lay them out in that order.
        perm = np.random.default_rng([self.seed, epoch, leg, 0]).permutation(block_id[-1] + 1)
        slot = np.empty_like(perm)  # slot[b]: where block b goes in the permuted sequence
        slot[perm] = np.arange(len(perm))
        return pool[np.argsort(slot[block_id], kind="stable")]

    def _share(self, order: np.ndarray, world: int, rank: int, epoch: int, leg: int,
               pad_to: int) -> np.ndarray:
        """Rank ``rank``'s part of ``order``: contiguous, shuffled inside, padded or cut."""
        n = len(order)
        lo, hi = rank * n // world, (rank + 1) * n // world
        own = order[lo:hi]
        if self.shuffle:
            own = own[np.random.default_rng([self.seed, epoch, leg, 1, rank]).permutation(len(own))]
        length = self._length(n, world, pad_to)
        if len(own) < length:  # pad: repeat own samples; borrow one if there are none
            own = np.resize(own if len(own) else order[[rank % n]], length)
        return own[:length].astype(np.int64)

    def _all_shares(self, pool: np.ndarray, world: int, epoch: int, leg: int,
                    pad_to: int) -> list[np.ndarray]:
        order = self._order(pool, world, epoch, leg)
        return [self._share(order, world, r, epoch, leg, pad_to) for r in range(world)]

    def unread(self, epoch: int, legs: Sequence[Sequence[int]]) -> np.ndarray:
        """Sorted global indices of ``epoch`` not read after the deals ``legs`` =
        ``[(world_size, offset, pad_to), ...]`` (each re-deals what the previous left,
        ``offset`` samples read per rank; ``pad_to`` 1 when left out), that those deals would
        still have read (with ``tail="drop"`` the samples a deal cut are not included)."""
        pool = np.arange(self.num_total, dtype=np.int64)
        for leg, (world, offset, *pad) in enumerate(legs):
            if world < 1:
                raise ValueError(f"sampler state has a deal on {world} ranks")
            shares = self._all_shares(pool, int(world), epoch, leg, int(pad[0]) if pad else 1)
            if not 0 <= offset <= len(shares[0]):
                raise ValueError(f"sampler offset {offset} is outside the {len(shares[0])} "
                                 f"samples per rank of epoch {epoch} on {world} ranks")
            read = np.concatenate([s[:offset] for s in shares])
            pool = np.setdiff1d(np.concatenate([s[offset:] for s in shares]), read)
        return pool

    def _current(self) -> tuple[np.ndarray, np.ndarray]:
        """(pool, this rank's indices) of the current deal: the epoch, or what its legs left."""
        key = (self.epoch, tuple(self._legs))
        if self._cache is None or self._cache[0] != key:
            pool = self.unread(self.epoch, self._legs)
            leg = len(self._legs)
            order = self._order(pool, self.world_size, self.epoch, leg)
            mine = self._share(order, self.world_size, self.rank, self.epoch, leg, self.pad_to)
            self._cache = (key, pool, mine)
        return self._cache[1], self._cache[2]

    def padded(self, offset: int | None = None) -> int:
        """Repeated samples (``tail="pad"``) among the first ``offset`` samples of every rank's
        share of the current deal (``state_dict()["offset"]`` counts the same way; all of the
        deal when None), all ranks together: a rank's share is its own samples, then repeats."""
        pool, mine = self._current()
        n, world = len(pool), self.world_size
        read = len(mine) if offset is None else min(int(offset), len(mine))
        own = np.diff(np.arange(world + 1, dtype=np.int64) * n // world)
        return int(np.maximum(0, read - own).sum()) if self.tail == "pad" else 0

    def epoch_length(self, epoch: int | None = None) -> int:
        """Samples per rank in the current deal (the whole epoch unless resumed on another
        world size); the same on every rank. Another ``epoch`` gives a fresh epoch's length."""
        if epoch is not None and epoch != self.epoch:
            return self._length(self.num_total, self.world_size, self.pad_to)
        return len(self._current()[1])

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's indices of the current deal (ignores the resume offset); another
        ``epoch`` gives that epoch dealt afresh."""
        if epoch is not None and epoch != self.epoch:
            pool = np.arange(self.num_total, dtype=np.int64)
            order = self._order(pool, self.world_size, epoch, 0)
            return self._share(order, self.world_size, self.rank, epoch, 0, self.pad_to)
        return self._current()[1]

    def fraction_done(self, consumed: int = 0) -> float:
        """Fraction of the epoch's samples read, after ``consumed`` more on this rank."""
        if self.num_total == 0:
            return 0.0
        pool, mine = self._current()
        left = 1.0 - (self._offset + consumed) / len(mine) if len(mine) else 1.0
        return 1.0 - len(pool) / self.num_total * left

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
            self._legs = []
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ resume
    def state_dict(self, consumed: int = 0) -> dict[str, Any]:
        """State after ``consumed`` more samples of the current iteration (counted from the
        last ``set_epoch``/``load_state_dict``, so a resumed loop can count from zero again)."""
        if consumed < 0 or consumed > len(self):
            raise ValueError(f"consumed must be in 0..{len(self)}, got {consumed}")
        return {"epoch": self.epoch, "offset": self._offset + int(consumed), "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "shuffle": self.shuffle,
                "tail": self.tail, "num_total": self.num_total,
                "num_shards": len(self.shard_sizes), "block_size": self.block_size,
                "pad_to": self.pad_to, "legs": [list(leg) for leg in self._legs],
                "legs_epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch after its read samples (same data, seed and tail; on
        another world size the rest of the epoch is re-dealt over this one)."""
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle), ("tail", self.tail),
                          ("num_total", self.num_total), ("num_shards", len(self.shard_sizes)),
                          ("block_size", self.block_size)):
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{mine!r}: resume with the same dataset, seed, tail and block "
                                 "size (or start the epoch afresh)")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        world = int(state.get("world_size", self.world_size))
        pad_to = int(state.get("pad_to", 1))
        legs = [(int(w), int(o), int(p[0]) if p else 1) for w, o, *p in state.get("legs", [])]
        if state.get("legs_epoch", epoch) != epoch:
            legs = []  # legs of an earlier epoch (a state rewritten for the next epoch)
        if offset and "block_size" not in state:
            warnings.warn(f"sampler state from whole-shard dealing: epoch {epoch} goes on after "
                          f"{offset} samples per rank of the block deal, so some of its samples "
                          "may be read twice or not at all", RuntimeWarning, stacklevel=2)
        if world != self.world_size or pad_to != self.pad_to:  # another deal: it becomes a leg
            if offset:
                legs.append((world, offset, pad_to))
            offset = 0
        before = (self.epoch, self._legs, self._offset)
        self.epoch, self._legs, self._offset = epoch, legs, 0
        try:
            length = self.epoch_length()  # also checks the legs' offsets
            if not 0 <= offset <= length:
                raise ValueError(f"sampler state offset {offset} exceeds the epoch length "
                                 f"{length}")
        except ValueError:
            self.epoch, self._legs, self._offset = before
            raise
        self._offset = offset

    def __repr__(self) -> str:
        resumed = f", re-dealt after {self._legs}" if self._legs else ""
        pad = f", pad_to={self.pad_to}" if self.pad_to > 1 else ""
        return (f"ShardSampler(rank={self.rank}/{self.world_size}, {self.num_total} samples in "
                f"{len(self.shard_sizes)} shards, blocks of <= {self.block_size}, "
                f"tail={self.tail}{pad}, epoch={self.epoch}{resumed}, len={len(self)})")


class EpochIndices(Sampler):
    """Yields ``(epoch, index)`` pairs from a sampler of indices (see AugmentedDataset)."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
