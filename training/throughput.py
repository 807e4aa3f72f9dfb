"""What the loader costs training: images/s of real training steps fed by each loader kind,
against a "replay" ceiling that feeds one batch already on the device over and over
(scripts/bench_train.py reports it). loader_cost = 1 - images_per_s / ceiling.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from cache.errors import UserError
from cache.reader import CacheReader
from loaders.contract import endless
from training.core.device import DistEnv, seed_everything, single_process, synchronize
from training.core.engine import train_step
from training.train.builders import build_parts, build_split_loader, model_meta
from training.train.config import TrainConfig

BENCH_KINDS = ("replay", "torch", "dali")


class ReplayLoader:
    """Yields one batch, already on the device, forever: the loader-free ceiling."""

    def __init__(self, batch, length: int = 1_000_000):
        self.batch, self.length = batch, length

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for _ in range(self.length):
            yield self.batch


class TimedTraining:
    """A model, optimiser and loss fed by one loader, for timing training steps. `feed` moves
    it to another loader: benchmark_training times every kind on one model, so that only one
    model and optimiser state take GPU memory (a 6 GB card holds one, not three)."""

    def __init__(self, config: TrainConfig, loader, reader, env: DistEnv):
        seed_everything(config.seed, config.deterministic)
        self.device, self.batch_size = env.device, config.batch_size
        self.parts = build_parts(config, model_meta(config, reader), reader, env, total_steps=None)
        self.batches = endless(loader)

    def feed(self, batches) -> None:
        """Train on these batches (an endless iterator) from now on."""
        self.batches = batches

    def images_per_s(self, steps: int) -> float:
        """Train `steps` steps; images/s over them (the device drained before and after)."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = train_step(self.parts, self.batches, 1)
        loss.item()
        synchronize(self.device)
        return steps * self.batch_size / (time.perf_counter() - start)


def time_loader(loader, device: torch.device, *, iters: int, warmup: int) -> float:
    """images/s of the loader alone (batches produced on the device, nothing else)."""
    batches = endless(loader)
    for _ in range(warmup):
        next(batches)
    synchronize(device)
    start, images = time.perf_counter(), 0
    for _ in range(iters):
        images += next(batches).image.shape[0]
    synchronize(device)
    return images / (time.perf_counter() - start)


def check_request(kinds, iters: int, warmup: int, rounds: int) -> tuple[str, ...]:
    kinds = tuple(kinds)
    if not kinds or set(kinds) - set(BENCH_KINDS):
        raise UserError(f"--loaders {','.join(kinds)!r}: choose from {', '.join(BENCH_KINDS)}")
    for name, value, least in (("iters", iters, 1), ("warmup", warmup, 0), ("rounds", rounds, 1)):
        if value < least:
            raise UserError(f"--{name}: must be at least {least}, got {value}")
    return kinds


def benchmark_training(config: TrainConfig, kinds=BENCH_KINDS, *, iters: int = 20,
                       warmup: int = 5, rounds: int = 1) -> dict:
    """Training images/s with each loader kind against the replay ceiling. Single process.
    With rounds > 1 the kinds take turns, round after round, and the median counts: on a
    shared machine that spreads load changes over all kinds instead of charging them to one."""
    kinds = check_request(kinds, iters, warmup, rounds)
    env = single_process(config.device)
    reader = CacheReader(config.cache)
    loaders = {kind: build_split_loader(config, env, train=True, kind=kind)
               for kind in kinds if kind != "replay"}
    loader_only = {kind: time_loader(loader, env.device, iters=iters, warmup=warmup)
                   for kind, loader in loaders.items()}
    if "replay" in kinds:
        real = list(loaders.values())
        source = real[0] if real else build_split_loader(config, env, train=True, kind="torch")
        loaders["replay"] = ReplayLoader(next(iter(source)))
    # one model and optimiser for every kind (only one alive: GPU memory), fed by each in turn
    run = TimedTraining(config, loaders[kinds[0]], reader, env)
    feeds = {kind: run.batches if kind == kinds[0] else endless(loaders[kind]) for kind in kinds}
    for kind in kinds:
        if warmup:
            run.feed(feeds[kind])
            run.images_per_s(warmup)
    samples = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind in kinds:
            run.feed(feeds[kind])
            samples[kind].append(run.images_per_s(iters))
    del run, feeds
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    return {**_setting(config, env), "iters": iters, "warmup": warmup, "rounds": rounds,
            "results": _loader_costs(samples, loader_only)}


def _setting(config: TrainConfig, env: DistEnv) -> dict:
    """What the numbers depend on: the model, the input, the machine."""
    return {"device": str(env.device), "arch": config.arch, "encoder": config.encoder,
            "model_kwargs": dict(config.model_kwargs), "res": list(config.res),
            "batch_size": config.batch_size, "amp": config.amp, "workers": config.workers,
            "cache": config.cache, "torch_threads": torch.get_num_threads(),
            "host": platform.node(), "cpu_count": _cores(),
            "gpu": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else None,
            "torch": torch.__version__}


def _cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _loader_costs(samples: dict, loader_only: dict) -> dict:
    ceiling = statistics.median(samples["replay"]) if "replay" in samples else None
    results = {}
    for kind, values in samples.items():
        ips = statistics.median(values)
        results[kind] = {"images_per_s": ips, "samples": values,
                         "loader_only_images_per_s": loader_only.get(kind),
                         "loader_cost": None if ceiling is None else 1.0 - ips / ceiling}
    return results
