"""Peak GPU memory of evaluating whole frames, computed on any machine (no GPU needed), and the
largest evaluation batch that fits a card.

How the peak is computed, not guessed: the model is built and run under torch's FakeTensorMode
on a fake CUDA device, so every tensor has its real shape, dtype and memory format but no
memory, and a 2048x1024 forward of DeepLabV3+ r101 costs about a second of CPU. The pass is the
project's own (training.core.engine.evaluate: predict_logits with its TTA views, the optional
validation loss, argmax and the confusion-matrix update), under CUDA autocast when `amp` says,
fed by a loader that holds `prefetch` batches ahead of the one being predicted. A
TorchDispatchMode (`LiveBytes`) sees every tensor an aten op creates, remembers its storage
(bytes counted once per storage, as the caching allocator allocates them) and notices through
a weak reference when the storage dies, which is when the caching allocator would get the
block back. Its maximum is the `torch.cuda.max_memory_allocated()` that the pass would reach,
except for what kernels allocate internally (the cuDNN workspace), which is a stated margin.

The total on a card adds what the counter cannot see, as stated assumptions:
- the weights (and buffers) of the model, resident the whole time; with `optimizer` (the
  validation inside a training run) the optimiser state, resident too (SGD momentum: one copy
  of the weights, AdamW: two; gradients are freed by zero_grad(set_to_none=True));
- CUDA_CONTEXT_BYTES for the CUDA context with cuBLAS/cuDNN loaded (450 MiB: a torch 2.x
  context on a Turing/Ampere card with lazy module loading measures 300-500 MiB in
  nvidia-smi; it is not part of the allocator's count but it is taken from the card);
- CUDNN_WORKSPACE_BYTES for the scratch space the convolution algorithms ask for (256 MiB;
  cudnn.benchmark picks algorithms whose workspace fits what is free);
- and, when choosing a batch, FIT_MARGIN of the card left unused: the caching allocator rounds
  blocks up (2 MiB granules above 1 MiB, 20 MiB segments below 10 MiB) and cannot always reuse
  a freed block for a differently sized request, so what it reserves at the peak runs 5-15%
  over what is allocated; a desktop card also shows a display.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.profiler import profile, ProfilerActivity
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from training.core.engine import evaluate
from training.core.losses import build_loss
from training.core.metrics import ConfusionMatrix
from training.core.model import build_model

MIB = 2 ** 20
GIB = 2 ** 30
CUDA_CONTEXT_BYTES = 450 * MIB
CUDNN_WORKSPACE_BYTES = 256 * MIB
FIT_MARGIN = 0.12          # of the card's total memory, left unused by the automatic batch
MAX_AUTO_BATCH = 8         # the automatic batch never goes above this (no gain in speed beyond)
CPU_VAL_BATCH = 1          # the CPU keeps the batch it always had
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZER_COPIES = {None: 0, "sgd": 1, "adamw": 2}   # copies of the weights the state holds


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive at each aten op, and their maximum.

    A storage counts from the op that creates it until the last tensor (or autocast's cast
    cache) that refers to it is gone. Storages made before the mode was entered are not
    counted (the weights: counted apart). Works the same on real tensors (the CPU check) as on
    fake ones."""

    def __init__(self, snapshot: bool = False):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._made: dict[int, str] = {}     # with snapshot: what made each live storage
        self.snapshot = [] if snapshot else None   # at the peak: (bytes, what) of the live ones
        self.current = 0
        self.peak = 0
        self.peak_op = None

    def _sweep(self) -> None:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self.current -= self._live.pop(key)[1]
            self._made.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()                   # what Python freed since the last op is back in the pool
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                storage = item.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self._live:
                    size = storage.nbytes()
                    self._live[ref.cdata] = (ref, size)
                    self.current += size
                    if self.snapshot is not None:
                        self._made[ref.cdata] = (f"{func} -> {tuple(item.shape)} "
                                                 f"{str(item.dtype).replace('torch.', '')}")
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, str(func)
            if self.snapshot is not None:
                self.snapshot = sorted(((size, self._made[key]) for key, (_, size)
                                        in self._live.items()), reverse=True)
        return out


