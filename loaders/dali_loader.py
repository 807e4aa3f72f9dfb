"""DaliLoader: batches from the cache through the DALI graph of loaders/dali_pipeline.py.

GPU operators when `device` is CUDA, DALI's CPU-only mode otherwise. The pipeline is built
lazily and kept across epochs: its source stream runs on from one epoch into the next, so
consecutive epochs (set_epoch(e), set_epoch(e + 1), ...) cost no restart and no pipeline
bubble. Any other move (resuming at an arbitrary epoch, abandoning an epoch half-way,
iterating the same training epoch twice) rebuilds the pipeline at the requested epoch.

On a GPU every batch is torch's own memory: see `DaliLoader._to_batch` and `_HeldOutputs` for
why a zero-copy view of DALI's output buffer is not safe to hand over, and what makes the copy
safe.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

import torch

from cache.errors import UserError
from cache.reader import CacheReader
from loaders.contract import AugmentConfig, Batch, check_request, cores_per_rank
from loaders.dali_pipeline import build_pipeline, WindowSource
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
        self._pipe = None
        self._names: list[str] = []
        self._scheduled = False        # the pipeline's first schedule_run (its prefetch) is done
        self._held = _HeldOutputs()    # DALI buffers the GPU may still read (GPU only)
        self._unsafe_zero_copy = False  # gpu_check's positive control only: the old hazard
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
            outputs = self._next_outputs()
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
        source = WindowSource(self.reader, self.split, train=self.train, aug=self.aug,
                              batch_size=self.batch_size, seed=self.seed, first_epoch=first_epoch,
                              rank=self.rank, world_size=self.world_size, rows=self.rows,
                              batches_per_epoch=self._len)
        self._pipe = build_pipeline(source, batch_size=self.batch_size, device_id=self.device_id,
                                    num_threads=self.num_threads, py_num_workers=self.num_workers,
                                    py_start_method=self.py_start_method,
                                    channels_last=self.channels_last)
        self._names = ["image", "mask", "row"] if self.info.has_masks else ["image", "row"]
        if self.num_workers > 0:
            with worker_signals():   # Ctrl-C and a scheduler's SIGTERM: loaders/workers.py
                self._pipe.start_py_workers()
        self._pipe.build()
        # The stream is endless; __iter__ cuts it into epochs of len() batches.
        self._scheduled = False
        self._first_epoch, self._position = first_epoch, 0

    def close(self) -> None:
        """Stop the pipeline and its worker processes (a later iteration rebuilds them)."""
        self._active = None
        # DALI stops and joins its worker pool when the last reference to the pipeline goes.
        self._pipe = None
        self._scheduled = False
        # Held buffers stay held (a rebuilt pipeline allocates from the same memory pool) and
        # go as their events complete, or when the loader goes.

    def __del__(self):
        try:
            self.close()
            self._held.release_all()  # waits for the GPU's last reads, then lets them go
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    # -- outputs -------------------------------------------------------------
    def _next_outputs(self) -> dict:
        """The next batch of the pipeline's stream as torch tensors (name -> tensor): what
        DALIGenericIterator does with `exec_dynamic` (share_outputs, `as_tensor`, DLPack,
        release_outputs, schedule_run), except that on a GPU the outputs are bound to torch's
        current stream (`share_outputs(cuda_stream=...)`): that stream waits on the event of
        this very iteration instead of the host waiting for it, and DLPack then makes the
        stream wait on the same event (backend_impl.cc ToDLMTensor: `target_order.wait(
        tensor.ready_event())`)."""
        pipe = self._pipe
        if not self._scheduled:
            pipe.schedule_run()   # the first call prefetches prefetch_queue_depth iterations
            self._scheduled = True
        if self.device_id is None:
            outs = pipe.share_outputs()
        else:
            outs = pipe.share_outputs(cuda_stream=torch.cuda.current_stream(self.device))
        tensors = {name: _dlpack_to_torch(out.as_tensor(), self.device_id)
                   for name, out in zip(self._names, outs)}
        del outs
        pipe.release_outputs()    # a no-op with exec_dynamic; kept for DALI's bookkeeping
        pipe.schedule_run()
        return tensors

    def _to_batch(self, outputs: dict, valid: int) -> Batch:
        """`outputs` are zero-copy views of DALI's output buffers. Rows are a CPU output of the
        graph: bookkeeping never waits for the GPU.

        CPU (device_id=None): the views are the batch, as before: the host runs every read
        before it lets go of them, so DALI's reuse of a buffer can never overtake a read.

        GPU: a view's buffer goes back to DALI's pool when its last reference goes, on the
        host, released in the order of DALI's stream, not torch's; DALI's next iteration may
        then write into memory that kernels queued on torch's stream have not read yet (the
        host runs steps ahead of the GPU). So image and mask are copied into torch's memory
        by kernels on torch's current stream (the image: one clone, 2 x 39 MB of traffic for
        8x3x640x640 float, ~25-45 us at an H100's 2-3.3 TB/s; the mask: the int64 conversion
        it always had), and the views are held (`_HeldOutputs`) until an event recorded after
        those copies has completed. From there on the batch is an ordinary torch tensor.

        What this rests on in DALI (2.4's Python in site-packages; the C++ as in NVIDIA/DALI):
        - the buffer lives while a view does: dali/python/backend_impl.cc `ToDLMTensor` hands
          out `GetSharedDLTensor(tensor)`, a capsule owning a share of the buffer's
          shared_ptr; nvidia/dali/pipeline.py `release_outputs`: with the default (dynamic)
          executor "the buffers are not invalidated";
        - the copy reads only what DALI has finished writing: exec2.cc `PopOutputs` makes the
          bound stream wait on the iteration's event (`output_order.wait(ws.event())`), and
          `ToDLMTensor` makes the consumer's stream wait on `tensor.ready_event()` (or on the
          buffer's stream) before it hands out the capsule;
        - binding alone would not do: `Executor2::Outputs` calls `PopOutputs(...,
          set_output_order=false)`, so the buffers keep DALI's stream as their release order,
          and data/buffer.cc `AllocBuffer` allocates with `mm::alloc_raw_async_shared(rsrc,
          bytes, s, s)` (released on the stream it was allocated on; `set_deletion_order`
          moves that only while the pointer is unique, which a view makes it not).
        Once the event has completed the copies have read everything, so DALI may free and
        reuse the buffer on any stream: that last step is CUDA's event semantics alone."""
        image = outputs["image"][:valid]
        if self.channels_last:  # HWC from DALI seen as NCHW: channels_last at no cost
            image = image.permute(0, 3, 1, 2)
        rows = outputs["row"][:valid, 0]
        mask = outputs.get("mask")
        if mask is not None:
            mask = mask[:valid, :, :, 0]
        if self.device_id is None:
            return Batch(image=image, mask=None if mask is None else mask.long(),
                         rows=rows.cpu())
        self._held.release_finished()
        if not self._unsafe_zero_copy:
            stream = torch.cuda.current_stream(image.device)
            image = image.clone(memory_format=torch.preserve_format)  # keeps channels_last
            mask = None if mask is None else mask.long()
            self._held.hold(stream, outputs)
        else:  # gpu_check's positive control: hand over DALI's own buffer, hold nothing
            mask = None if mask is None else mask.long()
        if image.device != self.device:  # only if DALI and torch disagree on the GPU index
            image = image.to(self.device)
            mask = None if mask is None else mask.to(self.device)
        return Batch(image=image, mask=mask, rows=rows.cpu())


class _HeldOutputs:
    """DALI output buffers (their torch views) kept alive until the GPU has run the kernels,
    queued before an event, that read them. `release_finished` polls the events
    (cudaEventQuery: no host wait) and lets go of every batch whose reads are done; past
    `limit` batches in flight (the host ahead of the GPU by that many batches) the oldest is
    waited for, which bounds the memory held to `limit` batches."""

    def __init__(self, limit: int = 8):
        self.limit = limit
        self._queue: deque = deque()

    def hold(self, stream, views) -> None:
        event = _cuda_event()
        event.record(stream)
        self._queue.append((event, views))
        while len(self._queue) > self.limit:
            event, _ = self._queue[0]
            event.synchronize()
            self._queue.popleft()

    def release_finished(self) -> None:
        while self._queue and self._queue[0][0].query():
            self._queue.popleft()

    def release_all(self) -> None:
        while self._queue:
            event, _ = self._queue[0]
            event.synchronize()
            self._queue.popleft()

    def __len__(self) -> int:
        return len(self._queue)


def _cuda_event():
    return torch.cuda.Event()


def _dlpack_to_torch(tensor, device_id: int | None) -> torch.Tensor:
    """A DALI TensorCPU/TensorGPU as a torch tensor sharing its memory; as
    DALIGenericIterator does it (nvidia/dali/plugin/pytorch/__init__.py, exec_dynamic branch:
    `with category_device: torch.from_dlpack(tensor)`), so that torch passes the current
    stream of the tensor's own device to `__dlpack__`."""
    from nvidia.dali.backend import TensorGPU

    device = (torch.device("cuda", device_id) if isinstance(tensor, TensorGPU)
              else torch.device("cpu"))
    with device:
        return torch.from_dlpack(tensor)


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
