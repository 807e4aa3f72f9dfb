"""The PyTorch loader kind: DataLoader workers read cache windows, the device does the colour.

Per training sample a worker draws the parameters (`loaders.sampling.draw_train_sample`,
the same ones the DALI kind draws), reads only the source window from the cache, resizes
it to (out_h, out_w) on uint8 pixels (image: bilinear, antialiased when shrinking, like
DALI's linear resize; mask: DALI's nearest-neighbour sampling, no antialiasing), flips it,
and pads it at the bottom/right to the crop size (image 0, mask 255). Each worker makes a
whole batch. For a GPU it sends the batch as uint8 (pinned, then copied), and the colour
jitter (`loaders.colour`, DALI's `color_twist` semantics) and normalisation run on the GPU.
For a CPU device the workers are the device: they jitter and normalise the batch
themselves, in parallel and in shared memory, so that the main process (which runs the
model there) does no per-pixel work.

Evaluation batches hold whole frames: the image resized by `aug.eval_scale`, the mask at
the stored resolution (never resized), so that metrics are computed at full resolution.
"""
from __future__ import annotations

import functools
import os
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from cache.errors import UserError
from cache.reader import CacheReader, SplitInfo
from loaders.colour import colour_twist_, normalise_
from loaders.contract import IMAGE_PAD, MASK_PAD, AugmentConfig, Batch, check_request
from loaders.order import batch_count, shard_indices
from loaders.sampling import SampleParams, draw_train_sample, eval_sample



def default_num_workers() -> int:
    """One worker per core, at most 4: more only adds memory once the device is fed."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


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
                 train: bool, seed: int, finish_jitter: bool | None = None):
        self.reader, self.info, self.aug = reader, info, aug
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
            return finish_on_device(item, torch.device("cpu"), jitter=self.finish_jitter)
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


def finish_on_device(item: dict[str, torch.Tensor], device: torch.device, *,
                     jitter: bool) -> Batch:
    """uint8 host batch -> normalised float Batch on `device` (colour jitter when asked).

    One float tensor is made per batch and everything else happens in place: on a CPU
    device, fresh batch-sized tensors cost more in page faults than the arithmetic. On the
    CPU (in a worker) the outputs are made in shared memory, ready to be sent.
    """
    def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if device.type == "cpu":
            return new_tensor(shape, dtype)
        return torch.empty(shape, dtype=dtype, device=device)

    non_blocking = device.type == "cuda"
    pixels = item["image"].to(device, non_blocking=non_blocking)  # (B, H, W, 3) uint8
    batch, height, width, _ = pixels.shape
    image = empty((batch, 3, height, width), torch.float32)
    image.copy_(pixels.permute(0, 3, 1, 2))  # to float and to channels-first in one pass
    if jitter:
        colour = item["colour"].to(device, non_blocking=non_blocking)
        colour_twist_(image, colour[:, 0], colour[:, 1], colour[:, 2], colour[:, 3])
        clear_padding_(image, item["valid_hw"].tolist())
    normalise_(image)
    mask = item.get("mask")
    if mask is not None:
        mask = mask.to(device, non_blocking=non_blocking)
        mask = empty(tuple(mask.shape), torch.int64).copy_(mask)
    return Batch(image=image, mask=mask, rows=item["rows"].to(device))


def clear_padding_(images: torch.Tensor, valid_hw: list[list[int]]) -> None:
    """Zero each sample's padding (outside its top-left out_h x out_w window) in place.

    Padding must stay 0 before normalisation, but the colour twist moves 0 (contrast pulls
    it towards grey), so the padded area is cleared again after the twist.
    """
    for image, (out_h, out_w) in zip(images, valid_hw):
        image[:, out_h:, :] = 0
        image[:, :out_h, out_w:] = 0


class TorchLoader:
    """Batches of a cache split from DataLoader workers; see the module docstring.

    Train: order from `shard_indices(seed, epoch, rank, world_size)`, last incomplete batch
    dropped, `set_epoch` reshuffles. Eval (train=False): whole frames, image resized by
    `aug.eval_scale`, mask at the stored resolution (not resized), stored order, every frame
    exactly once across ranks, the last batch may be short.

    The workers' stream runs on from one epoch into the next, so iterating epochs e, e+1,
    ... in turn never waits for a refill; any other move (another epoch, an epoch left
    half-way) restarts the stream at the asked epoch.
    """

    def __init__(self, cache: str | os.PathLike, split: str, *, train: bool, batch_size: int,
                 aug: AugmentConfig, device: str | torch.device = "cpu", seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int | None = None, rows=None):
        self.reader = CacheReader(cache)
        self.info = self.reader.split(split)
        self.rows = check_request(self.reader.path, self.info, train=train, batch_size=batch_size,
                                  aug=aug, rank=rank, world_size=world_size, rows=rows)
        if num_workers is None:
            num_workers = default_num_workers()
        if num_workers < 0:
            raise UserError(f"number of loader workers must be >= 0, got {num_workers}")
        self.device, self.num_workers = torch.device(device), num_workers
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {self.device} asked for, but CUDA is not available here; "
                            "use the cpu device instead")
        self.train, self.aug, self.epoch = train, aug, 0
        self.jitter = train and any((aug.brightness, aug.contrast, aug.saturation, aug.hue))
        self.batches = EpochBatches(self.rows, batch_size=batch_size, seed=seed, rank=rank,
                                    world_size=world_size, train=train)
        # On a CPU device the workers are the device: they finish the batches themselves, in
        # parallel, so the main process (which runs the model there) does no per-pixel work.
        # On a GPU the workers send uint8 and the GPU does the float work after the copy.
        self._finish_in_workers = self.device.type == "cpu" and num_workers > 0
        dataset = WindowDataset(self.reader, self.info, aug, train=train, seed=seed,
                                finish_jitter=self.jitter if self._finish_in_workers else None)
        self._loader = DataLoader(
            dataset, batch_size=None, sampler=self.batches, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
            prefetch_factor=2 if num_workers > 0 else None)
        self._stream = None
        self._stream_epoch: int | None = None  # the epoch the stream's next batch starts
        self._active = None  # token of the iteration that owns the stream

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches.per_epoch

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        if not self._stream_is_at(epoch):
            self.batches.first_epoch = epoch
            self._stream = iter(self._loader)
        self._stream_epoch = None  # an epoch left half-way leaves the stream mid-epoch
        token = self._active = object()
        for _ in range(len(self)):
            if self._active is not token:
                raise RuntimeError("TorchLoader: a newer iteration over this loader started; "
                                   "an older one cannot continue")
            item = next(self._stream)
            if self._finish_in_workers:
                yield Batch(*item)
            else:
                yield finish_on_device(item, self.device, jitter=self.jitter)
        self._stream_epoch = epoch + 1

    def _stream_is_at(self, epoch: int) -> bool:
        """Does the running stream's next batch start this epoch? (Evaluation batches do not
        depend on the epoch, so there any epoch boundary will do.)"""
        if self._stream is None or self._stream_epoch is None:
            return False
        return self._stream_epoch == epoch or not self.train
