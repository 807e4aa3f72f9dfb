"""What a run shows and counts while it trains: the progress bar, the loss window behind each
train line, and the run's timing totals.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from training.core.device import DistEnv
from training.core.engine import DataWait


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


class TrainProgress:
    """Rich progress bar with loss, lr and images/s (rank 0 only; silent elsewhere)."""

    def __init__(self, console, total: int, completed: int):
        self.progress = None
        if console is None:
            return
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
