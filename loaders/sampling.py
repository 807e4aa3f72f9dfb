"""Per-sample augmentation parameters, drawn before any pixel is read.

`draw_train_sample` is a pure function of (seed, epoch, row, frame size, AugmentConfig),
so both loaders produce the same geometry and colour parameters for the same sample.
Crop before resize: we pick the scale, then the *source* window whose resized size is the
crop, and only that window is read from the cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from loaders.contract import AugmentConfig


@dataclass(frozen=True)
class SampleParams:
    row: int
    y: int              # source window in stored-frame pixels
    x: int
    h: int
    w: int
    out_h: int          # size the window is resized to (<= crop; the rest is padding)
    out_w: int
    flip: bool
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0    # degrees


def _window_1d(size: int, crop: int, scale: float) -> tuple[int, int]:
    """(source length, output length) along one axis."""
    want = max(1, round(crop / scale))
    if want <= size:
        return want, crop
    return size, min(crop, max(1, round(size * scale)))


def sample_rng(seed: int, epoch: int, row: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(row), 0xA06]))


def _accept(mask: np.ndarray, ratio: float, ignore_index: int) -> bool:
    """mmsegmentation's cat_max_ratio test: more than one class and none above `ratio`."""
    values, counts = np.unique(mask, return_counts=True)
    counts = counts[values != ignore_index]
    return len(counts) > 1 and counts.max() / counts.sum() < ratio


def draw_train_sample(seed: int, epoch: int, row: int, frame_hw: tuple[int, int],
                      aug: AugmentConfig, *, ignore_index: int = 255,
                      read_mask: Callable[[int, int, int, int], np.ndarray] | None = None
                      ) -> SampleParams:
    """Scale, window, flip and colour for one training sample.

    With `aug.cat_max_ratio` set and `read_mask(y, x, h, w)` given, the window is re-drawn
    (up to `aug.cat_max_tries` times, keeping the scale) until no class covers more than
    that share of it, as mmsegmentation's RandomCrop does.
    """
    rng = sample_rng(seed, epoch, row)
    height, width = frame_hw
    crop_h, crop_w = aug.crop
    scale = float(rng.uniform(*aug.scale))
    h, out_h = _window_1d(height, crop_h, scale)
    w, out_w = _window_1d(width, crop_w, scale)
    tries = aug.cat_max_tries if (aug.cat_max_ratio and read_mask is not None) else 1
    for _ in range(tries):
        y = int(rng.integers(0, height - h + 1))
        x = int(rng.integers(0, width - w + 1))
        if tries == 1 or _accept(read_mask(y, x, h, w), aug.cat_max_ratio, ignore_index):
            break
    flip = bool(rng.random() < aug.flip_prob)
    jitter = rng.uniform(-1.0, 1.0, size=4)
    return SampleParams(
        row=row, y=y, x=x, h=h, w=w, out_h=out_h, out_w=out_w, flip=flip,
        brightness=1.0 + aug.brightness * float(jitter[0]),
        contrast=1.0 + aug.contrast * float(jitter[1]),
        saturation=1.0 + aug.saturation * float(jitter[2]),
        hue=aug.hue * float(jitter[3]),
    )


def eval_sample(row: int, frame_hw: tuple[int, int], aug: AugmentConfig) -> SampleParams:
    """The whole frame, resized by `aug.eval_scale`, no flip, no colour change."""
    height, width = frame_hw
    out_h = max(1, round(height * aug.eval_scale))
    out_w = max(1, round(width * aug.eval_scale))
    return SampleParams(row=row, y=0, x=0, h=height, w=width, out_h=out_h, out_w=out_w, flip=False)