@contextmanager
def cuda_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """torch.autocast("cuda", dtype) that also works where CUDA is not available (torch.autocast
    then switches itself off): the same dispatcher state, set directly. Fake CUDA tensors are
    then cast exactly as real ones would be, including autocast's cache of cast weights."""
    if dtype is None:
        yield
        return
    enabled, old_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    cache = torch.is_autocast_cache_enabled()
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.set_autocast_cache_enabled(True)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", old_dtype)
        torch.set_autocast_cache_enabled(cache)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[StorageWeakRef(storage).cdata] = storage.nbytes()
    return sum(seen.values())


@dataclass(frozen=True)
class EvalMemory:
    """The parts of an evaluation's peak, in bytes (see the module docstring)."""

    weights: int           # parameters and buffers, float32
    resident: int          # optimiser state (and DDP's gradient buckets) kept through a
                           # validation inside a training run; 0 for `evaluate`
    activations: int       # the live-bytes peak of the pass: inputs, activations, cast
                           # weights, logits, probabilities, loss, argmax, confusion tensors
    peak_op: str           # the aten op at which that peak was reached
    context: int = CUDA_CONTEXT_BYTES
    workspace: int = CUDNN_WORKSPACE_BYTES

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated() would report (plus the cuDNN workspace)."""
        return self.weights + self.resident + self.activations + self.workspace

    @property
    def total(self) -> int:
        """What the card must hold at the peak: the allocated bytes plus the CUDA context."""
        return self.allocated + self.context


class _Batch:
    """A loader batch as training.core.engine.predict reads it (image, mask, rows on the host)."""

    def __init__(self, image, mask, rows):
        self.image, self.mask, self.rows = image, mask, rows


def _batches(count: int, batch: int, input_hw, out_hw, device, channels_last: bool,
             prefetch: int):
    """`count` batches, each made `prefetch` batches before it is handed over (the loaders
    finish batch k+1 while batch k is predicted)."""
    def make():
        image = torch.empty((batch, 3, *input_hw), device=device)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        mask = torch.zeros((batch, *out_hw), dtype=torch.int64, device=device)
        return _Batch(image, mask, np.arange(batch))

    ready = [make() for _ in range(prefetch)]
    for _ in range(count):
        ready.append(make())
        current = ready.pop(0)
        yield current
        del current


def run_eval_pass(model: torch.nn.Module, *, batch: int, frame_hw: tuple[int, int],
                  input_hw: tuple[int, int] | None = None, device: torch.device | str = "cuda",
                  autocast_dtype: torch.dtype | None = None, tta_scales: Sequence[float] = (1.0,),
                  tta_flip: bool = False, loss: str | None = None, channels_last: bool = False,
                  prefetch: int = 2, batches: int = 2, num_classes: int = 19) -> LiveBytes:
    """Run the project's evaluation pass over `batches` batches of empty frames on `model`
    (real or fake tensors, already on `device`) and return the live-bytes counter. Two
    batches: the second forward runs while the first batch's logits are still referenced
    (the prediction generator keeps them until its next assignment), the steady state."""
    input_hw = tuple(frame_hw) if input_hw is None else tuple(input_hw)
    device = torch.device(device)
    counter = LiveBytes()
    with counter:
        criterion = None if loss is None else build_loss(loss, ignore_index=255).to(device)
        matrix = ConfusionMatrix(num_classes, 255)
        stream = _batches(batches, batch, input_hw, tuple(frame_hw), device, channels_last,
                          prefetch)
        autocast = cuda_autocast(autocast_dtype) if device.type == "cuda" else (
            torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else nullcontext())
        with autocast:
            evaluate(model, stream, matrix, tuple(frame_hw), tta_scales=tuple(tta_scales),
                     tta_flip=tta_flip, criterion=criterion)
    return counter


def _views(tta_scales: Sequence[float], tta_flip: bool) -> int:
    return len(tuple(tta_scales)) * (2 if tta_flip else 1)


def _to_fake_cuda(model: torch.nn.Module) -> None:
    """Replace the (meta) parameters and buffers of `model` by fake CUDA tensors, in place;
    inside a FakeTensorMode."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype, device="cuda:0"),
                    requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype,
                                                    device="cuda:0")


