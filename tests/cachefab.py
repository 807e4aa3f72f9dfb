"""Make small caches for tests directly from arrays, following the contract in cache/format.py.

Loader and training tests use this to get frames whose content they control (for example a
colour that encodes the class). Tests of the build itself go through `dataprep build`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

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


# -- reading loader output back against the class colours ---------------------------------
def blocky_source(split: str, row: int, height: int, width: int):
    """The stored (image, mask) of a blocky_cache row: row r holds the frame of seed base + r."""
    return blocky_frame(height, width, seed=(0 if split == "train" else 1000) + row)


def denormalise(images):
    """Normalised float images (B, 3, H, W) -> float pixels on 0..255: the inverse of
    loaders.colour.normalise, for reading loader output back in tests."""
    import torch

    from loaders.contract import MEAN, STD

    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return images.float() * std + mean


def class_from_colour(image) -> np.ndarray:
    """(3, h, w) normalised image tensor -> class of the nearest CLASS_COLOUR per pixel."""
    pixels = denormalise(image[None].cpu())[0].permute(1, 2, 0).numpy()
    dist = ((pixels[:, :, None, :] - CLASS_COLOURS[None, None].astype(np.float32)) ** 2).sum(-1)
    return dist.argmin(-1)


def interior(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood holds one label only (region borders eroded)."""
    h, w = mask.shape
    padded = np.pad(mask.astype(np.int32), radius, mode="edge")
    same = np.ones_like(mask, dtype=bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy:dy + h, dx:dx + w] == mask
    return same


def centre_nearest(in_size: int, out_size: int) -> np.ndarray:
    """Source index per output pixel of a nearest-neighbour resize (pixel centres)."""
    return np.minimum(((np.arange(out_size) + 0.5) * in_size / out_size).astype(int), in_size - 1)


def check_train_sample(image, mask: np.ndarray, p, frame_mask: np.ndarray) -> None:
    """One augmented sample of a blocky frame against its drawn parameters `p`: padding only
    bottom/right, image colours agree with the mask away from class borders, and the mask
    is the source window resized (nearest) and flipped."""
    valid = mask[:p.out_h, :p.out_w]
    assert (valid != 255).all()
    assert (mask[p.out_h:] == 255).all() and (mask[:, p.out_w:] == 255).all()
    colour_class = class_from_colour(image)[:p.out_h, :p.out_w]
    keep = interior(valid, radius=2)
    assert keep.sum() > 0.3 * keep.size
    assert np.array_equal(colour_class[keep], valid[keep])
    ys = centre_nearest(p.h, p.out_h) + p.y
    xs = centre_nearest(p.w, p.out_w) + p.x
    expected = frame_mask[ys[:, None], xs[None, :]]
    if p.flip:
        expected = expected[:, ::-1]
    # ties of the resize's float stepping may pick the neighbouring pixel on a few rows
    assert np.mean(expected == valid) > 0.98


def epoch_batches(loader, epoch: int = 0) -> list:
    loader.set_epoch(epoch)
    return list(loader)


# -- a built 4-frame cache and a private copy of it per test (tests of a cache's faults) ------
@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    from dataprep.synth import write_synthetic_tree

    root = tmp_path_factory.mktemp("raw") / "cityscapes"
    write_synthetic_tree(root, 4, height=128, width=256, seed=7)
    return root


@pytest.fixture(scope="module")
def built(small_tree, tmp_path_factory) -> Path:
    from dataprep.build import BuildOptions, build_cache

    out = tmp_path_factory.mktemp("built") / "cache"
    assert build_cache(BuildOptions(root=small_tree, out=out, workers=1)).exit_code == 0
    return out


@pytest.fixture
def cache(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "cache"))
