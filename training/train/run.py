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

import errno
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cache.errors import UserError
from training.train.builders import build_parts, build_split_loader, model_meta, resolve_defaults
from training.train.config import TrainConfig, save_config
from training.core.device import (DistEnv, broadcast_buffers, init_distributed, seed_everything,
                             unwrap)
from training.core.engine import DataWait, evaluate, rng_isolated, train_one_epoch

LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"
# Consecutive log lines with a non-finite mean loss (while the weights are still finite, as when
# fp16's GradScaler skips overflowing steps) after which the run counts as diverged. Weights
# that are no longer finite end the run at once.
DIVERGED_AFTER_LOGS = 3
# The scores an "eval" line of metrics.jsonl keeps (the confusion matrix goes to `evaluate`'s JSON).
EVAL_LOG_KEYS = ("miou", "pixel_accuracy", "class_iou", "category_iou", "category_miou", "pixels")


class TimingTotals:
    """Training seconds and data-wait seconds over the whole run (for the closing summary)."""

    def __init__(self):
        self.steps, self.seconds, self.waited = 0, 0.0, 0.0

    def add(self, steps: int, seconds: float, waited: float) -> None:
        self.steps += steps
        self.seconds += seconds
        self.waited += waited

    @property
    def wait_share(self) -> float | None:
        return self.waited / self.seconds if self.seconds > 0 else None


class Diverged(UserError):
    """The loss (or the weights) stopped being finite: the run stops; last.pt is not touched."""


class WriteFailed(UserError):
    """A file of the run dir could not be written (a full disk): the run stops at that step."""


def finite_or_none(value):
    """`value` with every non-finite float replaced by None (metrics.jsonl is strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


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
    from training.train.preempt import StopSignals

    env = init_distributed(config.device)
    try:
        with StopSignals() as stop:     # before any loader worker is forked: they inherit it
            return Trainer(config, env, resume=resume, stop=stop).run()
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


class TrainProgress:
    """Rich progress bar with loss, lr and images/s (rank 0 only; silent elsewhere)."""

    def __init__(self, console, total: int, completed: int):
        self.progress = None
        if console is None:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        # Fits 80 columns whole (the step count, wait share and ETA matter most; the learning
        # rate and the elapsed time are in metrics.jsonl).
        self.progress = Progress(
            TextColumn("[bold]ep[/] {task.fields[epoch]}"), BarColumn(bar_width=12),
            MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[ips]} img/s"), TextColumn("wait {task.fields[wait]}"),
            TimeRemainingColumn(), console=console)
        self.task = self.progress.add_task("train", total=total, completed=completed, epoch=0,
                                           loss="-", lr="-", ips="-", wait="-")
        self.progress.start()

    def update(self, step: int, **fields) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, **fields)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class LogWindow:
    """The loss summed since the last train line, and the time and steps behind images/s,
    step_time and data_time (the timers restart after evaluations and checkpoints: they count
    training only). Nothing here synchronises with the device except `close`, at a log point."""

    def __init__(self, device: torch.device, loss_sum: float = 0.0, steps: int = 0):
        self.device = device
        self.wait = DataWait(device)
        self._open(loss_sum, steps)

    def _open(self, loss_sum: float, steps: int) -> None:
        self.loss_sum = torch.full((), float(loss_sum), device=self.device)
        self.steps = steps
        self.restart_timer()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss          # stays on the device: no sync per step
        self.steps += 1
        self.timed_steps += 1

    def restart_timer(self) -> None:
        self.start, self.timed_steps = time.perf_counter(), 0
        self.wait.reset()

    def close(self, env: DistEnv) -> tuple[float, int, float, float]:
        """(mean loss over all ranks, timed steps, seconds, seconds waiting for data); the
        window starts anew. Reading the loss waits for the device, so the seconds are the
        device's too."""
        loss = self.loss_sum.detach().clone()
        if env.distributed:
            dist.all_reduce(loss)
            loss /= env.world_size
        mean_loss = loss.item() / max(1, self.steps)
        closed = (mean_loss, self.timed_steps, time.perf_counter() - self.start,
                  self.wait.seconds())
        self._open(0.0, 0)
        return closed

    def state(self) -> dict:
        return {"loss_sum": float(self.loss_sum), "steps": self.steps}


