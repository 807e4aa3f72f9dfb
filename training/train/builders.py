"""A TrainConfig turned into the parts of a training setup: loaders, model, loss, optimiser,
schedule. One factory per concern; the training run and the loader benchmark both use them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from cache.errors import UserError
from loaders.contract import AugmentConfig
from loaders.factory import build_loader
from training.core.device import DistEnv, autocast_context, choose_precision, resolve_channels_last
from training.core.engine import TrainingParts
from training.core.losses import build_loss, load_class_weights
from training.core.model import (build_model, canonical_arch, check_input_size,
                                 convert_sync_batchnorm, freeze_unused_parameters)
from training.train.config import TrainConfig
from training.train.resolve import resolve_class_weights


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, power: float) -> float:
    """Multiplier of the base learning rate for optimiser step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1.0 - progress) ** power


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weight matrices and kernels only, not on biases or norm parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.resolved_weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.resolved_lr)
    return torch.optim.SGD(groups, lr=config.resolved_lr, momentum=config.momentum)


def build_scheduler(optimizer, config: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        return lr_factor(step, total=total_steps, warmup=config.warmup,
                         schedule=config.schedule, power=config.poly_power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def model_meta(config: TrainConfig, reader) -> dict:
    """What load_for_eval and evaluate need to rebuild the model and read its output."""
    return {"arch": canonical_arch(config.arch), "encoder": config.encoder,
            "model_kwargs": dict(config.model_kwargs), "num_classes": reader.num_classes,
            "class_names": reader.class_names, "ignore_index": reader.ignore_index,
            "res": list(config.res), "eval_scale": config.eval_scale,
            "encoder_weights": config.encoder_weights, "cache": reader.path,
            "loader": config.loader}


def build_training_model(config: TrainConfig, meta: dict, env: DistEnv) -> nn.Module:
    """The smp model on the device; SyncBatchNorm and DDP when distributed."""
    model = build_model(meta["arch"], meta["encoder"], meta["num_classes"],
                        config.encoder_weights, **meta["model_kwargs"]).to(env.device)
    if resolve_channels_last(config.channels_last, env.device):
        model = model.to(memory_format=torch.channels_last)
    check_input_size(model, tuple(config.res))
    freeze_unused_parameters(model, tuple(config.res))
    if env.distributed:
        if config.sync_bn:
            if env.device.type != "cuda":
                raise UserError("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not "
                                "run on the CPU); leave it out")
            model = convert_sync_batchnorm(model)
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def build_criterion(config: TrainConfig, reader, device: torch.device) -> nn.Module:
    weights = None
    spec = resolve_class_weights(config.class_weights, reader)
    if spec is not None:
        values = load_class_weights(spec, reader.num_classes)
        weights = torch.tensor(values, dtype=torch.float32, device=device)
    return build_loss(config.loss, ignore_index=reader.ignore_index, class_weights=weights).to(device)


def build_parts(config: TrainConfig, meta: dict, reader, env: DistEnv,
                total_steps: int | None) -> TrainingParts:
    """Model, loss, optimiser, grad scaler, autocast and (with total_steps) the LR schedule.
    The cheap checks (--amp, --class-weights) come before the model is built."""
    autocast = autocast_context(config.amp, env.device)
    criterion = build_criterion(config, reader, env.device)
    model = build_training_model(config, meta, env)
    optimizer = build_optimizer(model, config)
    scheduler = None if total_steps is None else build_scheduler(optimizer, config, total_steps)
    scaler = build_grad_scaler(config.amp, env.device)
    return TrainingParts(model, criterion, optimizer, scaler, autocast, scheduler)


def build_grad_scaler(amp: str | None, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling exactly when the run computes in fp16 (--amp fp16, or auto on a 7.x GPU);
    bf16 and float32 get a disabled scaler (a no-op in the training step)."""
    return torch.amp.GradScaler(device.type, enabled=choose_precision(amp, device).loss_scaling)


def augment_config(config: TrainConfig):
    aug = AugmentConfig(crop=tuple(config.res), scale=tuple(config.scale), flip_prob=config.flip_prob,
                        cat_max_ratio=config.cat_max_ratio, eval_scale=config.eval_scale)
    return aug if config.jitter else aug.no_jitter()


def build_split_loader(config: TrainConfig, env: DistEnv, *, train: bool, kind: str | None = None,
                       rows=None, fold=None):
    """The loader of the train split (train=True) or the val split, sharded for this rank;
    `kind` overrides --loader (the benchmark compares kinds); `rows` limits it to those rows."""
    split, batch_size = ((config.train_split, config.batch_size) if train else
                         (config.val_split, config.val_batch_size))
    if fold is not None:      # cross-validation: both sides are rows of the fold's split
        split, rows = fold.split, (fold.train_rows if train else fold.val_rows)
    return build_loader(config.cache, split, kind or config.loader, train=train,
                        batch_size=batch_size, aug=augment_config(config), device=env.device,
                        seed=config.seed, rank=env.rank, world_size=env.world_size,
                        num_workers=config.workers, rows=rows,
                        channels_last=resolve_channels_last(config.channels_last, env.device))
