"""The PNG baseline: how seed projects load Cityscapes, kept only to measure what we beat.

A torch Dataset over the raw tree: every sample decodes the full 2048x1024 leftImg8bit PNG
and its `_gtFine_labelIds.png` (mapped to trainIds with a LUT; a `_gtFine_trainIds.png` is
used when there is no labelIds file) with PIL, scales the *whole* frame, pads, crops a
random window, flips, applies a torchvision-style ColorJitter, and converts to a
normalised float tensor, all in DataLoader workers on the CPU. This is the work the cache
and the on-device loaders avoid; do not train with it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from cache.errors import UserError
from cache.format import IGNORE_INDEX
from cache.labels import LABELID_TO_TRAINID
from loaders.contract import IMAGE_PAD, MASK_PAD, MEAN, STD, AugmentConfig, Batch
from loaders.order import shard_indices
from loaders.sampling import sample_rng
from loaders.torch_loader import default_num_workers

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_trainIds.png"


def find_pairs(root: str | os.PathLike, split: str) -> list[tuple[Path, Path, bool]]:
    """(image, label png, is_label_ids) per frame of a split, sorted by frame name."""
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise UserError(f"{image_dir}: no such folder; --root must hold leftImg8bit/{split}/")
    pairs = []
    for image in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}")):
        stem = image.name[:-len(IMAGE_SUFFIX)]
        label_dir = root / "gtFine" / split / image.parent.name
        if (label_dir / f"{stem}{LABEL_IDS_SUFFIX}").is_file():
            pairs.append((image, label_dir / f"{stem}{LABEL_IDS_SUFFIX}", True))
        elif (label_dir / f"{stem}{TRAIN_IDS_SUFFIX}").is_file():
            pairs.append((image, label_dir / f"{stem}{TRAIN_IDS_SUFFIX}", False))
        else:
            raise UserError(f"{label_dir}: no {stem}{LABEL_IDS_SUFFIX} (nor {TRAIN_IDS_SUFFIX}) "
                            f"for {image.name}")
    if not pairs:
        raise UserError(f"{image_dir}: no *{IMAGE_SUFFIX} images")
    return pairs


def colour_jitter(image, rng: np.random.Generator, aug: AugmentConfig):
    """torchvision's ColorJitter on a PIL image: each factor drawn, applied in random order."""
    ops = [
        (aug.brightness, lambda im, v: TF.adjust_brightness(im, 1.0 + v * aug.brightness)),
        (aug.contrast, lambda im, v: TF.adjust_contrast(im, 1.0 + v * aug.contrast)),
        (aug.saturation, lambda im, v: TF.adjust_saturation(im, 1.0 + v * aug.saturation)),
        (aug.hue, lambda im, v: TF.adjust_hue(im, v * aug.hue / 360.0)),  # degrees -> turns
    ]
    draws = rng.uniform(-1.0, 1.0, size=len(ops))
    for index in rng.permutation(len(ops)):
        strength, apply = ops[index]
        if strength > 0:
            image = apply(image, float(draws[index]))
    return image