def gather_rng_states(env: DistEnv) -> list[dict]:
    """Every rank's RNG states (all ranks must call it: it is a collective under torchrun)."""
    from training.train.checkpoint import capture_rng

    states = [None] * env.world_size
    if env.distributed:
        dist.all_gather_object(states, capture_rng())
    else:
        states[0] = capture_rng()
    return states


class Trainer:
    """One training run: the parts, the position in the data, and the run dir's files."""

    def __init__(self, config: TrainConfig, env: DistEnv, *, resume: bool = False, stop=None):
        from cache.reader import CacheReader
        from rich.console import Console

        from training.train.folds import fold_for_config

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
            from training.train.init_from import load_initial_weights

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

    # -- the run dir and checkpoints --------------------------------------------------------
    def _open_checkpoint(self, resume: bool) -> tuple[Path, dict] | None:
        """(path, contents) of the checkpoint to resume from, if any. --out must be new, empty,
        or a run dir of ours (training.outputs.folder; an older version's run dir is known by
        its last.pt); refuses to overwrite a run by accident, a run that lost its last.pt, and a
        checkpoint of another model. Only looks: every rank calls it."""
        from training.train.checkpoint import check_compatible, check_training_state, load_checkpoint
        from training.outputs.folder import check_output_dir

        run = self.run_dir
        folder = check_output_dir(run, "run", option="--out", command="train", legacy=(LAST,))
        last = run / LAST
        if last.is_file():
            if not resume:
                raise UserError(f"--out {run}: holds a run already ({LAST}); pass --resume to "
                                "continue it, or choose another --out")
            data = load_checkpoint(last)
            check_training_state(data, last)
            check_compatible(data["meta"], self.meta, last)
            return last, data
        if folder.marker is not None and folder.marker.get("checkpointed"):
            raise UserError(self._lost_checkpoint(resume))
        if folder.marker is not None and not folder.empty:
            self._note(f"{run}: the run there stopped before its first checkpoint; "
                       "starting it again from step 0")
        elif resume:      # scripts/slurm/train.sbatch: the first start passes --resume too
            self._note(f"--resume: no run in {run} yet; starting a new one at step 0")
        return None

    def _lost_checkpoint(self, resume: bool) -> str:
        """Why a run dir whose last.pt was deleted is neither resumed nor replaced."""
        run = self.run_dir
        kept = ", ".join(name for name in (BEST, METRICS) if (run / name).is_file())
        kept = f" ({kept} kept)" if kept else ""
        start_anew = (f"start a new run with another --out (--init-from {run / BEST} begins "
                      "from its best weights)" if (run / BEST).is_file()
                      else "start a new run with another --out")
        if resume:
            return (f"--resume: the run in {run} has no {LAST} any more (deleted?): nothing to "
                    f"resume from{kept}; {start_anew}")
        return (f"--out {run}: holds a run whose {LAST} is gone (deleted?); a new run there "
                f"would replace what it left{kept}: {start_anew}")

    def _machine_notes(self) -> list[str]:
        """What this machine made of the per-machine settings (comments in config.yaml)."""
        return [f"on this machine: {self.env.device}, {self.env.world_size} rank(s); loader "
                f"workers per rank: train {self.train_loader.num_workers}, val "
                f"{self.val_loader.num_workers}"]

    def _prepare_run_dir(self, resumed: bool) -> None:
        """Mark --out as a run dir before anything else goes in (an older version's run dir is
        marked on resume), then write the resolved config."""
        from training.outputs.folder import MARKER, claim_output_dir, update_marker
        from training.train.plots import truncate_metrics

        with self._writing(self.run_dir / MARKER):
            claim_output_dir(self.run_dir, "run", option="--out", command="train", legacy=(LAST,))
            if resumed:
                update_marker(self.run_dir, checkpointed=True)
        with self._writing(self.run_dir / "config.yaml"):
            save_config(self.config, self.run_dir, notes=self._machine_notes())
            if self.fold is not None:
                from training.train.folds import write_fold_file

                write_fold_file(self.fold, self.reader.split(self.fold.split).frames, self.run_dir)
            if not resumed:     # a run killed before its first checkpoint may have left lines
                truncate_metrics(self.run_dir / METRICS, 0)

    def _restore(self, path: Path, data: dict) -> None:
        from training.train.checkpoint import load_model_state, restore_rng
        from training.train.plots import truncate_metrics

        parts = self.parts
        load_model_state(unwrap(parts.model), data["model"], path)
        parts.optimizer.load_state_dict(data["optimizer"])
        parts.scheduler.load_state_dict(data["scheduler"])
        parts.scaler.load_state_dict(data["scaler"])
        saved = data["progress"]
        self.step, self.best_miou = saved["step"], saved["best_miou"]
        self.best_step = saved.get("best_step")
        self.saved_step, self.evaluated_step = self.step, saved["evaluated_step"]
        self.good_step = self.step
        self.window = LogWindow(self.env.device, **data["log_window"])
        states = data["rng"]
        restore_rng(states[self.env.rank] if len(states) == self.env.world_size else states[0])
        self._note_inexact_resume(saved, len(states))
        if self.env.is_main:
            truncate_metrics(self.run_dir / METRICS, self.step)
        self._note(f"resumed {path} at step {self.step} (epoch {self.epoch}, "
                   f"batch {self.batch_in_epoch})")

    def _note_inexact_resume(self, saved: dict, ranks: int) -> None:
        if ranks != self.env.world_size:
            self._note(f"resume: checkpoint from {ranks} rank(s), now {self.env.world_size}; "
                       "the data shards differ, so this is not an exact continuation")
        elif (saved["epoch"], saved["batch_in_epoch"]) != (self.epoch, self.batch_in_epoch):
            self._note(f"resume: an epoch now has {self.steps_per_epoch} steps (batch size, "
                       "--grad-accum or --limit changed?); continuing from epoch "
                       f"{self.epoch}, which is not an exact continuation")

    def _save_last(self) -> None:
        """last.pt with everything an exact resume needs (all ranks take part: RNG gather)."""
        from training.train.checkpoint import save_checkpoint

        self._stop_if_diverged()       # a checkpoint of non-finite weights would be no resume
        rng = gather_rng_states(self.env)
        if self.env.is_main:
            parts = self.parts
            with self._writing(self.run_dir / LAST):
                save_checkpoint(self.run_dir / LAST, {
                    "meta": self.meta, "model": unwrap(parts.model).state_dict(),
                    "optimizer": parts.optimizer.state_dict(),
                    "scheduler": parts.scheduler.state_dict(),
                    "scaler": parts.scaler.state_dict(), "progress": self._progress(), "rng": rng,
                    "config": self.config.to_dict(), "world_size": self.env.world_size,
                    "log_window": self.window.state(),
                })
                if self.good_step is None:      # from now on the run dir has a run to resume
                    from training.outputs.folder import update_marker

                    update_marker(self.run_dir, checkpointed=True)
        self.saved_step = self.good_step = self.step

    def _save_best(self, scores: dict) -> None:
        from training.train.checkpoint import save_checkpoint

        with self._writing(self.run_dir / BEST):
            save_checkpoint(self.run_dir / BEST, {
                "meta": self.meta, "model": unwrap(self.parts.model).state_dict(),
                "progress": self._progress(),
                "scores": {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"]},
                "config": self.config.to_dict(),
            })

    def _progress(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "best_miou": self.best_miou, "best_step": self.best_step, "total_steps": self.total_steps,
                "evaluated_step": self.evaluated_step}

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
            from training.train.tensorboard import TensorBoardSink

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
        from training.train.report import banner_lines

        for line in banner_lines(self):
            self.console.print(line, soft_wrap=True, highlight=False)

    def _summary(self) -> None:
        """What the run did, and what to run next."""
        if self.console is None:
            return
        from training.train.report import summary_lines

        for line in summary_lines(self):
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
        from training.train.preempt import Preempted

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

    # -- divergence: checked at log points and before checkpoints only (no sync per step) -----
    def _check_loss(self, loss: float) -> None:
        """After a log line: a non-finite mean loss with non-finite weights is a divergence; with
        finite weights (fp16's GradScaler skipping overflowing steps) only when it lasts
        DIVERGED_AFTER_LOGS log lines. The loss is the all-reduced one: ranks agree."""
        if math.isfinite(loss):
            self.nonfinite_logs = 0
            return
        self.nonfinite_logs += 1
        if self.nonfinite_logs >= DIVERGED_AFTER_LOGS:
            raise Diverged(self._divergence_message(
                f"the mean loss was not finite ({loss}) at {self.nonfinite_logs} log lines "
                "in a row"))
        self._stop_if_diverged(f"the loss is {loss}")

    def _weights_finite(self) -> bool:
        """Every parameter and floating buffer finite, on every rank (one sync: call it only
        where the loop waits anyway)."""
        net = unwrap(self.parts.model)
        tensors = [t.detach() for t in (*net.parameters(), *net.buffers()) if t.is_floating_point()]
        if not tensors:
            return True
        bad = torch.stack([torch.isfinite(t).all() for t in tensors]).logical_not().any()
        bad = bad.to(torch.int32)
        if self.env.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad)

    def _stop_if_diverged(self, what: str = "") -> None:
        if not self._weights_finite():
            what = f"{what}; " if what else ""
            raise Diverged(self._divergence_message(f"{what}the weights are no longer finite"))

    def _divergence_message(self, what: str) -> str:
        lr = self.config.lr
        lr = f"{lr:g}" if isinstance(lr, (int, float)) else lr
        return (f"training diverged at step {self.step}: {what}; {self._kept()}; train again "
                f"with a lower --lr (this run: {lr}) or a --warmup, under another --out")

    def _kept(self) -> str:
        """What a stopped run leaves to go on from."""
        if self.good_step is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint is {self.run_dir / LAST} (step {self.good_step})"

    # -- writing into the run dir -------------------------------------------------------------
    @contextmanager
    def _writing(self, path: Path | str):
        """An OSError while writing (a full disk) ends the run with one line: what failed, at
        which step, what was kept and what to do; temporary files of the run dir are removed."""
        try:
            yield
        except OSError as exc:
            for leftover in (*self.run_dir.glob("*.tmp"), *self.run_dir.glob("*.tmp.png")):
                leftover.unlink(missing_ok=True)
            reason = exc.strerror or str(exc) or type(exc).__name__
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            if self.good_step is None:
                then = ("free some space" if full else "fix that") + ", then run the same command"
            else:
                then = (("free some space" if full else "fix that") +
                        f", then `train --out {self.run_dir} --resume` continues from it")
            raise WriteFailed(f"train stopped at step {self.step}: cannot write {path} "
                              f"({reason}); {self._kept()}; {then}") from None

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
        from training.core.metrics import ConfusionMatrix

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

    def _append(self, record: dict) -> None:
        from training.train.plots import append_metrics

        record = finite_or_none({**record, "time": time.time()})
        with self._writing(self.run_dir / METRICS):
            append_metrics(self.run_dir / METRICS, record)
        if self.tensorboard is not None:      # metrics.jsonl stays the record
            self.tensorboard(record)

    def _write_plots(self) -> None:
        from training.train.plots import read_metrics, write_plots

        with self._writing(f"the plots in {self.run_dir}"):
            write_plots(read_metrics(self.run_dir / METRICS), self.run_dir)
