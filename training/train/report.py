"""What a training run says at its start (what it will do, and where) and at its end (what it
did, and what to run next). Plain lines: they go to the console above the progress bar, and
read the same in a log file."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from training.core.device import DistEnv, choose_precision
from training.train.config import TrainConfig


@dataclass(frozen=True)
class RunStart:
    """What the opening lines need to know about a run about to start (no Trainer)."""
    config: TrainConfig
    env: DistEnv
    train_loader: Any
    val_loader: Any
    steps_per_epoch: int
    total_steps: int
    step: int
    run_dir: Any


@dataclass(frozen=True)
class RunEnd:
    """What the closing lines need to know about a finished run (no Trainer)."""
    config: TrainConfig
    env: DistEnv
    run_dir: Any
    step: int
    best_miou: float | None
    best_step: int | None
    last_eval: dict | None
    timing: Any     # .wait_share, .seconds, .steps (training.train.run.TimingTotals)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def describe_loader(loader, kind: str) -> str:
    """Where the loader's work runs: the user's evidence of what feeds the model."""
    workers = getattr(loader, "num_workers", 0)
    device = getattr(loader, "device", torch.device("cpu"))
    if kind == "dali":
        place = f"DALI on the GPU ({device})" if device.type == "cuda" else "DALI CPU-only mode"
        return f"{place}, {workers} source worker(s) reading cache tiles"
    if device.type == "cuda":
        return (f"torch: {workers} DataLoader worker(s) read and resize uint8 windows; colour "
                f"jitter and normalisation on {device}")
    return f"torch: {workers} DataLoader worker(s) on the CPU do all the augmentation"


def describe_validation(every: int, total: int) -> str:
    if every >= total:
        return f"validation at the end (step {total})"
    return f"validation every {every} steps and at the end"


def describe_class_weights(spec: str | None) -> str:
    """The loss's class weights, as the run's opening lines show them."""
    if spec is None:
        return ("none (`dataprep stats` writes the cache's stats.json; then ENet weights are "
                "the default)")
    return f"{spec} (class weights of the loss; --class-weights none to train without)"


def banner_lines(trainer: RunStart) -> list[str]:
    config, env = trainer.config, trainer.env
    train_frames = len(trainer.train_loader.rows) if hasattr(trainer.train_loader, "rows") else None
    val_frames = len(trainer.val_loader.rows) if hasattr(trainer.val_loader, "rows") else None
    precision = choose_precision(config.amp, env.device).reason   # config.amp: already resolved
    layout = "channels_last" if config.channels_last else "NCHW"
    ranks = f" x {env.world_size} ranks" if env.distributed else ""
    epochs = trainer.total_steps / trainer.steps_per_epoch
    start = f", resuming at step {trainer.step}" if trainer.step else ""
    return [
        f"[bold]train[/] {config.arch} / {config.encoder} (encoder weights: "
        f"{config.encoder_weights or 'none'}) at {config.res[0]}x{config.res[1]}",
        f"  device      {env.device}{ranks}; {precision}; {layout}",
        f"  loader      {describe_loader(trainer.train_loader, config.loader)}",
        f"  data        {config.cache}: {config.train_split} {train_frames} frames, "
        f"{config.val_split} {val_frames} frames"
        + (f" (--limit {config.limit})" if config.limit else ""),
        f"  steps       {trainer.steps_per_epoch} per epoch x {epochs:.4g} epochs = "
        f"{trainer.total_steps} steps of {config.batch_size * config.grad_accum * env.world_size} "
        f"frames{start}; {describe_validation(config.eval_every, trainer.total_steps)}",
        f"  weights     {describe_class_weights(config.class_weights)}",
        f"  run dir     {trainer.run_dir} (config.yaml, metrics.jsonl, last.pt, best.pt)",
    ]


def wait_verdict(share: float, device: torch.device, loader: str) -> str:
    if share < 0.05:
        return "the loader kept up"
    if device.type != "cuda":
        return ("the CPU both loads and trains here, so they share its cores; on a GPU the "
                "loading overlaps the step")
    advice = "more --workers" if loader == "dali" else "more --workers, or --loader dali"
    return f"the GPU waited for data: {advice}"


def summary_lines(trainer: RunEnd) -> list[str]:
    run_dir, best = trainer.run_dir, trainer.best_miou
    final = (trainer.last_eval or {}).get("miou")
    pct = (lambda v: "n/a" if v is None else f"{100 * v:.2f}%")
    lines = [f"[bold]done[/]: {trainer.step} steps; best val mIoU {pct(best)}"
             + (f" at step {trainer.best_step}" if trainer.best_step is not None else "")
             + f", final {pct(final)}"]
    share = trainer.timing.wait_share
    if share is not None:
        seconds = trainer.timing.seconds / max(1, trainer.timing.steps)
        verdict = wait_verdict(share, trainer.env.device, trainer.config.loader)
        lines.append(f"  data wait   {100 * share:.1f}% of {seconds * 1000:.0f} ms per step "
                     f"({verdict})")
    lines += [f"  run dir     {run_dir}",
              f"  next        evaluate --checkpoint {run_dir / 'best.pt'} --cache {trainer.config.cache}"]
    return lines
