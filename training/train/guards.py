"""What stops a run in one line and what it records: divergence checks (at log points and before
checkpoints only), write failures of the run dir, and metrics.jsonl lines.
"""
from __future__ import annotations

import errno
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from cache.errors import UserError
from training.core.device import unwrap
from training.train.plots import append_metrics, read_metrics, write_plots
from training.train.run_dir import LAST, METRICS


# Consecutive log lines with a non-finite mean loss (while the weights are still finite, as when
# fp16's GradScaler skips overflowing steps) after which the run counts as diverged. Weights
# that are no longer finite end the run at once.
DIVERGED_AFTER_LOGS = 3


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


class RunGuardsMixin:
    """What stops a run in one line and what it records: divergence checks (at log points and before (a part of training.train.run.Trainer)."""

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

    def _append(self, record: dict) -> None:
        record = finite_or_none({**record, "time": time.time()})
        with self._writing(self.run_dir / METRICS):
            append_metrics(self.run_dir / METRICS, record)
        if self.tensorboard is not None:      # metrics.jsonl stays the record
            self.tensorboard(record)

    def _write_plots(self) -> None:
        with self._writing(f"the plots in {self.run_dir}"):
            write_plots(read_metrics(self.run_dir / METRICS), self.run_dir)
