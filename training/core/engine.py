"""The steps: one optimiser step, the steps of an epoch, and the one prediction pass that
validation during training and the `evaluate` command share.

Short functions over a model and a loader, as in torchvision's references/segmentation; when to
call them, and what to write afterwards, is training.train.run's business.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from training.core.device import unwrap
from training.core.tta import predict_logits


@dataclass
class TrainingParts:
    """What an optimiser step needs (built by training.train.builders.build_parts)."""

    model: nn.Module                 # on the device; DDP-wrapped under torchrun
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler     # a no-op unless --amp fp16
    autocast: Any                    # a reusable autocast (or null) context
    scheduler: Any = None            # LambdaLR stepped once per optimiser step, or None


class DataWait:
    """The time training steps spend waiting for their batches, read only at log points.

    On the CPU: host seconds spent in the loader's `next`. On CUDA, as the GPU sees it: a
    pair of timing events is recorded on the current stream around each `next`; the GPU time
    between them is the time the GPU had nothing queued because the host was waiting for the
    batch (or the stream was waiting for the loader's side stream). Nothing synchronises
    until `seconds()` is called, at a log point.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._host = 0.0
        self._events: list[tuple] = []

    def next(self, batches: Iterator):
        if not self.cuda:
            started = time.perf_counter()
            batch = next(batches, None)
            self._host += time.perf_counter() - started
            return batch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        batch = next(batches, None)
        end.record()
        self._events.append((start, end))
        return batch

    def seconds(self) -> float:
        """Total wait since the last reset (on CUDA: waits for the last event)."""
        if not self.cuda:
            return self._host
        if not self._events:
            return 0.0
        self._events[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self._events) / 1000.0


def train_step(parts: TrainingParts, batches: Iterator, accum: int,
               wait: DataWait | None = None) -> torch.Tensor:
    """Forward/backward over `accum` micro-batches drawn from `batches`, then one optimiser
    step; returns the mean loss as a detached device tensor (reading it waits for the device).
    `wait` times the fetching of the batches. No host-device synchronisation here (except the
    GradScaler's inf check with --amp fp16)."""
    model = parts.model
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    total = None
    for i in range(accum):
        batch = next(batches, None) if wait is None else wait.next(batches)
        if batch is None:
            raise RuntimeError("the loader yielded fewer batches than its len() promised")
        # DDP all-reduces gradients on the last micro-batch only
        with (nullcontext() if i == accum - 1 or not ddp else model.no_sync()):
            with parts.autocast:
                logits = model(batch.image)
            loss = parts.criterion(logits, batch.mask) / accum
            parts.scaler.scale(loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.scheduler is not None:
        parts.scheduler.step()
    return total


def train_one_epoch(parts: TrainingParts, batches: Iterator, steps: int, accum: int,
                    wait: DataWait | None = None) -> Iterator[torch.Tensor]:
    """The mean loss of each of `steps` optimiser steps over `batches` (the rest of an epoch),
    yielded between steps: the caller logs, evaluates and checkpoints there, or stops."""
    parts.model.train()
    for _ in range(steps):
        yield train_step(parts, batches, accum, wait)


class Prediction(NamedTuple):
    rows: list[int]                  # cache rows of the frames
    pred: torch.Tensor               # (B, H, W) int64 trainIds at the stored frame size
    mask: torch.Tensor | None        # (B, H, W) ground truth, None for a split without masks
    loss: torch.Tensor | None = None  # the batch's loss (device scalar) when a criterion is given


@torch.no_grad()
def predict(model: nn.Module, batches, out_hw: tuple[int, int], *, limit: int | None = None,
            autocast=None, tta_scales: Sequence[float] = (1.0,), tta_flip: bool = False,
            criterion: nn.Module | None = None) -> Iterator[Prediction]:
    """Predictions of the first `limit` frames of evaluation `batches` (all without limit) at
    `out_hw`, the stored frame size, where the masks are: scores are those of the official
    script for the same predictions at full size. With a `criterion`, each Prediction also
    carries the batch's loss at full size (the validation loss). The caller puts the model in
    eval mode. Rows stay on the host: no device round trip per batch."""
    seen = 0
    for batch in batches:
        take = len(batch.rows) if limit is None else min(len(batch.rows), limit - seen)
        with autocast or nullcontext():
            logits = predict_logits(model, batch.image[:take], out_hw, scales=tta_scales,
                                    flip=tta_flip)
        mask = None if batch.mask is None else batch.mask[:take]
        loss = None if criterion is None or mask is None else criterion(logits, mask).detach()
        yield Prediction(batch.rows[:take].tolist(), logits.argmax(1), mask, loss)
        seen += take
        if limit is not None and seen >= limit:
            return        # before the loader is asked for (and reads) another batch


def evaluate(model: nn.Module, batches, matrix, out_hw: tuple[int, int], *,
             on_prediction: Callable[[Prediction], None] | None = None, **predict_options) -> int:
    """Count the predictions of `batches` into `matrix` (a ConfusionMatrix, or None where there
    is no ground truth), summed over ranks; `on_prediction` sees each batch's predictions.
    Returns the number of frames this rank predicted. The model's train/eval mode is kept."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    frames = 0
    try:
        for prediction in predict(net, batches, out_hw, **predict_options):
            if matrix is not None:
                matrix.update(prediction.pred, prediction.mask)
            if on_prediction is not None:
                on_prediction(prediction)
            frames += len(prediction.rows)
    finally:
        net.train(was_training)
    if matrix is not None:
        matrix.all_reduce()
    return frames


def rng_isolated(loader):
    """Iterate `loader` without touching the global torch RNG (DataLoader draws a worker base
    seed from it per iterator): the training RNG stream then depends on the training alone,
    which is what lets a resumed run replay it exactly."""
    with torch.random.fork_rng(devices=[]):
        batches = iter(loader)
    while True:
        with torch.random.fork_rng(devices=[]):
            try:
                batch = next(batches)
            except StopIteration:
                return
        yield batch
