"""The training loop: `run_training(config)` trains, validates, checkpoints and plots.

Counting. A *step* is one optimiser step over `grad_accum` micro-batches of `batch_size`
frames on every rank. An epoch is one pass over the train loader (per rank `len(loader)`
micro-batches; the last `len % grad_accum` are left out), or `--limit` steps. `--iters`
counts steps; `--epochs` is turned into steps. Evaluation runs every `--eval-every` steps, or
at the end of every epoch without it, and always after the last step.

Exact resume. The loaders' sample order and augmentation are pure functions of (seed, epoch),
so the position in the data is (epoch, batches consumed in that epoch). last.pt is written
after every evaluation, at every epoch end, every `--checkpoint-every` steps and at the end,
always between optimiser steps; it holds that position together with the model, optimiser,
scheduler, grad scaler, every rank's RNG states and the partial log window. `--resume` loads
it, calls `set_epoch(epoch)` and skips the batches already consumed in that epoch; skipping
reads those batches (the loader contract has no seek), so checkpoints at epoch ends resume
with no skip at all. The global RNG stream is the model's alone: loaders are iterated inside
torch.random.fork_rng, so DataLoader's seed draw per iterator cannot shift it between a
resumed and an uninterrupted run. metrics.jsonl is cut back to the checkpoint's step, so
that a resumed run's log equals an uninterrupted one's.

Distributed. Under torchrun (WORLD_SIZE > 1) each rank trains on its shard
(rank/world_size go to build_loader), gradients are averaged by DDP, BatchNorm buffers are
broadcast from rank 0 before every evaluation (so all ranks hold identical weights), the
confusion matrix is summed over ranks, and only rank 0 writes files and shows progress.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cache.format import UserError
from training.config import TrainConfig, save_config

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"


# -- devices and processes --------------------------------------------------------------------

@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str | None, local_rank: int = 0) -> torch.device:
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {requested!r}: not a torch device (try cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(requested_device: str | None) -> DistEnv:
    """Single process, or one rank of a torchrun job (env:// rendezvous; gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method="env://")
    return DistEnv(rank, world_size, local_rank, device)


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few CUDA backward kernels (bilinear upsampling) have no deterministic
        # version; on the CPU everything used here is deterministic.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def autocast_context(amp: str | None, device: torch.device):
    """Autocast for --amp, refusing what the device cannot do."""
    if amp is None:
        return nullcontext()
    if device.type == "cpu" and amp == "fp16":
        raise UserError("--amp fp16 needs a CUDA device (CPU autocast runs bf16 only); "
                        "use --amp bf16 or leave --amp out")
    if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                        "use --amp fp16")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics (DDP averages gradients, not buffers)."""
    if dist.is_available() and dist.is_initialized():
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


# -- the parts of a training setup ------------------------------------------------------------

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
    from training.model import canonical_arch

    return {"arch": canonical_arch(config.arch), "encoder": config.encoder,
            "model_kwargs": dict(config.model_kwargs), "num_classes": reader.num_classes,
            "class_names": reader.class_names, "ignore_index": reader.ignore_index,
            "res": list(config.res), "eval_scale": config.eval_scale,
            "encoder_weights": config.encoder_weights, "cache": reader.path,
            "loader": config.loader}


def build_training_model(config: TrainConfig, meta: dict, env: DistEnv) -> nn.Module:
    """The smp model on the device; SyncBatchNorm and DDP when distributed."""
    from training.model import build_model, convert_sync_batchnorm, freeze_unused_parameters

    model = build_model(meta["arch"], meta["encoder"], meta["num_classes"],
                        config.encoder_weights, **meta["model_kwargs"]).to(env.device)
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
    from training.losses import build_loss, load_class_weights

    weights = None
    if config.class_weights is not None:
        values = load_class_weights(config.class_weights, reader.num_classes)
        weights = torch.tensor(values, dtype=torch.float32, device=device)
    return build_loss(config.loss, ignore_index=reader.ignore_index, class_weights=weights).to(device)


def augment_config(config: TrainConfig):
    from loaders.contract import AugmentConfig

    aug = AugmentConfig(crop=tuple(config.res), scale=tuple(config.scale), flip_prob=config.flip_prob,
                        cat_max_ratio=config.cat_max_ratio, eval_scale=config.eval_scale)
    return aug if config.jitter else aug.no_jitter()


def build_loaders(config: TrainConfig, env: DistEnv):
    from loaders.contract import build_loader

    aug = augment_config(config)
    common = dict(aug=aug, device=env.device, seed=config.seed, rank=env.rank,
                  world_size=env.world_size, num_workers=config.workers)
    train = build_loader(config.cache, config.train_split, config.loader, train=True,
                         batch_size=config.batch_size, **common)
    val = build_loader(config.cache, config.val_split, config.loader, train=False,
                       batch_size=config.val_batch_size, **common)
    return train, val


def train_step(model: nn.Module, batches, accum: int, criterion: nn.Module, optimizer,
               scaler, autocast) -> torch.Tensor:
    """Forward/backward over `accum` micro-batches drawn from `batches`, then one optimiser
    step; returns the mean loss as a detached device tensor (reading it waits for the device)."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    total = None
    for i in range(accum):
        batch = next(batches, None)
        if batch is None:
            raise RuntimeError("the loader yielded fewer batches than its len() promised")
        # DDP all-reduces gradients on the last micro-batch only
        with (nullcontext() if i == accum - 1 or not ddp else model.no_sync()):
            with autocast:
                logits = model(batch.image)
            loss = criterion(logits, batch.mask) / accum
            scaler.scale(loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, *, num_classes: int, ignore_index: int,
                   class_names: list[str], autocast, limit: int | None = None) -> dict:
    """Scores over the validation loader (summed over ranks): predictions are made at the
    mask's resolution, as the `evaluate` command and the official script do."""
    from training.metrics import ConfusionMatrix
    from training.tta import predict_logits

    net = unwrap(model)
    was_training = net.training
    net.eval()
    matrix = ConfusionMatrix(num_classes, ignore_index)
    frames = 0
    for batch in loader:
        if limit is not None and frames >= limit:
            break
        with autocast:
            logits = predict_logits(net, batch.image, tuple(batch.mask.shape[-2:]))
        matrix.update(logits.argmax(1), batch.mask)
        frames += batch.image.shape[0]
    matrix.all_reduce()
    net.train(was_training)
    scores = matrix.compute(class_names)
    return {key: scores[key] for key in ("miou", "pixel_accuracy", "class_iou",
                                         "category_iou", "category_miou", "pixels")}


