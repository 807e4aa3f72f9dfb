"""A TrainConfig turned into the parts of a training setup: loaders, model, loss, optimiser,
schedule. One factory per concern; the training run and the loader benchmark both use them.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from cache.errors import UserError
from cache.format import STATS_FILE
from loaders.contract import AugmentConfig
from loaders.factory import build_loader
from training.core.device import (DistEnv, autocast_context, choose_precision, resolve_amp,
                             resolve_channels_last)
from training.core.engine import TrainingParts
from training.core.losses import build_loss, load_class_weights, split_weights_spec
from training.core.memory import auto_val_batch
from training.core.model import build_model, canonical_arch, check_input_size, convert_sync_batchnorm, freeze_unused_parameters
from training.train.config import TrainConfig


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


# The weight methods of `dataprep stats`; `--class-weights enet` means the cache's stats.json.
CACHE_WEIGHT_METHODS = ("enet", "median_frequency", "inverse_sqrt")


def resolve_class_weights(spec: str | None, reader) -> str | None:
    """--class-weights auto: the ENet weights of the cache's stats.json (what `dataprep stats`
    writes) if it is there, else none; a method name alone (enet, ...): that method of the
    cache's stats.json, which must exist; anything else as given."""
    stats = Path(reader.path).absolute() / STATS_FILE
    if spec in CACHE_WEIGHT_METHODS:   # a method name alone: the cache's own stats.json
        if not stats.is_file():
            raise UserError(f"--class-weights {spec}: no {stats}; write it with "
                            f"`dataprep stats --cache {reader.path}`")
        return f"{stats}:{spec}"
    if spec is None or spec == "none":
        return None
    if spec != "auto":
        path, method = split_weights_spec(spec)
        return f"{path.absolute()}:{method}"     # a resume from another folder finds it
    return f"{stats}:enet" if stats.is_file() else None


def resolve_defaults(config: TrainConfig, reader, env: DistEnv) -> TrainConfig:
    """The config with every default that depends on the machine or the cache made explicit
    (device, precision, memory format, class weights, lr, weight decay, epochs), so that the
    saved config.yaml alone reproduces the run."""
    epochs = config.resolved_epochs if config.iters is None else None
    config = replace(config, device=str(env.device), amp=resolve_amp(config.amp, env.device),
                   channels_last=resolve_channels_last(config.channels_last, env.device),
                   class_weights=resolve_class_weights(config.class_weights, reader),
                   lr=config.resolved_lr, weight_decay=config.resolved_weight_decay,
                   epochs=epochs, cache=str(Path(reader.path).absolute()))
    return replace(config, val_batch_size=resolve_val_batch_size(config, reader, env))


def resolve_val_batch_size(config: TrainConfig, reader, env: DistEnv) -> int:
    """--val-batch-size auto (None): 1 on the CPU (as always); on CUDA the largest batch, up
    to 8, whose estimated peak (training.core.memory: the validation pass at the val frames' size,
    this run's precision, loss and optimiser state) fits the card with a margin. A number as
    given. Needs config's amp and channels_last resolved."""
    if config.val_batch_size is not None:
        return config.val_batch_size
    if env.device.type != "cuda":
        return auto_val_batch(env.device, config.arch, config.encoder, (0, 0), None)
    split = reader.split(config.train_split if config.folds is not None else config.val_split)
    return auto_val_batch(env.device, canonical_arch(config.arch), config.encoder,
                          (split.height, split.width), config.amp,
                          model_kwargs=dict(config.model_kwargs), num_classes=reader.num_classes,
                          eval_scale=config.eval_scale, loss=config.loss,
                          channels_last=bool(config.channels_last), optimizer=config.optimizer,
                          ddp=env.distributed)


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
