"""A training run: `run_training(config)` trains, validates, checkpoints, logs and plots.

Counting. A *step* is one optimiser step over `grad_accum` micro-batches of `batch_size`
frames on every rank. An epoch is one pass over the train loader (per rank `len(loader)`
micro-batches; the last `len % grad_accum` are left out), or `--limit` steps. `--iters`
counts steps; `--epochs` is turned into steps. Evaluation runs every `--eval-every` steps, or
at the end of every epoch without it, and always after the last step.

Exact resume. The loaders' sample order and augmentation are pure functions of (seed, epoch),
so the step count alone says where in the data a run is: epoch = step // steps_per_epoch, and
(step % steps_per_epoch) * grad_accum batches of that epoch consumed. last.pt is written
after every evaluation, at every epoch end, every `--checkpoint-every` steps and at the end,
always between optimiser steps; it holds that position together with the model, optimiser,
scheduler, grad scaler, every rank's RNG states and the partial log window. `--resume` loads
it, calls `set_epoch(epoch)` and skips the batches already consumed in that epoch; skipping
reads those batches (the loader contract has no seek), so checkpoints at epoch ends resume
with no skip at all. The global RNG stream is the model's alone: loaders are iterated inside
torch.random.fork_rng, so DataLoader's seed draw per iterator cannot shift it between a
resumed and an uninterrupted run. metrics.jsonl is cut back to the checkpoint's step, so
that a resumed run's log equals an uninterrupted one's.

The run dir. `--out` is claimed with a marker file before anything else is written
(training.outputs.folder): a new or empty folder becomes a run dir, a non-empty folder without
the marker is refused, and the marker records once that a last.pt was written, so that a run
whose last.pt was deleted is refused rather than replaced (an older run dir without marker is
known by its last.pt). A run dir with no checkpoint yet (killed before the first one) starts
again from step 0, with or without --resume; --resume into a new folder starts a new run (the
SLURM script always passes it).

Failures. A write that fails (a full disk) and a divergence each end the run with one line:
what happened, at which step, the last good checkpoint, what to do. The loss is only read at
log points: a non-finite mean loss there (written as null in metrics.jsonl) stops the run when
the weights are no longer finite, or after DIVERGED_AFTER_LOGS such lines in a row (fp16's
GradScaler skips the odd overflowing step). Before each evaluation and checkpoint the weights
are checked, so last.pt and best.pt never hold non-finite weights.

Distributed. Under torchrun (WORLD_SIZE > 1) each rank trains on its shard
(rank/world_size go to build_loader), gradients are averaged by DDP, BatchNorm buffers are
broadcast from rank 0 before every evaluation (so all ranks hold identical weights), the
confusion matrix is summed over ranks, and only rank 0 writes files and shows progress.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from torch import nn

from cache.errors import UserError
from cache.reader import CacheReader
from training.core.device import (DistEnv, broadcast_buffers, init_distributed, seed_everything,
                             unwrap)
from training.core.engine import evaluate, rng_isolated, train_one_epoch
from training.core.metrics import ConfusionMatrix
from training.train.builders import build_parts, build_split_loader, model_meta
from training.train.resolve import resolve_defaults
from training.train.config import TrainConfig
from training.train.folds import fold_for_config
from training.train.guards import DIVERGED_AFTER_LOGS, RunGuardsMixin
from training.train.init_from import load_initial_weights
from training.train.preempt import Preempted, StopSignals
from training.train.progress import LogWindow, TimingTotals, TrainProgress
from training.train.report import RunEnd, RunStart, banner_lines, summary_lines
from training.train.run_dir import BEST, LAST, RunDirMixin
from training.train.tensorboard import TensorBoardSink

# The scores an "eval" line of metrics.jsonl keeps (the confusion matrix goes to `evaluate`'s JSON).
EVAL_LOG_KEYS = ("miou", "pixel_accuracy", "class_iou", "category_iou", "category_miou", "pixels")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    best_miou: float | None
    last_eval: dict | None
    model: nn.Module = field(repr=False)


def run_training(config: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Train per `config` (one process, or one rank of a torchrun job); see the module docstring."""
    env = init_distributed(config.device)
    try:
        with StopSignals() as stop:     # before any loader worker is forked: they inherit it
            return Trainer(config, env, resume=resume, stop=stop).run()
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