@functools.lru_cache(maxsize=256)
def _estimate(arch: str, encoder: str, model_kwargs: tuple, num_classes: int,
              frame_hw: tuple[int, int], input_hw: tuple[int, int], batch: int, amp: str | None,
              tta_scales: tuple, tta_flip: bool, loss: str | None, channels_last: bool,
              copies: int, prefetch: int) -> EvalMemory:
    kwargs = {key: (tuple(value) if isinstance(value, list) else value)
              for key, value in model_kwargs}
    # "cuda:0", never a bare "cuda": fake tensors would ask the CUDA runtime for its current
    # device wherever torch.cuda.is_available() says yes
    with torch.device("meta"):      # built without memory and without drawing random numbers
        model = build_model(arch, encoder, num_classes, None, **kwargs).eval()
    with FakeTensorMode():
        _to_fake_cuda(model)
        if channels_last:     # Module.to cannot swap fake parameters; the same, by hand
            for param in model.parameters():
                if param.dim() == 4:
                    param.data = param.data.contiguous(memory_format=torch.channels_last)
        weights = storage_bytes(list(model.parameters()) + list(model.buffers()))
        counter = run_eval_pass(model, batch=batch, frame_hw=frame_hw, input_hw=input_hw,
                                device="cuda:0", autocast_dtype=AMP_DTYPES.get(amp),
                                tta_scales=tta_scales, tta_flip=tta_flip, loss=loss,
                                channels_last=channels_last, prefetch=prefetch,
                                num_classes=num_classes)
    resident = copies * storage_bytes(model.parameters())
    return EvalMemory(weights=weights, resident=resident, activations=counter.peak,
                      peak_op=counter.peak_op or "")


def eval_memory(arch: str, encoder: str, frame_hw: tuple[int, int] = (1024, 2048),
                batch: int = 1, amp: str | None = "fp16", tta_scales: Sequence[float] = (1.0,),
                tta_flip: bool = False, *, model_kwargs: dict | None = None,
                num_classes: int = 19, eval_scale: float = 1.0, loss: str | None = None,
                channels_last: bool = True, optimizer: str | None = None, ddp: bool = False,
                prefetch: int = 2) -> EvalMemory:
    """The parts of the peak GPU memory of evaluating `batch` frames of `frame_hw` (H, W) at a
    time with model `arch`/`encoder` (smp names, `model_kwargs` as in the config).

    amp: "fp16"/"bf16" autocast or None (float32). tta_scales/tta_flip: the views of
    training.core.tta (run one after another, so flip adds a view's logits and probabilities, not a
    second set of activations). eval_scale: the frames are resized by it before the model, the
    logits are scored at frame_hw. loss: the validation loss spec (training runs compute it;
    `evaluate` does not). optimizer: "sgd"/"adamw" when validating inside a training run
    (its state stays on the card), ddp: under DDP (its gradient buckets, one more copy of the
    weights, stay too). channels_last: the training run's CUDA default; `evaluate`
    loads models contiguous (the sizes are the same). prefetch: batches the loader holds ready."""
    input_hw = tuple(max(1, round(side * eval_scale)) for side in frame_hw)
    return _estimate(arch, encoder, tuple(sorted((model_kwargs or {}).items(),
                                                 key=lambda item: item[0])),
                     int(num_classes), tuple(frame_hw), input_hw, int(batch), amp,
                     tuple(float(s) for s in tta_scales), bool(tta_flip), loss,
                     bool(channels_last), OPTIMIZER_COPIES[optimizer] + int(bool(ddp)),
                     int(prefetch))


