"""Make small caches for tests directly from arrays, following the contract in cache/format.py.

Loader and training tests use this to get frames whose content they control (for example a
colour that encodes the class). Tests of the build itself go through `dataprep build`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from cache.writer import CacheWriter, RowWriter, SplitPlan, Storage

# A colour per trainId, far apart, so that a pixel's class can be read back from its colour.
CLASS_COLOURS = np.array(
    [[(i * 53) % 256, (i * 97 + 40) % 256, (i * 151 + 80) % 256] for i in range(19)], dtype=np.uint8
)


def blocky_frame(height: int, width: int, seed: int, block: int = 32):
    """(image, mask): blocks of random classes, each block in its class colour."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 19, size=(-(-height // block), -(-width // block)))
    mask = np.kron(classes, np.ones((block, block), dtype=np.int64))[:height, :width]
    mask = mask.astype(np.uint8)
    return CLASS_COLOURS[mask], mask


def write_cache(path: str | Path, splits: dict, tile: int = 128) -> Path:
    """splits: name -> (images uint8 (N,H,W,3), masks uint8 (N,H,W) or None, frame names).

    Written through cache.writer (as `dataprep build` writes), so the cache carries the same
    checksums, done flags and codec; whatever was at `path` before is replaced.
    """
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    writer = CacheWriter(path)
    storage = Storage(tile=tile)
    for name, (images, masks, frames) in splits.items():
        n, h, w, _ = images.shape
        writer.prepare_split(SplitPlan(name, tuple(frames), h, w, masks is not None), storage)
        rows = RowWriter(path, name)
        for row in range(n):
            checksums = rows.write_row(row, images[row], None if masks is None else masks[row])
            writer.record_row(name, row, checksums)
        assert writer.finish_split(name)
    return path


def blocky_cache(path: str | Path, n_train: int = 6, n_val: int = 3, height: int = 256,
                 width: int = 512, tile: int = 128) -> Path:
    """A cache with train and val splits of blocky class-coloured frames."""
    splits = {}
    for split, n, base in (("train", n_train, 0), ("val", n_val, 1000)):
        pairs = [blocky_frame(height, width, seed=base + i) for i in range(n)]
        images = np.stack([p[0] for p in pairs])
        masks = np.stack([p[1] for p in pairs])
        frames = [f"city{i % 2}/city{i % 2}_{i:06d}_000019" for i in range(n)]
        splits[split] = (images, masks, sorted(frames))
    return write_cache(path, splits, tile=tile)
