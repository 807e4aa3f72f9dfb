"""Make small caches for tests directly from arrays, following the contract in cache/format.py.

Loader and training tests use this to get frames whose content they control (for example a
colour that encodes the class). Tests of the build itself go through `dataprep build`.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import zarr

from cache.format import CHECKSUMS, DONE, IMAGES, MASKS, ROOT_ATTRS

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
    """splits: name -> (images uint8 (N,H,W,3), masks uint8 (N,H,W) or None, frame names)."""
    root = zarr.open_group(str(path), mode="w")
    root.attrs.update(ROOT_ATTRS)
    for name, (images, masks, frames) in splits.items():
        n, h, w, _ = images.shape
        group = root.create_group(name)
        group.attrs.update({"frames": list(frames), "complete": False})
        im = group.create_array(IMAGES, shape=images.shape, chunks=(1, tile, tile, 3), dtype="uint8",
                                fill_value=0)
        im[:] = images
        sums = np.zeros((n, 2), dtype=np.uint32)
        sums[:, 0] = [zlib.crc32(np.ascontiguousarray(images[i]).tobytes()) for i in range(n)]
        if masks is not None:
            mk = group.create_array(MASKS, shape=masks.shape, chunks=(1, tile, tile), dtype="uint8",
                                    fill_value=255)
            mk[:] = masks
            sums[:, 1] = [zlib.crc32(np.ascontiguousarray(masks[i]).tobytes()) for i in range(n)]
        group.create_array(CHECKSUMS, shape=(n, 2), chunks=(1, 2), dtype="uint32", fill_value=0)[:] = sums
        group.create_array(DONE, shape=(n,), chunks=(1,), dtype="uint8", fill_value=0)[:] = 1
        group.attrs["complete"] = True
    return Path(path)


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