def eval_peak_bytes(arch: str, encoder: str, frame_hw: tuple[int, int] = (1024, 2048),
                    batch: int = 1, amp: str | None = "fp16", tta_views: int = 1,
                    **options) -> int:
    """Bytes a card must hold to evaluate `batch` frames at a time: eval_memory(...).total.
    tta_views: 1 (plain), 2 (flip); for scales use eval_memory's tta_scales."""
    if tta_views not in (1, 2):
        raise ValueError("tta_views: 1 or 2 (flip); give tta_scales to eval_memory for scales")
    return eval_memory(arch, encoder, frame_hw, batch, amp, tta_flip=tta_views == 2,
                       **options).total


def fitting_val_batch(arch: str, encoder: str, frame_hw: tuple[int, int],
                      total_memory_bytes: int, amp: str | None = "fp16", *,
                      cap: int = MAX_AUTO_BATCH, margin: float = FIT_MARGIN,
                      **options) -> int:
    """The largest batch (1..cap) whose estimated peak fits `total_memory_bytes` less
    `margin` of it; 1 when none does (batch 1 is what evaluation always could do).

    The activations grow linearly with the batch (every tensor of the pass has the batch as
    its first dimension except the weights and their casts), so batches 1 and 2 give the line
    and the chosen batch is computed once more exactly; a miss steps down."""
    budget = total_memory_bytes * (1.0 - margin)

    def total(batch: int) -> int:
        return eval_memory(arch, encoder, frame_hw, batch, amp, **options).total

    one = total(1)
    if one > budget or cap <= 1:
        return 1
    per_frame = max(1, total(2) - one)
    batch = max(1, min(cap, 1 + int((budget - one) // per_frame)))
    while batch > 1 and total(batch) > budget:
        batch -= 1
    return batch


def device_total_memory(device: torch.device) -> int:
    return int(torch.cuda.get_device_properties(device).total_memory)


def auto_val_batch(device: torch.device | str, arch: str, encoder: str,
                   frame_hw: tuple[int, int], amp: str | None, **options) -> int:
    """The batch for `--val-batch-size auto` / `evaluate --batch-size auto`: CPU_VAL_BATCH on
    the CPU (its behaviour is unchanged), on CUDA the largest batch that fits the card; batch 1
    (what evaluation always did) where the model cannot be traced in fake mode."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return CPU_VAL_BATCH
    total = device_total_memory(device)
    try:
        return fitting_val_batch(arch, encoder, tuple(frame_hw), total, amp, **options)
    except Exception:     # an architecture whose forward FakeTensorMode cannot run
        return 1


def real_cpu_peak(model: torch.nn.Module, **pass_options) -> tuple[int, int]:
    """(live-bytes counter peak, allocator peak from torch.profiler) of the same evaluation
    pass on real CPU tensors: the check of the counter against what the CPU allocator saw."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        counter = run_eval_pass(model, device="cpu", **pass_options)
    events = [(event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
              if event.name() == "[memory]"]
    level = peak = 0
    for _, change in sorted(events, key=lambda item: item[0]):
        level += change
        peak = max(peak, level)
    return counter.peak, peak


def gib(nbytes: float) -> float:
    return nbytes / GIB


__all__ = ["CUDA_CONTEXT_BYTES", "auto_eval_batch", "CUDNN_WORKSPACE_BYTES", "FIT_MARGIN", "MAX_AUTO_BATCH",
           "EvalMemory", "LiveBytes", "auto_val_batch", "cuda_autocast", "eval_memory",
           "eval_peak_bytes", "fitting_val_batch", "real_cpu_peak", "run_eval_pass", "gib"]
