"""The defaults that depend on the machine or the cache, resolved once (device, precision,
memory format, class weights, lr, weight decay, epochs, the validation batch): the config a
run saves and builds from. training/train/builders.py builds parts from it (and resolves
--class-weights itself only for a config that did not come through here: the benchmarks').
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cache.errors import UserError
from cache.format import STATS_FILE
from training.core.device import DistEnv, resolve_amp, resolve_channels_last
from training.core.losses import split_weights_spec
from training.core.memory import auto_val_batch
from training.core.model import canonical_arch
from training.train.config import TrainConfig


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
