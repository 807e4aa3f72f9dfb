"""DaliLoader: batches from the cache through the DALI graph of loaders/dali_pipeline.py.

GPU operators when `device` is CUDA, DALI's CPU-only mode otherwise. The pipeline is built
lazily and kept across epochs: its source stream runs on from one epoch into the next, so
consecutive epochs (set_epoch(e), set_epoch(e + 1), ...) cost no restart and no pipeline
bubble. Any other move (resuming at an arbitrary epoch, abandoning an epoch half-way,
iterating the same training epoch twice) rebuilds the pipeline at the requested epoch.
"""
from __future__ import annotations

import os
import time
from typing import Iterator

import torch

from cache.errors import UserError
from cache.reader import CacheReader
from loaders.contract import AugmentConfig, Batch, check_request
from loaders.order import batch_count, shard_indices

DALI_MISSING = "DALI is not installed (nvidia-dali-cuda130, Linux x86-64 only); use --loader torch"
# cudaMemGetInfo is sampled over the first batches after a build only: the pools have
# reached their steady size by then, and a training loop should not pay for it later.
MEMORY_SAMPLED_BATCHES = 32


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
    workers, less one for the training loop.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(cores - 1, 8)), 2
    return max(1, min(-(-cores // 3), 8)), max(1, min(cores, 8))


class DaliLoader:
    """Iterable of `Batch` for one split; see loaders/contract.py for the contract."""

    def __init__(self, cache, split: str, *, train: bool, batch_size: int, aug: AugmentConfig,
                 device: torch.device, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int | None = None, num_threads: int | None = None,
                 py_start_method: str | None = None, rows=None):
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
        workers, threads = default_workers(self.device)
        self.num_workers = workers if num_workers is None else num_workers
        self.num_threads = threads if num_threads is None else num_threads
        # fork is fast, but unsafe once CUDA is initialised in this process; spawn is safe.
        self.py_start_method = py_start_method or ("spawn" if self.device_id is not None else "fork")
        self.samples_per_rank = len(shard_indices(len(self.rows), seed=seed, epoch=0, rank=rank,
                                                  world_size=world_size, train=train))
        self._len = batch_count(len(self.rows), batch_size=batch_size, rank=rank,
                                world_size=world_size, train=train)
        self._epoch = 0
        self._pipe = self._dali_iter = None
        self._first_epoch = 0
        self._position = 0             # batches consumed from the current pipeline's stream
        self._active = None            # token of the iteration in progress
        self.build_seconds: list[float] = []
        self._gpu_baseline = self._gpu_peak = None
        self._sampled = 0

    # -- the Loader protocol ---------------------------------------------------
    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

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
            self._sample_gpu_memory()
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

        if self.device_id is not None and self._gpu_baseline is None:
            self._gpu_baseline = _gpu_used_bytes(self.device)
        started = time.perf_counter()
        source = WindowSource(self.reader, self.split, train=self.train, aug=self.aug,
                              batch_size=self.batch_size, seed=self.seed, first_epoch=first_epoch,
                              rank=self.rank, world_size=self.world_size, rows=self.rows)
        self._pipe = build_pipeline(source, batch_size=self.batch_size, device_id=self.device_id,
                                    num_threads=self.num_threads, py_num_workers=self.num_workers,
                                    py_start_method=self.py_start_method)
        names = ["image", "mask", "row"] if self.info.has_masks else ["image", "row"]
        # size=-1: the stream is endless; __iter__ cuts it into epochs of len() batches.
        self._dali_iter = DALIGenericIterator([self._pipe], names, size=-1, auto_reset=False,
                                              prepare_first_batch=False)
        self.build_seconds.append(time.perf_counter() - started)
        self._first_epoch, self._position, self._sampled = first_epoch, 0, 0

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
        # DALI hands its buffers over via DLPack (exec_dynamic): no copy for image/rows.
        image = outputs["image"][:valid]
        rows = outputs["row"][:valid, 0]
        mask = outputs.get("mask")
        if mask is not None:
            mask = mask[:valid, :, :, 0].long()
        if image.device != self.device:  # only if DALI and torch disagree on the GPU index
            image, rows = image.to(self.device), rows.to(self.device)
            mask = None if mask is None else mask.to(self.device)
        return Batch(image=image, mask=mask, rows=rows)

    # -- GPU memory ----------------------------------------------------------
    def _sample_gpu_memory(self) -> None:
        if self.device_id is None or self._sampled >= MEMORY_SAMPLED_BATCHES:
            return
        self._sampled += 1
        used = _gpu_used_bytes(self.device)
        self._gpu_peak = used if self._gpu_peak is None else max(self._gpu_peak, used)

    def gpu_memory_bytes(self) -> int | None:
        """GPU memory this loader added: peak device-wide use over the first batches after
        each build minus the use before the first build (cudaMemGetInfo, so it includes
        DALI's pools and the output batches; meaningful when nothing else allocates, as in
        the benchmark). None in CPU-only mode or before the first batch."""
        if self._gpu_baseline is None or self._gpu_peak is None:
            return None
        return max(0, self._gpu_peak - self._gpu_baseline)

    def shm_bytes(self) -> int:
        """Host shared memory DALI holds for the source workers' outputs (0 before a build)."""
        if self._pipe is None:
            return 0
        return int(sum(self._pipe.external_source_shm_statistics()["capacities"]))


def _dali_device_id(device: torch.device) -> int | None:
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise UserError(f"device {device}: the DALI loader runs on cpu or cuda only; "
                        "use --loader torch")
    if not torch.cuda.is_available():
        raise UserError(f"device {device}: CUDA is not available here; use --device cpu")
    return device.index if device.index is not None else torch.cuda.current_device()


def _gpu_used_bytes(device: torch.device) -> int:
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return total - free