class TrainProgress:
    """Rich progress bar with loss, lr and images/s (rank 0 only; silent elsewhere)."""

    def __init__(self, enabled: bool, total: int, completed: int):
        self.progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(
            TextColumn("[bold]train[/] ep {task.fields[epoch]}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"), TextColumn("{task.fields[ips]} img/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self.task = self.progress.add_task("train", total=total, completed=completed, epoch=0,
                                           loss="-", lr="-", ips="-")
        self.progress.start()

    def update(self, step: int, **fields) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, **fields)

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, soft_wrap=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    best_miou: float | None
    last_eval: dict | None
    model: nn.Module = field(repr=False)


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


def gather_rng_states(env: DistEnv) -> list[dict]:
    from training.checkpoint import capture_rng

    states = [None] * env.world_size
    if env.distributed:
        dist.all_gather_object(states, capture_rng())
    else:
        states[0] = capture_rng()
    return states


def run_training(config: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Train per `config` (one process, or one rank of a torchrun job); see the module docstring."""
    env = init_distributed(config.device)
    try:
        return Trainer(config, env, resume=resume).run()
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    """One training run: the parts, the position in the data, and the run dir's files."""

    def __init__(self, config: TrainConfig, env: DistEnv, *, resume: bool = False):
        from cache.reader import CacheReader

        self.config, self.env, self.run_dir = config, env, Path(config.out)
        seed_everything(config.seed, config.deterministic)
        self.autocast = autocast_context(config.amp, env.device)
        self.reader = CacheReader(config.cache)
        if not self.reader.split(config.val_split).has_masks:
            raise UserError(f"--val-split {config.val_split}: this split has no masks; "
                            "validation needs a labelled split such as val")
        self.meta = model_meta(config, self.reader)
        checkpoint = self._open_checkpoint(resume)     # before anything big is built
        self.train_loader, self.val_loader = build_loaders(config, env)
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = config.iters or config.resolved_epochs * self.steps_per_epoch
        self.model = build_training_model(config, self.meta, env)
        self.criterion = build_criterion(config, self.reader, env.device)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=config.amp == "fp16")
        self.epoch = self.batch_in_epoch = self.step = 0
        self.best_miou: float | None = None
        self.last_eval: dict | None = None
        self.saved_step = self.evaluated_step = -1
        self._reset_window()
        if checkpoint is not None:
            self._restore(*checkpoint)
        if env.is_main:
            self._prepare_run_dir(resumed=checkpoint is not None)

    def _open_checkpoint(self, resume: bool) -> tuple[Path, dict] | None:
        """(path, contents) of the checkpoint to resume from, if any. Refuses to overwrite a
        run by accident, and a checkpoint of another model."""
        from training.checkpoint import check_compatible, load_checkpoint

        last = self.run_dir / LAST
        if not resume:
            if last.is_file():
                raise UserError(f"--out {self.run_dir}: holds a run already ({LAST}); pass "
                                "--resume to continue it, or choose another --out")
            return None
        if not last.is_file():
            self._note(f"--resume: no {LAST} in {self.run_dir}; starting from step 0")
            return None
        data = load_checkpoint(last)
        check_compatible(data["meta"], self.meta, last)
        return last, data

    def _prepare_run_dir(self, resumed: bool) -> None:
        from training.plots import truncate_metrics

        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.run_dir)
        if not resumed:     # a run killed before its first checkpoint may have left lines
            truncate_metrics(self.run_dir / METRICS, 0)

    def _steps_per_epoch(self) -> int:
        steps = len(self.train_loader) // self.config.grad_accum
        if self.config.limit is not None:
            steps = min(steps, self.config.limit)
        if steps < 1:
            raise UserError(f"--grad-accum {self.config.grad_accum}: more than the "
                            f"{len(self.train_loader)} batches of an epoch")
        return steps

    def _reset_window(self) -> None:
        """The loss since the last log line, and the training time and steps behind images/s."""
        self.window_loss = torch.zeros((), device=self.env.device)
        self.window_steps = 0
        self._reset_timer()

    def _reset_timer(self) -> None:
        """images/s counts training only: restarted after evaluations and checkpoints."""
        self.timer_start, self.timer_steps = time.perf_counter(), 0

    def _note(self, text: str) -> None:
        if self.env.is_main:
            from rich.console import Console

            Console(stderr=True).print(text, soft_wrap=True)

    # -- checkpoints ------------------------------------------------------------------------
    def _restore(self, path: Path, data: dict) -> None:
        from training.checkpoint import load_model_state, restore_rng
        from training.plots import truncate_metrics

        load_model_state(unwrap(self.model), data["model"], path)
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        self.scaler.load_state_dict(data["scaler"])
        progress = data["progress"]
        self.epoch, self.batch_in_epoch = progress["epoch"], progress["batch_in_epoch"]
        self.step, self.best_miou = progress["step"], progress["best_miou"]
        self.saved_step, self.evaluated_step = self.step, progress["evaluated_step"]
        self.window_loss += data["log_window"]["loss_sum"]
        self.window_steps = data["log_window"]["steps"]
        states = data["rng"]
        if len(states) != self.env.world_size:
            self._note(f"resume: checkpoint from {len(states)} rank(s), now {self.env.world_size}; "
                       "the data shards differ, so this is not an exact continuation")
        restore_rng(states[self.env.rank] if len(states) == self.env.world_size else states[0])
        if self.env.is_main:
            truncate_metrics(self.run_dir / METRICS, self.step)
            self._note(f"resumed {path} at step {self.step} (epoch {self.epoch}, "
                       f"batch {self.batch_in_epoch})")

    def _save_last(self) -> None:
        """last.pt with everything an exact resume needs (all ranks take part: RNG gather)."""
        from training.checkpoint import save_checkpoint

        rng = gather_rng_states(self.env)
        self.saved_step = self.step
        if not self.env.is_main:
            return
        save_checkpoint(self.run_dir / LAST, {
            "meta": self.meta, "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "progress": self._progress(), "rng": rng,
            "config": self.config.to_dict(), "world_size": self.env.world_size,
            "log_window": {"loss_sum": float(self.window_loss), "steps": self.window_steps},
        })

    def _save_best(self, scores: dict) -> None:
        from training.checkpoint import save_checkpoint

        save_checkpoint(self.run_dir / BEST, {
            "meta": self.meta, "model": unwrap(self.model).state_dict(),
            "progress": self._progress(), "scores": {"miou": scores["miou"],
                                                     "pixel_accuracy": scores["pixel_accuracy"]},
            "config": self.config.to_dict(),
        })

    def _progress(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "best_miou": self.best_miou, "total_steps": self.total_steps,
                "evaluated_step": self.evaluated_step}

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self.progress = TrainProgress(self.env.is_main, self.total_steps, self.step)
        self.model.train()
        try:
            while self.step < self.total_steps:
                self._train_epoch()
            if self.evaluated_step != self.step:
                self._evaluate_and_save()
            elif self.saved_step != self.step:
                self._save_last()
        finally:
            self.progress.stop()
        if self.env.is_main and self.config.plots:
            self._write_plots()
        return TrainResult(self.run_dir, self.step, self.epoch, self.best_miou, self.last_eval,
                           unwrap(self.model))

    def _train_epoch(self) -> None:
        """Steps from the current position to the end of the epoch (or of training)."""
        accum, epoch_batches = self.config.grad_accum, self.steps_per_epoch * self.config.grad_accum
        self.train_loader.set_epoch(self.epoch)
        batches = rng_isolated(self.train_loader)
        for _ in range(self.batch_in_epoch):          # resume mid-epoch: replay the position
            next(batches)
        epoch_end = False
        while not epoch_end and self.step < self.total_steps:
            self.window_loss += train_step(self.model, batches, accum, self.criterion,
                                           self.optimizer, self.scaler, self.autocast)
            self.scheduler.step()
            self.step, self.window_steps = self.step + 1, self.window_steps + 1
            self.timer_steps += 1
            self.batch_in_epoch += accum
            if self.batch_in_epoch >= epoch_batches:   # position = start of the next epoch
                self.epoch, self.batch_in_epoch, epoch_end = self.epoch + 1, 0, True
            self.progress.update(self.step)
            self._after_step(epoch_end)
        batches.close()

    def _after_step(self, epoch_end: bool) -> None:
        config, step = self.config, self.step
        if step % config.log_every == 0 or step == self.total_steps:
            self._log_train()
        every = config.eval_every
        if (every and step % every == 0) or (every is None and epoch_end):
            self._evaluate_and_save()
            self._reset_timer()
        elif epoch_end or (config.checkpoint_every and step % config.checkpoint_every == 0):
            self._save_last()
            self._reset_timer()

    def _log_train(self) -> None:
        """One metrics.jsonl line with the mean loss since the last line (over all ranks)."""
        loss = self.window_loss.detach().clone()
        if self.env.distributed:
            dist.all_reduce(loss)
            loss /= self.env.world_size
        seconds = time.perf_counter() - self.timer_start
        images = self.timer_steps * self.config.batch_size * self.config.grad_accum * self.env.world_size
        record = {"event": "train", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                  "loss": loss.item() / max(1, self.window_steps),
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "images_per_s": images / seconds if seconds > 0 else None}
        self._reset_window()
        if self.env.is_main:
            self._append(record)
            self.progress.update(self.step, epoch=f"{record['epoch']:.2f}", loss=f"{record['loss']:.4f}",
                                 lr=f"{record['lr']:.2e}", ips=f"{record['images_per_s'] or 0:.1f}")

    # -- evaluation and the run dir ---------------------------------------------------------
    def _evaluate_and_save(self) -> None:
        broadcast_buffers(self.model)     # every rank evaluates (and keeps) rank 0's BN stats
        scores = evaluate_model(
            self.model, rng_isolated(self.val_loader), num_classes=self.reader.num_classes,
            ignore_index=self.reader.ignore_index, class_names=self.reader.class_names,
            autocast=self.autocast, limit=self.config.limit)
        self.evaluated_step, self.last_eval = self.step, scores
        miou = scores["miou"]
        improved = miou is not None and (self.best_miou is None or miou > self.best_miou)
        if improved:
            self.best_miou = miou
            if self.env.is_main:
                self._save_best(scores)
        self._save_last()
        if self.env.is_main:
            self._append({"event": "eval", "step": self.step,
                          "epoch": self.step / self.steps_per_epoch, "best": improved, **scores})
            shown = "n/a" if miou is None else f"{100 * miou:.2f}"
            self.progress.note(f"step {self.step}: val mIoU {shown}"
                               f"{' (best)' if improved else ''}")
            if self.config.plots:
                self._write_plots()

    def _append(self, record: dict) -> None:
        from training.plots import append_metrics

        append_metrics(self.run_dir / METRICS, {**record, "time": time.time()})

    def _write_plots(self) -> None:
        from training.plots import read_metrics, write_plots

        write_plots(read_metrics(self.run_dir / METRICS), self.run_dir)