class PngDataset(Dataset):
    """Item (epoch, index) -> (image float (3, h, w) normalised, mask int64 (h, w), index)."""

    def __init__(self, pairs: list[tuple[Path, Path, bool]], aug: AugmentConfig, seed: int):
        self.pairs, self.aug, self.seed = pairs, aug, seed
        self.lut = LABELID_TO_TRAINID
        self.mean = torch.tensor(MEAN).view(3, 1, 1) / 255.0
        self.std = torch.tensor(STD).view(3, 1, 1) / 255.0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image_path, label_path, is_label_ids = self.pairs[index]
        image = Image.open(image_path).convert("RGB")
        label = np.asarray(Image.open(label_path))
        label = Image.fromarray(self.lut[label] if is_label_ids else label)
        rng = sample_rng(self.seed, epoch, index)
        image, label = self._geometry(image, label, rng)
        image = colour_jitter(image, rng, self.aug)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        pixels = pixels.permute(2, 0, 1).float().div_(255.0)  # ToTensor
        pixels = (pixels - self.mean) / self.std
        return pixels, torch.from_numpy(np.asarray(label, dtype=np.int64)), index

    def _geometry(self, image, label, rng: np.random.Generator):
        """Scale the whole frame, pad to the crop, crop a random window, maybe flip."""
        scale = rng.uniform(*self.aug.scale)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.BILINEAR)
        label = label.resize(size, Image.NEAREST)
        crop_h, crop_w = self.aug.crop
        if image.width < crop_w or image.height < crop_h:
            padded_size = (max(image.width, crop_w), max(image.height, crop_h))
            padded_image = Image.new("RGB", padded_size, (IMAGE_PAD,) * 3)
            padded_image.paste(image, (0, 0))
            padded_label = Image.new("L", padded_size, MASK_PAD)
            padded_label.paste(label, (0, 0))
            image, label = padded_image, padded_label
        y = int(rng.integers(0, image.height - crop_h + 1))
        x = int(rng.integers(0, image.width - crop_w + 1))
        box = (x, y, x + crop_w, y + crop_h)
        image, label = image.crop(box), label.crop(box)
        if rng.random() < self.aug.flip_prob:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            label = label.transpose(Image.FLIP_LEFT_RIGHT)
        return image, label


class _EpochSamples(Sampler):
    """(epoch, index) keys in the shared seeded order, whole batches only.

    One pass covers `repeat` consecutive epochs: a benchmark over a handful of frames uses
    it so that the workers' refill at every epoch start (which a real 2975-frame epoch
    hides) does not dominate.
    """

    def __init__(self, frames: int, batch_size: int, seed: int, repeat: int):
        self.frames, self.batch_size, self.seed = frames, batch_size, seed
        self.repeat, self.epoch = repeat, 0

    def __len__(self) -> int:
        return self.repeat * (self.frames // self.batch_size) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        keys = []
        for epoch in range(self.epoch * self.repeat, (self.epoch + 1) * self.repeat):
            order = shard_indices(self.frames, seed=self.seed, epoch=epoch)
            usable = (self.frames // self.batch_size) * self.batch_size
            keys += [(epoch, int(i)) for i in order[:usable]]
        return iter(keys)


class PngLoader:
    """Training batches (Batch on the CPU) from PNG files; `len()` and `set_epoch` as usual."""

    def __init__(self, root: str | os.PathLike, split: str, *, batch_size: int,
                 aug: AugmentConfig, seed: int = 0, num_workers: int | None = None,
                 repeat: int = 1):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if repeat < 1:
            raise UserError(f"repeat must be at least 1, got {repeat}")
        pairs = find_pairs(root, split)
        if len(pairs) < batch_size:
            raise UserError(f"{root}: split {split!r} has {len(pairs)} frames, fewer than "
                            f"one batch of {batch_size}")
        if num_workers is None:
            num_workers = default_num_workers()
        self.num_workers = num_workers
        self.samples = _EpochSamples(len(pairs), batch_size, seed, repeat)
        self._loader = DataLoader(
            PngDataset(pairs, aug, seed), batch_size=batch_size, sampler=self.samples,
            drop_last=True, num_workers=num_workers, persistent_workers=num_workers > 0)

    def set_epoch(self, epoch: int) -> None:
        self.samples.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[Batch]:
        for image, mask, rows in self._loader:
            yield Batch(image=image, mask=mask, rows=rows)


def build_png_loader(root: str | os.PathLike, split: str, *, batch_size: int,
                     aug: AugmentConfig, seed: int = 0, num_workers: int | None = None,
                     repeat: int = 1) -> PngLoader:
    """The seed-project loader over the raw tree (for benchmarks only; see the module doc).

    set_epoch(e) with repeat=r makes one pass over epochs e*r .. e*r + r - 1."""
    return PngLoader(root, split, batch_size=batch_size, aug=aug, seed=seed,
                     num_workers=num_workers, repeat=repeat)
