"""The torch kind's worker side (module docstring of loaders/torch_loader.py): the Dataset that
reads a cache window per sample and resizes, flips and pads it on uint8 pixels, the sampler of
each epoch's batches, and the colour and normalisation that finish a batch on its device.
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from cache.reader import CacheReader, SplitInfo
from loaders.colour import clear_padding_, colour_twist_into, normalise_
from loaders.contract import IMAGE_PAD, MASK_PAD, AugmentConfig, Batch
from loaders.order import batch_count, shard_indices
from loaders.sampling import SampleParams, draw_train_sample, eval_sample


# -- geometry on uint8 pixels (runs in the workers) -----------------------------------------
@functools.lru_cache(maxsize=4096)
def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel, exactly as DALI's NN resize picks it.

    DALI walks the source in float32 from the centre of the first output pixel
    (x = scale / 2, then x += scale) and takes floor(x). Summing the same float32 steps in
    order reproduces it bit for bit, including the ties that an exact formula rounds the
    other way (measured against DALI 2.4: 300 random size pairs, no difference).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    steps = np.full(out_size, scale, dtype=np.float32)
    steps[0] = np.float32(0.5) * scale
    index = np.floor(np.cumsum(steps, dtype=np.float32)).astype(np.intp)
    return np.minimum(index, in_size - 1)


def resize_mask(mask: np.ndarray, out_h: int, out_w: int, flip: bool) -> np.ndarray:
    """Nearest-neighbour resize (and horizontal flip) by indexing: only source values survive."""
    rows = nearest_indices(mask.shape[0], out_h)
    cols = nearest_indices(mask.shape[1], out_w)
    if flip:
        cols = cols[::-1]
    return np.take(np.take(mask, rows, axis=0), cols, axis=1)  # 4x faster than mask[r, c]


def resize_image(image: np.ndarray, out_h: int, out_w: int) -> torch.Tensor:
    """uint8 (h, w, 3) -> uint8 (out_h, out_w, 3): bilinear, antialiased when shrinking.

    torch resizes channels-last uint8 directly (a SIMD path), so no float copy is made.
    """
    pixels = torch.from_numpy(image)
    if pixels.shape[:2] == (out_h, out_w):
        return pixels
    nchw = pixels.permute(2, 0, 1).unsqueeze(0)  # a channels-last view, not a copy
    resized = F.interpolate(nchw, size=(out_h, out_w), mode="bilinear", antialias=True,
                            align_corners=False)
    return resized[0].permute(1, 2, 0)


def new_tensor(shape: tuple[int, ...], dtype: torch.dtype, *, sent: bool = True) -> torch.Tensor:
    """An uninitialised tensor; made in shared memory when a worker process will send it.

    The DataLoader would otherwise copy every batch into shared memory to send it to the
    main process (the same trick as torch's default_collate).
    """
    if not sent or get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class WindowDataset(Dataset):
    """Item = one batch: key (epoch, rows) -> uint8 pixels, masks and colour parameters.

    Every random choice comes from `draw_train_sample(seed, epoch, row, ...)`, so a batch
    does not depend on which worker made it. With `finish_jitter` set (True/False: whether
    to jitter) the item is the finished Batch on the CPU instead; see TorchLoader.
    """

    def __init__(self, reader: CacheReader, info: SplitInfo, aug: AugmentConfig, *,
                 train: bool, seed: int, finish_jitter: bool | None = None,
                 channels_last: bool = False):
        self.reader, self.info, self.aug = reader, info, aug
        self.channels_last = channels_last
        self.train, self.seed, self.finish_jitter = train, seed, finish_jitter
        self._drawn_masks: dict[int, tuple] = {}  # row -> (window, mask) of cat_max_ratio

    def __len__(self) -> int:  # number of frames; items are keyed by (epoch, rows)
        return len(self.info)

    def __getitem__(self, key: tuple[int, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        epoch, rows = key
        self._drawn_masks = {}
        params = [self._params(epoch, row) for row in rows]
        if self.train:
            out_h, out_w = self.aug.crop
        else:
            out_h, out_w = params[0].out_h, params[0].out_w
        batch, sent = len(rows), self.finish_jitter is None  # else finished here, then sent
        images = new_tensor((batch, out_h, out_w, 3), torch.uint8, sent=sent).fill_(IMAGE_PAD)
        mask_hw = (out_h, out_w) if self.train else (self.info.height, self.info.width)
        masks = (new_tensor((batch, *mask_hw), torch.uint8, sent=sent).fill_(MASK_PAD)
                 if self.info.has_masks else None)
        for i, sample in enumerate(params):
            self._fill(sample, images[i], None if masks is None else masks[i])
        item = {
            "image": images,
            "rows": torch.tensor(rows, dtype=torch.int64),
            "valid_hw": torch.tensor([[p.out_h, p.out_w] for p in params], dtype=torch.int64),
            "colour": torch.tensor([[p.brightness, p.contrast, p.saturation, p.hue]
                                    for p in params], dtype=torch.float32),
        }
        if masks is not None:
            item["mask"] = masks
        if self.finish_jitter is not None:
            return finish_on_device(item, torch.device("cpu"), jitter=self.finish_jitter,
                                    channels_last=self.channels_last)
        return item

    def _params(self, epoch: int, row: int) -> SampleParams:
        frame_hw = (self.info.height, self.info.width)
        if not self.train:
            return eval_sample(row, frame_hw, self.aug)
        read_mask = None
        if self.aug.cat_max_ratio is not None:
            def read_mask(y: int, x: int, h: int, w: int) -> np.ndarray:
                window = self.reader.read_mask_window(self.info.name, row, y, x, h, w)
                self._drawn_masks[row] = ((y, x, h, w), window)  # the last one is the accepted one
                return window

        return draw_train_sample(self.seed, epoch, row, frame_hw, self.aug,
                                 ignore_index=self.reader.ignore_index, read_mask=read_mask)

    def _fill(self, p: SampleParams, image_out: torch.Tensor, mask_out: torch.Tensor | None):
        """Read the window, resize, flip, and write it into the top-left of the padded outputs."""
        split = self.info.name
        window = (p.row, p.y, p.x, p.h, p.w)
        image = self.reader.read_image_window(split, *window)
        resized = resize_image(image, p.out_h, p.out_w)
        image_out[:p.out_h, :p.out_w] = resized.flip(1) if p.flip else resized
        if mask_out is None:
            return
        drawn_window, mask = self._drawn_masks.get(p.row, (None, None))
        if drawn_window != (p.y, p.x, p.h, p.w):  # not read already by cat_max_ratio
            mask = self.reader.read_mask_window(split, *window)
        if self.train:
            mask = resize_mask(mask, p.out_h, p.out_w, p.flip)
        # Evaluation masks stay at the stored resolution: metrics are taken at full size.
        mask_out[:mask.shape[0], :mask.shape[1]] = torch.from_numpy(mask)


class EpochBatches(Sampler):
    """An endless stream of (epoch, rows) batches of this rank, epoch after epoch.

    Batches come from `loaders.order.shard_indices`; the stream starts at `first_epoch`.
    It never ends so that the workers prefetch across an epoch boundary instead of idling
    while a new epoch starts; `TorchLoader` cuts it into epochs of `len()` batches.
    """

    def __init__(self, rows: np.ndarray, *, batch_size: int, seed: int, rank: int,
                 world_size: int, train: bool):
        self.rows, self.frames = rows, len(rows)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.train = rank, world_size, train
        self.first_epoch = 0
        self.per_epoch = batch_count(self.frames, batch_size=batch_size, rank=rank,
                                     world_size=world_size, train=train)

    def epoch_batches(self, epoch: int) -> list[tuple[int, tuple[int, ...]]]:
        order = self.rows[shard_indices(self.frames, seed=self.seed, epoch=epoch, rank=self.rank,
                                        world_size=self.world_size, train=self.train)]
        return [(epoch, tuple(int(r) for r in order[start:start + self.batch_size]))
                for start in range(0, self.per_epoch * self.batch_size, self.batch_size)]

    def __iter__(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        epoch = self.first_epoch
        while True:
            yield from self.epoch_batches(epoch)
            epoch += 1


_SCRATCH: dict[str, torch.Tensor] = {}  # per process: one float scratch, grown as needed


def host_scratch(numel: int) -> torch.Tensor:
    """A float32 CPU buffer of at least `numel` elements, reused by this process (a worker
    finishing batches on the CPU): fresh batch-sized tensors cost more in page faults than
    the arithmetic on them."""
    buffer = _SCRATCH.get("cpu")
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH["cpu"] = torch.empty(numel, dtype=torch.float32)
    return buffer


def finish_on_device(item: dict[str, torch.Tensor], device: torch.device, *, jitter: bool,
                     channels_last: bool = False) -> Batch:
    """uint8 host batch -> normalised float Batch on `device` (colour jitter when asked).

    Whole-batch operations only (no loop over samples) and no host-device synchronisation:
    copies are non_blocking from the pinned host batch, constants are cached per device, and
    `rows` stay on the host. One float tensor is made per batch and everything else happens
    in place. On the CPU (in a worker) the outputs are made in shared memory, ready to be sent.
    """
    on_cpu = device.type == "cpu"
    non_blocking = not on_cpu
    pixels = item["image"].to(device, non_blocking=non_blocking)  # (B, H, W, 3) uint8
    batch, height, width, _ = pixels.shape
    if on_cpu:
        image = new_tensor((batch, height, width, 3) if channels_last else (batch, 3, height, width),
                           torch.float32)
    else:
        image = torch.empty((batch, height, width, 3) if channels_last else (batch, 3, height, width),
                            dtype=torch.float32, device=device)
    if channels_last:  # NHWC memory seen as NCHW: the layout the model's convolutions prefer
        image = image.permute(0, 3, 1, 2)
    if jitter:
        colour = item["colour"].to(device, non_blocking=non_blocking)
        valid_hw = item["valid_hw"].to(device, non_blocking=non_blocking)
        scratch = host_scratch(pixels.numel()) if on_cpu else None
        colour_twist_into(image, pixels, colour, scratch=scratch)
        clear_padding_(image, valid_hw)
    else:
        image.copy_(pixels.permute(0, 3, 1, 2))  # to float (and to the layout) in one pass
    normalise_(image)
    mask = item.get("mask")
    if mask is not None:
        if on_cpu:
            mask = new_tensor(tuple(mask.shape), torch.int64).copy_(mask)
        else:
            mask = mask.to(device, non_blocking=True).long()
    return Batch(image=image, mask=mask, rows=item["rows"])