# -- training throughput with each loader (scripts/bench_train.py) ----------------------------

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


def endless(loader):
    """Batches across epoch boundaries (set_epoch 0, 1, ...)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedTraining:
    """A model, optimiser and loss fed by one loader, for timing training steps."""

    def __init__(self, config: TrainConfig, loader, reader, env: DistEnv):
        seed_everything(config.seed, config.deterministic)
        self.device, self.batch_size = env.device, config.batch_size
        self.model = build_training_model(config, model_meta(config, reader), env)
        self.criterion = build_criterion(config, reader, env.device)
        self.optimizer = build_optimizer(self.model, config)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=config.amp == "fp16")
        self.autocast = autocast_context(config.amp, env.device)
        self.batches = endless(loader)

    def images_per_s(self, steps: int) -> float:
        """Train `steps` steps; images/s over them (the device drained before and after)."""
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = train_step(self.model, self.batches, 1, self.criterion, self.optimizer,
                              self.scaler, self.autocast)
        loss.item()
        _sync(self.device)
        return steps * self.batch_size / (time.perf_counter() - start)


def time_loader(loader, device: torch.device, *, iters: int, warmup: int) -> float:
    """images/s of the loader alone (batches produced on the device, nothing else)."""
    batches = endless(loader)
    for _ in range(warmup):
        next(batches)
    _sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(iters):
        images += next(batches).image.shape[0]
    _sync(device)
    return images / (time.perf_counter() - start)


def benchmark_training(config: TrainConfig, kinds=("replay", "torch", "dali"), *, iters: int = 20,
                       warmup: int = 5, rounds: int = 1) -> dict:
    """Training images/s with each loader kind against the replay ceiling (one batch kept on
    the device); loader_cost = 1 - images_per_s / ceiling. Single process. With rounds > 1
    the kinds take turns, round after round, and the median counts: on a shared machine
    that spreads load changes over all kinds instead of charging them to one."""
    from cache.reader import CacheReader
    from loaders.contract import build_loader

    env = DistEnv(0, 1, 0, resolve_device(config.device))
    reader = CacheReader(config.cache)
    aug = augment_config(config)

    def real_loader(kind):
        return build_loader(config.cache, config.train_split, kind, train=True,
                            batch_size=config.batch_size, aug=aug, device=env.device,
                            seed=config.seed, num_workers=config.workers)

    loaders = {kind: real_loader(kind) for kind in kinds if kind != "replay"}
    loader_only = {kind: time_loader(loader, env.device, iters=iters, warmup=warmup)
                   for kind, loader in loaders.items()}
    if "replay" in kinds:
        source = loaders.get("torch") or loaders.get("dali") or real_loader("torch")
        loaders["replay"] = ReplayLoader(next(iter(source)))
    runs = {kind: TimedTraining(config, loaders[kind], reader, env) for kind in kinds}
    for run in runs.values():
        run.images_per_s(warmup)
    samples = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind, run in runs.items():
            samples[kind].append(run.images_per_s(iters))
    return {"device": str(env.device), "arch": config.arch, "encoder": config.encoder,
            "model_kwargs": dict(config.model_kwargs), "res": list(config.res),
            "batch_size": config.batch_size, "amp": config.amp, "iters": iters, "warmup": warmup,
            "rounds": rounds, "workers": config.workers, "torch_threads": torch.get_num_threads(),
            "results": _loader_costs(samples, loader_only)}


def _loader_costs(samples: dict, loader_only: dict) -> dict:
    import statistics

    ceiling = statistics.median(samples["replay"]) if "replay" in samples else None
    results = {}
    for kind, values in samples.items():
        ips = statistics.median(values)
        results[kind] = {"images_per_s": ips, "samples": values,
                         "loader_only_images_per_s": loader_only.get(kind),
                         "loader_cost": None if ceiling is None else 1.0 - ips / ceiling}
    return results
