"""Sample order: a pure function of (seed, epoch, rank, world_size), shared by every loader.

Training: one permutation of all frames per (seed, epoch); it is cut to a multiple of
world_size so that every rank gets the same number of samples (the at most
world_size - 1 left-over frames of that epoch are dropped, and they differ from epoch to
epoch), then dealt round-robin. Each rank then drops its last incomplete batch.

Evaluation: frames in stored order, dealt round-robin, nothing dropped: every frame is
seen exactly once across ranks, and the last batch of a rank may be short.
"""
from __future__ import annotations

import numpy as np


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), 0x5EED]))
    return rng.permutation(n)


def shard_indices(n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                  train: bool = True) -> np.ndarray:
    """Row indices this rank reads in this epoch, in order."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if not train:
        return np.arange(rank, n, world_size)
    perm = epoch_permutation(n, seed, epoch)
    usable = (n // world_size) * world_size
    return perm[:usable][rank::world_size]


def split_rows(frames: int, rows=None, *, source: str = "rows") -> np.ndarray:
    """The cache rows a loader reads: all `frames` rows of the split, or the given subset
    (e.g. one fold), checked and in the given order. Sample order then permutes positions in
    this array, so a subset is shuffled, sharded and batched like a whole split."""
    if rows is None:
        return np.arange(frames, dtype=np.int64)
    chosen = np.asarray(rows, dtype=np.int64).reshape(-1)
    if chosen.size == 0:
        raise ValueError(f"{source}: empty")
    if chosen.min() < 0 or chosen.max() >= frames:
        raise ValueError(f"{source}: row {int(chosen.max() if chosen.max() >= frames else chosen.min())} "
                         f"is not in a split of {frames} frames")
    if len(np.unique(chosen)) != chosen.size:
        raise ValueError(f"{source}: rows repeat")
    return chosen


def batch_count(n: int, *, batch_size: int, rank: int = 0, world_size: int = 1,
                train: bool = True) -> int:
    """Batches this rank yields per epoch (train drops the last incomplete batch)."""
    per_rank = len(shard_indices(n, seed=0, epoch=0, rank=rank, world_size=world_size, train=train))
    return per_rank // batch_size if train else -(-per_rank // batch_size)
