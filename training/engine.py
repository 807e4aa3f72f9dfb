"""The steps: one optimiser step, the steps of an epoch, and the one prediction pass that
validation during training and the `evaluate` command share.

Short functions over a model and a loader, as in torchvision's references/segmentation; when to
call them, and what to write afterwards, is training.run's business.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from training.device import unwrap
from training.tta import predict_logits


@dataclass
class TrainingParts:
    """What an optimiser step needs (built by training.builders.build_parts)."""

    model: nn.Module                 # on the device; DDP-wrapped under torchrun
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler     # a no-op unless --amp fp16
    autocast: Any                    # a reusable autocast (or null) context
    scheduler: Any = None            # LambdaLR stepped once per optimiser step, or None


def train_step(parts: TrainingParts, batches: Iterator, accum: int) -> torch.Tensor:
    """Forward/backward over `accum` micro-batches drawn from `batches`, then one optimiser
    step; returns the mean loss as a detached device tensor (reading it waits for the device)."""
    model = parts.model
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    total = None
    for i in range(accum):
        batch = next(batches, None)
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


def train_one_epoch(parts: TrainingParts, batches: Iterator, steps: int,
                    accum: int) -> Iterator[torch.Tensor]:
    """The mean loss of each of `steps` optimiser steps over `batches` (the rest of an epoch),
    yielded between steps: the caller logs, evaluates and checkpoints there, or stops."""
    parts.model.train()
    for _ in range(steps):
        yield train_step(parts, batches, accum)


class Prediction(NamedTuple):
    rows: list[int]                  # cache rows of the frames
    pred: torch.Tensor               # (B, H, W) int64 trainIds at the stored frame size
    mask: torch.Tensor | None        # (B, H, W) ground truth, None for a split without masks


@torch.no_grad()
def predict(model: nn.Module, batches, out_hw: tuple[int, int], *, limit: int | None = None,
            autocast=None, tta_scales: Sequence[float] = (1.0,),
            tta_flip: bool = False) -> Iterator[Prediction]:
    """Predictions of the first `limit` frames of evaluation `batches` (all without limit) at
    `out_hw`, the stored frame size, where the masks are: scores are those of the official
    script for the same predictions at full size. The caller puts the model in eval mode."""
    seen = 0
    for batch in batches:
        take = len(batch.rows) if limit is None else min(len(batch.rows), limit - seen)
        with autocast or nullcontext():
            logits = predict_logits(model, batch.image[:take], out_hw, scales=tta_scales,
                                    flip=tta_flip)
        mask = None if batch.mask is None else batch.mask[:take]
        yield Prediction(batch.rows[:take].tolist(), logits.argmax(1), mask)
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
