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

import os
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from cache.errors import UserError
from cache.reader import CacheReader
from loaders.contract import AugmentConfig, Batch, check_request, cores_per_rank
from loaders.order import shard_indices
from loaders.torch_dataset import EpochBatches, WindowDataset, finish_on_device
from loaders.workers import keep_serving_on_termination


MAX_DEFAULT_WORKERS = 16


def default_num_workers() -> int:
    """The cores of this rank less one for the main process (Lightning's
    `suggested_max_num_workers`: cores // local ranks - 1, at least 1), but every core up to 2,
    and at most MAX_DEFAULT_WORKERS. Under torchrun the machine's cores are shared among its
    local ranks (`cores_per_rank`).

    - Less one: on a GPU the main process runs the training loop (pins and copies batches,
      launches kernels, the colour jitter's kernels included); with a worker on every core it
      competes with them and the GPU waits on it. 1 → 1, 4 → 3, 8 → 7, 16 → 15 workers.
    - Every core up to 2: there the workers are the bottleneck and the main process mostly
      waits for them. The torch kind's host side (read, resize, flip) costs ~5 ms of CPU per
      640² image (~208 images per CPU-second, README, "The host side alone"): on 2 cores,
      2 workers deliver ~400 images/s, one at most ~200, below the 300 images/s target. The
      2-core choice stays the 2 of the old rule (one per core, at most 4).
    - At most 16 (torchvision's reference scripts' default `--workers`): ~200 images/s per
      worker is then ~3000 images/s, more than one GPU trains at 640², and each further
      worker only adds its heap, its prefetched batches in shared memory and its open files.
      The old cap of 4 (~800 images/s) could starve a fast GPU on a 16-core host.
    """
    cores = cores_per_rank()
    return max(1, min(max(cores - 1, min(cores, 2)), MAX_DEFAULT_WORKERS))




class TorchLoader:
    """Batches of a cache split from DataLoader workers; see the module docstring.

    Train: order from `shard_indices(seed, epoch, rank, world_size)`, last incomplete batch
    dropped, `set_epoch` reshuffles. Eval (train=False): whole frames, image resized by
    `aug.eval_scale`, mask at the stored resolution (not resized), stored order, every frame
    exactly once across ranks, the last batch may be short.

    The workers' stream runs on from one epoch into the next, so iterating epochs e, e+1,
    ... in turn never waits for a refill, also when each epoch is cut short by
    `limit_epochs`; any other move (another epoch, an epoch left half-way) restarts the
    stream at the asked epoch.

    On a GPU, batches are finished one ahead on a side CUDA stream: while the caller's step
    runs, the next batch is copied from pinned memory and jittered there, and the caller's
    stream waits for it on an event (as timm's PrefetchLoader and FFCV's epoch iterator do).
    """

    def __init__(self, cache: str | os.PathLike, split: str, *, train: bool, batch_size: int,
                 aug: AugmentConfig, device: str | torch.device = "cpu", seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int | None = None, rows=None,
                 channels_last: bool = False):
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
        self.channels_last = channels_last
        self.jitter = train and any((aug.brightness, aug.contrast, aug.saturation, aug.hue))
        self.batches = EpochBatches(self.rows, batch_size=batch_size, seed=seed, rank=rank,
                                    world_size=world_size, train=train)
        # On a CPU device the workers are the device: they finish the batches themselves, in
        # parallel, so the main process (which runs the model there) does no per-pixel work.
        # On a GPU the workers send uint8 and the GPU does the float work after the copy.
        self._finish_in_workers = self.device.type == "cpu" and num_workers > 0
        dataset = WindowDataset(self.reader, self.info, aug, train=train, seed=seed,
                                finish_jitter=self.jitter if self._finish_in_workers else None,
                                channels_last=channels_last)
        self._loader = DataLoader(
            dataset, batch_size=None, sampler=self.batches, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
            worker_init_fn=keep_serving_on_termination if num_workers > 0 else None,
            prefetch_factor=2 if num_workers > 0 else None)
        self._stream = None
        self._first_epoch = 0          # the epoch the running stream started at
        self._position = 0             # batches taken from the running stream
        self.stream_starts = 0         # how often the workers' stream was (re)started
        self._active = None            # token of the iteration that owns the stream
        self._side_stream = None       # CUDA stream the next batch is finished on

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches.per_epoch

    def limit_epochs(self, batches: int) -> None:
        """Make every epoch its first `batches` batches (a training run that consumes fewer
        than len() per epoch: --limit, or --grad-accum not dividing len()), so that the stream
        runs on into the next epoch instead of restarting. Call before iterating."""
        if self._stream is not None:
            raise RuntimeError("limit_epochs must be called before the loader is iterated")
        self.batches.per_epoch = max(1, min(self.batches.per_epoch, int(batches)))

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        if not self._stream_is_at(epoch):
            self.batches.first_epoch = self._first_epoch = epoch
            self._stream, self._position = iter(self._loader), 0
            self.stream_starts += 1
        token = self._active = object()
        items = self._epoch_items(token)
        if self._finish_in_workers:
            return (Batch(*item) for item in items)
        if self.device.type == "cuda":
            return self._one_ahead_on_side_stream(items)
        return (finish_on_device(item, self.device, jitter=self.jitter,
                                 channels_last=self.channels_last) for item in items)

    def _epoch_items(self, token) -> Iterator:
        for _ in range(len(self)):
            if self._active is not token:
                raise RuntimeError("TorchLoader: a newer iteration over this loader started; "
                                   "an older one cannot continue")
            item = next(self._stream)
            self._position += 1
            yield item

    def _stream_is_at(self, epoch: int) -> bool:
        """Is the running stream exactly at the start of this epoch? (Evaluation batches do not
        depend on the epoch, so there any epoch boundary will do.)"""
        if self._stream is None:
            return False
        if not self.train:
            return self._position % len(self) == 0
        return (epoch >= self._first_epoch and
                self._position == (epoch - self._first_epoch) * len(self))

    def _one_ahead_on_side_stream(self, items: Iterator) -> Iterator[Batch]:
        """Finish batch k+1 on a side stream before handing over batch k; the caller's stream
        waits on an event, and record_stream keeps the allocator from reusing the memory of a
        batch the caller's kernels may still read. No host-device synchronisation."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        side = self._side_stream

        def prepare(item):
            with torch.cuda.stream(side):
                batch = finish_on_device(item, self.device, jitter=self.jitter,
                                         channels_last=self.channels_last)
                ready = torch.cuda.Event()
                ready.record(side)
            return batch, ready

        def hand_over(batch: Batch, ready) -> Batch:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for tensor in (batch.image, batch.mask):
                if tensor is not None:
                    tensor.record_stream(current)
            return batch

        pending = None
        for item in items:
            upcoming = prepare(item)
            if pending is not None:
                yield hand_over(*pending)
            pending = upcoming
        if pending is not None:
            yield hand_over(*pending)