class Trainer(RunDirMixin, RunGuardsMixin):
    """One training run: the parts, the position in the data, and the run dir's files."""

    def __init__(self, config: TrainConfig, env: DistEnv, *, resume: bool = False, stop=None):
        self.config, self.env, self.run_dir = config, env, Path(config.out)
        self.console = Console(stderr=True) if env.is_main else None
        seed_everything(config.seed, config.deterministic)
        self.reader = CacheReader(config.cache)
        self.stop = stop                   # a training.train.preempt.StopSignals, or None
        self.fold = fold_for_config(config, self.reader)     # cross-validation: val is a fold
        if self.fold is not None:
            fold = self.fold
            self._note(f"fold {fold.index} of {fold.k}: validating on {len(fold.val_rows)} frames "
                       f"of {fold.split} ({', '.join(fold.val_cities)}), training on the other "
                       f"{len(fold.train_rows)}; --val-split is not used")
        val = self.reader.split(self.fold.split if self.fold else config.val_split)
        if not val.has_masks:
            raise UserError(f"--val-split {config.val_split}: this split has no masks; "
                            "validation needs a labelled split such as val")
        self.val_hw = (val.height, val.width)
        self.config = config = resolve_defaults(config, self.reader, env)
        self.meta = model_meta(config, self.reader)
        checkpoint = self._open_checkpoint(resume)     # before anything big is built
        if checkpoint is None and config.init_from and not Path(config.init_from).is_file():
            raise UserError(f"--init-from {config.init_from}: no such checkpoint file")
        self.train_loader = build_split_loader(config, env, train=True, fold=self.fold)
        self.val_loader = build_split_loader(config, env, train=False, fold=self.fold)
        self.steps_per_epoch = self._steps_per_epoch()
        self._keep_loader_streams()
        self.config = config = replace(config,
                                       eval_every=config.eval_every or self.steps_per_epoch)
        self.total_steps = config.iters or config.resolved_epochs * self.steps_per_epoch
        self.parts = build_parts(config, self.meta, self.reader, env, self.total_steps)
        self.resumed_finished = False
        self.step, self.best_miou, self.last_eval = 0, None, None
        self.best_step = None
        self.saved_step = self.evaluated_step = -1
        self.good_step = None           # the step of the last last.pt written (or resumed from)
        self.nonfinite_logs = 0         # consecutive log lines with a non-finite loss
        self.window = LogWindow(env.device)
        self.timing = TimingTotals()
        self.tensorboard = None        # a TensorBoardSink while run() runs, with --tensorboard
        if checkpoint is not None:
            self._restore(*checkpoint)
        elif config.init_from:             # weights only: optimiser, schedule and step are new
            self._note(load_initial_weights(unwrap(self.parts.model), config.init_from, self.meta))
        if env.is_main:
            self._prepare_run_dir(resumed=checkpoint is not None)

    # -- the position in the data: derived from the step count --------------------------------
    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def batch_in_epoch(self) -> int:
        """Micro-batches of the current epoch already consumed."""
        return self.step % self.steps_per_epoch * self.config.grad_accum

    def _keep_loader_streams(self) -> None:
        """Epochs consume exactly what the loaders yield, so that their streams run on from
        one epoch into the next: a training epoch is steps_per_epoch * grad_accum batches
        (fewer than len() with --limit, or a --grad-accum that does not divide it), a limited
        validation the batches holding its --limit frames."""
        self.train_loader.limit_epochs(self.steps_per_epoch * self.config.grad_accum)
        if self.config.limit is not None:
            self.val_loader.limit_epochs(-(-self.config.limit // self.config.val_batch_size))

    def _steps_per_epoch(self) -> int:
        steps = len(self.train_loader) // self.config.grad_accum
        if self.config.limit is not None:
            steps = min(steps, self.config.limit)
        if steps < 1:
            raise UserError(f"--grad-accum {self.config.grad_accum}: more than the "
                            f"{len(self.train_loader)} batches of an epoch")
        return steps

    def _note(self, text: str) -> None:
        if self.console is not None:      # above the progress bar while it runs
            self.console.print(text, soft_wrap=True)


    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        if self.step >= self.total_steps and self.evaluated_step == self.step:
            self.resumed_finished = True
            self._note(f"{self.run_dir}: this run finished already at step {self.step} of "
                       f"{self.total_steps}; nothing to train. Raise --iters/--epochs to go on, "
                       f"or evaluate it: evaluate --checkpoint {self.run_dir / BEST}")
            return self._result()
        self._banner()
        self.progress = TrainProgress(self.console, self.total_steps, self.step)
        if self.env.is_main and self.config.tensorboard:
            self.tensorboard = TensorBoardSink(self.run_dir, start_step=self.step)
            self._note(f"  tensorboard {self.tensorboard.log_dir} (watch: tensorboard --logdir "
                       f"{self.tensorboard.log_dir})")
        try:
            while self.step < self.total_steps:
                self._train_epoch()
            if self.evaluated_step != self.step:
                self._evaluate_and_save()
            elif self.saved_step != self.step:
                self._save_last()
        finally:
            self.progress.stop()
            if self.tensorboard is not None:
                self.tensorboard.close()
        if self.env.is_main and self.config.plots:
            self._write_plots()
        self._summary()
        return self._result()

    def _result(self) -> TrainResult:
        return TrainResult(self.run_dir, self.step, self.epoch, self.best_miou, self.last_eval,
                           unwrap(self.parts.model))

    def _banner(self) -> None:
        """What this run will do and where, before the first step."""
        if self.console is None:
            return
        start = RunStart(self.config, self.env, self.train_loader, self.val_loader,
                         self.steps_per_epoch, self.total_steps, self.step, self.run_dir)
        for line in banner_lines(start):
            self.console.print(line, soft_wrap=True, highlight=False)

    def _summary(self) -> None:
        """What the run did, and what to run next."""
        if self.console is None:
            return
        end = RunEnd(self.config, self.env, self.run_dir, self.step, self.best_miou, self.best_step,
                     self.last_eval, self.timing)
        for line in summary_lines(end):
            self.console.print(line, soft_wrap=True, highlight=False)

    def _train_epoch(self) -> None:
        """Steps from the current position to the end of the epoch (or of training)."""
        self.train_loader.set_epoch(self.epoch)
        batches = rng_isolated(self.train_loader)
        for _ in range(self.batch_in_epoch):          # resume mid-epoch: replay the position
            next(batches)
        left_in_epoch = self.steps_per_epoch - self.step % self.steps_per_epoch
        steps = min(left_in_epoch, self.total_steps - self.step)
        for loss in train_one_epoch(self.parts, batches, steps, self.config.grad_accum,
                                    self.window.wait):
            self.step += 1
            self.window.add(loss)
            self.progress.update(self.step)
            self._after_step()
        batches.close()

    def _after_step(self) -> None:
        """The step's cadences: a log line, then an evaluation or a checkpoint."""
        config, step = self.config, self.step
        epoch_end = step % self.steps_per_epoch == 0
        if step % config.log_every == 0 or step == self.total_steps:
            self._log_train()
        every = config.eval_every
        if (every and step % every == 0) or (every is None and epoch_end):
            self._evaluate_and_save()
            self.window.restart_timer()
        elif epoch_end or (config.checkpoint_every and step % config.checkpoint_every == 0):
            self._save_last()
            self.window.restart_timer()
        self._stop_if_asked()

    def _stop_if_asked(self) -> None:
        """After SIGTERM/SIGUSR1 (training.train.preempt): last.pt at this step, then Preempted. The
        step's own evaluation or checkpoint came first, so a resumed run skips nothing. Under
        torchrun the ranks agree at log steps only (where the loop synchronises anyway)."""
        if self.stop is None or self.step >= self.total_steps:
            return
        if self.env.distributed and self.step % self.config.log_every:
            return
        signum = self.stop.agreed(self.env)
        if signum is None:
            return
        if self.saved_step != self.step:
            self._save_last()
        raise Preempted(signum, self.step, self.run_dir / LAST)

    def _log_train(self) -> None:
        """One metrics.jsonl line with the mean loss since the last line (over all ranks)."""
        loss, timed_steps, seconds, waited = self.window.close(self.env)
        config = self.config
        images = timed_steps * config.batch_size * config.grad_accum * self.env.world_size
        step_time = seconds / timed_steps if timed_steps else None
        data_time = waited / timed_steps if timed_steps else None
        record = {"event": "train", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                  "loss": loss, "lr": self.parts.optimizer.param_groups[0]["lr"],
                  "images_per_s": images / seconds if seconds > 0 and timed_steps else None,
                  "step_time": step_time, "data_time": data_time}
        if timed_steps:
            self.timing.add(timed_steps, seconds, waited)
        if self.env.is_main:
            self._append(record)        # a non-finite loss is written as null
        self._check_loss(loss)
        if self.env.is_main:
            wait = "-" if not step_time else f"{100 * data_time / step_time:.0f}%"
            self.progress.update(self.step, epoch=f"{record['epoch']:.2f}", loss=f"{loss:.4f}",
                                 lr=f"{record['lr']:.2e}", ips=f"{record['images_per_s'] or 0:.1f}",
                                 wait=wait)


    # -- evaluation -------------------------------------------------------------------------
    def _evaluate_and_save(self) -> None:
        self._stop_if_diverged()        # scores of non-finite weights would mean nothing
        broadcast_buffers(self.parts.model)     # every rank evaluates (and keeps) rank 0's BN stats
        scores = self._validate()
        self.evaluated_step, self.last_eval = self.step, scores
        miou = scores["miou"]
        improved = miou is not None and (self.best_miou is None or miou > self.best_miou)
        if improved:
            self.best_miou, self.best_step = miou, self.step
            if self.env.is_main:
                self._save_best(scores)
        self._save_last()
        if self.env.is_main:
            self._append({"event": "eval", "step": self.step,
                          "epoch": self.step / self.steps_per_epoch, "best": improved, **scores})
            shown = "n/a" if miou is None else f"{100 * miou:.2f}"
            self._note(f"step {self.step}: val mIoU {shown}{' (best)' if improved else ''}")
            if self.config.plots:
                self._write_plots()

    def _validate(self) -> dict:
        """Scores of the val split (or its first --limit frames per rank), over all ranks."""
        matrix = ConfusionMatrix(self.reader.num_classes, self.reader.ignore_index)
        device = self.env.device
        loss_sum = torch.zeros((), device=device)
        weighted = torch.zeros((), device=device)

        def add_loss(prediction) -> None:   # device tensors: no sync per batch
            nonlocal loss_sum, weighted
            if prediction.loss is not None:
                loss_sum = loss_sum + prediction.loss * len(prediction.rows)
                weighted = weighted + len(prediction.rows)

        evaluate(self.parts.model, rng_isolated(self.val_loader), matrix, self.val_hw,
                 limit=self.config.limit, autocast=self.parts.autocast,
                 criterion=self.parts.criterion, on_prediction=add_loss)
        totals = torch.stack([loss_sum, weighted])
        if self.env.distributed:
            dist.all_reduce(totals)
        scores = matrix.compute(self.reader.class_names)
        val_loss = float(totals[0] / totals[1]) if float(totals[1]) > 0 else None
        return {**{key: scores[key] for key in EVAL_LOG_KEYS}, "val_loss": val_loss}


