"""What every loader promises: `AugmentConfig` in, `Batch` out, built by `build_loader`.

This module must not import torch (nor a loader kind): DALI's source workers import it
(loaders/dali_pipeline.py), and a spawned worker would otherwise carry torch's few hundred MB
for nothing (tests/test_worker_imports.py, scripts/bench_worker_rss.py). `Batch` and `Loader` name
torch types in annotations only; the factory `build_loader` lives in loaders/factory.py (which
imports this module, never the other way round).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, NamedTuple, Protocol

from cache.errors import UserError
from loaders.order import split_rows

if TYPE_CHECKING:
    import numpy as np
    import torch

    from cache.reader import SplitInfo

# ImageNet statistics on the 0..255 scale: images are normalised as (x - MEAN) / STD.
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
IMAGE_PAD = 0      # images are padded with 0 before normalisation
MASK_PAD = 255     # masks are padded with the ignore index

LOADER_KINDS = ("dali", "torch")
MAX_CROP_TO_FRAME = 4  # a crop may overhang the frame (it is padded), but not absurdly


@dataclass(frozen=True)
class AugmentConfig:
    """One definition of the augmentation; both loader kinds honour every field.

    crop: output (h, w) of a training sample. scale: range of the random scale relative to
    the stored frame. brightness/contrast/saturation: factors drawn uniformly in
    [1 - v, 1 + v]; hue: shift in degrees drawn in [-v, v] (DALI's color_twist semantics).
    cat_max_ratio: if set, re-draw the crop window (up to cat_max_tries times) until no
    single class covers more than this share of it. eval_scale: validation frames are
    whole frames resized by this factor (masks stay at the stored resolution).
    """

    crop: tuple[int, int] = (640, 640)
    scale: tuple[float, float] = (0.5, 2.0)
    flip_prob: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 5.0
    cat_max_ratio: float | None = None
    cat_max_tries: int = 10
    eval_scale: float = 1.0

    def __post_init__(self):
        ch, cw = self.crop
        if ch < 1 or cw < 1:
            raise UserError(f"crop size must be positive, got {ch}x{cw}")
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise UserError(f"scale range must satisfy 0 < low <= high, got {lo}..{hi}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise UserError(f"flip probability must be in [0, 1], got {self.flip_prob}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(f"{name} jitter must be in [0, 1), got {value}")
        if not 0.0 <= self.hue <= 180.0:
            raise UserError(f"hue jitter must be in [0, 180] degrees, got {self.hue}")
        if self.cat_max_ratio is not None and not 0.0 < self.cat_max_ratio <= 1.0:
            raise UserError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        if not 0.0 < self.eval_scale <= 4.0:
            raise UserError(f"eval scale must be in (0, 4], got {self.eval_scale}")

    @classmethod
    def square(cls, res: int, **kw) -> "AugmentConfig":
        return cls(crop=(res, res), **kw)

    def no_jitter(self) -> "AugmentConfig":
        """The same geometry without colour changes (`train --no-jitter`; tests and benchmarks)."""
        return replace(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


class Batch(NamedTuple):
    """image float32 (B, 3, h, w) normalised, on the loader's device (in channels_last memory
    format when the loader was built with channels_last=True); mask int64 (B, h, w) on the
    loader's device, 255 = ignore, or None for a split without masks; rows int64 (B,) the cache
    rows, always on the host (bookkeeping never waits for the device).

    Evaluation batches (train=False) hold whole frames: the image resized by
    `AugmentConfig.eval_scale`, the mask at the stored resolution (never resized), so that
    metrics are computed at full resolution; upsample logits to the mask's size."""

    image: torch.Tensor
    mask: torch.Tensor | None
    rows: torch.Tensor


def check_request(cache_path: str, info: "SplitInfo", *, train: bool, batch_size: int,
                  aug: AugmentConfig, rank: int, world_size: int, rows=None) -> "np.ndarray":
    """Refuse loader arguments that cannot work, naming the option at fault (both kinds).
    Returns the cache rows the loader reads (all of the split, or the `rows` subset)."""
    try:
        chosen = split_rows(len(info), rows, source=f"rows of split {info.name!r}")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in a world of size {world_size} "
                        "(need 0 <= rank < world_size)")
    if train and not info.has_masks:
        raise UserError(f"{cache_path}: split {info.name!r} has no masks; it cannot be trained on")
    crop_h, crop_w = aug.crop
    if crop_h > MAX_CROP_TO_FRAME * info.height or crop_w > MAX_CROP_TO_FRAME * info.width:
        raise UserError(f"crop {crop_h}x{crop_w} is more than {MAX_CROP_TO_FRAME}x the frames of "
                        f"split {info.name!r} ({info.height}x{info.width}); choose a smaller crop")
    if train and len(chosen) // world_size < batch_size:
        most = max(1, len(chosen) // world_size)
        raise UserError(f"split {info.name!r} has {len(chosen)} frames to train on: too few for "
                        f"one training batch of {batch_size} on each of {world_size} rank(s); "
                        f"use --batch-size {most} or less")
    return chosen


def cores_per_rank() -> int:
    """The cores this process may use for loading: its CPU affinity, shared among the local
    ranks of a torchrun job (LOCAL_WORLD_SIZE), so that 8 ranks on 16 cores do not each start
    workers for all 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // local_ranks)


class Loader(Protocol):
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Batch]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def limit_epochs(self, batches: int) -> None: ...


def endless(loader: Loader, first_epoch: int = 0) -> Iterator[Batch]:
    """Batches across epoch boundaries (set_epoch first_epoch, first_epoch + 1, ...)."""
    epoch = first_epoch
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1

