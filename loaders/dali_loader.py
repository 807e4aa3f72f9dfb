"""DaliLoader: batches from the cache through the DALI graph of loaders/dali_pipeline.py.

GPU operators when `device` is CUDA, DALI's CPU-only mode otherwise. The pipeline is built
lazily and kept across epochs: its source stream runs on from one epoch into the next, so
consecutive epochs (set_epoch(e), set_epoch(e + 1), ...) cost no restart and no pipeline
bubble. Any other move (resuming at an arbitrary epoch, abandoning an epoch half-way,
iterating the same training epoch twice) rebuilds the pipeline at the requested epoch.
"""
from __future__ import annotations

from typing import Iterator

import torch

from cache.errors import UserError
from cache.reader import CacheReader
from loaders.contract import AugmentConfig, Batch, check_request, cores_per_rank
from loaders.order import batch_count, shard_indices
from loaders.workers import worker_signals

DALI_MISSING = "DALI is not installed (nvidia-dali-cuda130, Linux x86-64 only); use --loader torch"


def require_dali() -> None:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        raise UserError(DALI_MISSING) from None


def default_workers(device: torch.device) -> tuple[int, int]:
    """(python source workers, DALI threads) for this machine.

    CPU-only mode: the DALI operators cost ~12 ms of CPU per 640x640 sample and the source
    (pick, read tiles, hand over through shared memory) ~1.5 ms with uncompressed image
    tiles, ~5.5 ms with zstd-1 ones, so one source worker feeds the threads of up to ~3
    cores; every extra worker only adds its own shared-memory slots and pages (measured
    on 2 cores: 2 workers cost ~150 MB more PSS and ~0.5 ms more CPU per image than 1, at
    the same images/s). One DALI thread per core keeps the operators on every core. On a
    GPU the DALI threads only feed and launch kernels, so the cores go to the source
    workers, less one for the training loop. Under torchrun the machine's cores are shared
    among its local ranks.
    """
    cores = cores_per_rank()
    if device.type == "cuda":
        return max(1, min(cores - 1, 8)), 2
    return max(1, min(-(-cores // 3), 8)), max(1, min(cores, 8))


class DaliLoader:
    """Iterable of `Batch` for one split; see loaders/contract.py for the contract."""

    def __init__(self, cache, split: str, *, train: bool, batch_size: int, aug: AugmentConfig,
                 device: torch.device, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int | None = None, num_threads: int | None = None,
                 py_start_method: str | None = None, rows=None, channels_last: bool = False):
        require_dali()
        self.device_id = _dali_device_id(torch.device(device))
        self.device = (torch.device("cpu") if self.device_id is None
                       else torch.device("cuda", self.device_id))
        self.reader = CacheReader(cache)
        self.info = self.reader.split(split)
        # One set of refusals for both kinds (batch size, rank, masks, crop size, frames).
        self.rows = check_request(self.reader.path, self.info, train=train, batch_size=batch_size,
                                  aug=aug, rank=rank, world_size=world_size, rows=rows)
        if num_workers is not None and num_workers < 0:
            raise UserError(f"number of loader workers must be >= 0, got {num_workers}")
        self.split, self.train, self.batch_size, self.aug = split, train, batch_size, aug
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last = channels_last
        workers, threads = default_workers(self.device)
        self.num_workers = workers if num_workers is None else num_workers
        self.num_threads = threads if num_threads is None else num_threads
        self.py_start_method = py_start_method or source_start_method(self.device_id)
        self.samples_per_rank = len(shard_indices(len(self.rows), seed=seed, epoch=0, rank=rank,
                                                  world_size=world_size, train=train))
        self._len = batch_count(len(self.rows), batch_size=batch_size, rank=rank,
                                world_size=world_size, train=train)
        self._epoch = 0
        self._pipe = self._dali_iter = None
        self._first_epoch = 0
        self._position = 0             # batches consumed from the current pipeline's stream
        self._active = None            # token of the iteration in progress

    # -- the Loader protocol ---------------------------------------------------
    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def limit_epochs(self, batches: int) -> None:
        """Make every epoch its first `batches` batches (a training run that consumes fewer
        than len() per epoch: --limit, or --grad-accum not dividing len()), so that the
        pipeline's stream runs on into the next epoch instead of being rebuilt. Call before
        iterating."""
        if self._pipe is not None:
            raise RuntimeError("limit_epochs must be called before the loader is iterated")
        self._len = max(1, min(self._len, int(batches)))
        self.samples_per_rank = min(self.samples_per_rank, self._len * self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if self._len == 0:
            return
        self._position_at_epoch_start()
        token = self._active = object()
        for index in range(self._len):
            if self._active is not token:
                raise RuntimeError("DaliLoader: a newer iteration over this loader started; "
                                   "an older one cannot continue")
            outputs = next(self._dali_iter)[0]
            self._position += 1
            valid = min(self.batch_size, self.samples_per_rank - index * self.batch_size)
            yield self._to_batch(outputs, valid)

    # -- pipeline life cycle ---------------------------------------------------
    def _position_at_epoch_start(self) -> None:
        """Keep the running pipeline if its stream is exactly at the start of this epoch."""
        if self._pipe is not None:
            if self.train:
                at_start = (self._epoch >= self._first_epoch and
                            self._position == (self._epoch - self._first_epoch) * self._len)
            else:  # evaluation order does not depend on the epoch
                at_start = self._position % self._len == 0
            if at_start:
                return
            self.close()
        self._build(first_epoch=self._epoch)

    def _build(self, first_epoch: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from loaders.dali_pipeline import WindowSource, build_pipeline

        source = WindowSource(self.reader, self.split, train=self.train, aug=self.aug,
                              batch_size=self.batch_size, seed=self.seed, first_epoch=first_epoch,
                              rank=self.rank, world_size=self.world_size, rows=self.rows,
                              batches_per_epoch=self._len)
        self._pipe = build_pipeline(source, batch_size=self.batch_size, device_id=self.device_id,
                                    num_threads=self.num_threads, py_num_workers=self.num_workers,
                                    py_start_method=self.py_start_method,
                                    channels_last=self.channels_last)
        names = ["image", "mask", "row"] if self.info.has_masks else ["image", "row"]
        if self.num_workers > 0:
            with worker_signals():   # Ctrl-C and a scheduler's SIGTERM: loaders/workers.py
                self._pipe.start_py_workers()
        # size=-1: the stream is endless; __iter__ cuts it into epochs of len() batches.
        self._dali_iter = DALIGenericIterator([self._pipe], names, size=-1, auto_reset=False,
                                              prepare_first_batch=False)
        self._first_epoch, self._position = first_epoch, 0

    def close(self) -> None:
        """Stop the pipeline and its worker processes (a later iteration rebuilds them)."""
        self._active = None
        # DALI stops and joins its worker pool when the last reference to the pipeline goes.
        self._dali_iter = self._pipe = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    # -- outputs -------------------------------------------------------------
    def _to_batch(self, outputs: dict, valid: int) -> Batch:
        # DALI hands its buffers over via DLPack (exec_dynamic): no copy for the image. Rows
        # are a CPU output of the graph: bookkeeping never waits for the GPU.
        image = outputs["image"][:valid]
        if self.channels_last:  # HWC from DALI seen as NCHW: channels_last at no cost
            image = image.permute(0, 3, 1, 2)
        rows = outputs["row"][:valid, 0]
        mask = outputs.get("mask")
        if mask is not None:
            mask = mask[:valid, :, :, 0].long()
        if image.device != self.device:  # only if DALI and torch disagree on the GPU index
            image = image.to(self.device)
            mask = None if mask is None else mask.to(self.device)
        return Batch(image=image, mask=mask, rows=rows.cpu())


def source_start_method(device_id: int | None) -> str:
    """How DALI starts its source workers: fork is fast, but DALI refuses to fork once the
    CUDA driver is initialised in this process (a GPU loader, or anything that touched CUDA,
    ran here before), whatever device this loader uses; spawn is always safe."""
    if device_id is not None:
        return "spawn"
    from nvidia.dali import backend

    return "spawn" if backend.IsDriverInitialized() else "fork"


def _dali_device_id(device: torch.device) -> int | None:
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise UserError(f"device {device}: the DALI loader runs on cpu or cuda only; "
                        "use --loader torch")
    if not torch.cuda.is_available():
        raise UserError(f"device {device}: CUDA is not available here; use --device cpu")
    return device.index if device.index is not None else torch.cuda.current_device()
