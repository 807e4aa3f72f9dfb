"""Preemption: a scheduler's stop signal becomes a checkpoint and a requeue, not a lost job.

SLURM (and Kubernetes, Docker, systemd) stop a job with SIGTERM and, some seconds later,
SIGKILL; `sbatch --signal=B:USR1@120` adds SIGUSR1 as a warning two minutes before the time
limit. `StopSignals` turns either signal into a flag. The training loop looks at the flag
between optimiser steps (after the step's evaluation or checkpoint, so nothing that an
uninterrupted run would do at that step is skipped), writes last.pt at the current step and
raises `Preempted`; `train` then exits with REQUEUE_EXIT_STATUS, and `train --out RUN --resume`
continues exactly where it stopped.

Under torchrun the ranks must stop at the same step (the checkpoint is a collective), so they
agree on the flag with one all-reduce; to keep host-device synchronisation out of the steps they
do so only where the loop synchronises anyway (its log lines), see `Trainer`.

The handlers are installed only in the main thread and restored on exit; loader workers
forked while they are installed inherit them. Which processes a signal reaches matters:
- SIGUSR1 (SLURM's warning, which scripts/slurm/train.sbatch forwards through srun and torchrun;
  torchrun signals each rank's whole process group) stops the run cleanly: the torch loader's
  forked workers inherit the handler and run on.
- SIGTERM to the training process alone (`kill PID`, Docker, systemd) stops it cleanly too.
- SIGTERM to every process (scancel, SLURM preemption, torchrun forwarding SIGTERM) also reaches
  the loader's worker processes, and torch's own SIGTERM handler in its DataLoader workers ends
  them (DALI workers started with `spawn` end as well): the run then fails as after a kill, and
  `--resume` continues from the last periodic checkpoint (`--checkpoint-every`) instead.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry". A job script
# requeues on it (scripts/slurm/train.sbatch); 0, 1 (user error) and 130 (Ctrl-C) keep their
# meanings.
REQUEUE_EXIT_STATUS = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after writing last.pt at `step`."""

    exit_status = REQUEUE_EXIT_STATUS

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; {checkpoint} "
                         f"holds it: the same command with --resume continues (exit status "
                         f"{REQUEUE_EXIT_STATUS}: requeue)")


class StopSignals:
    """Context manager: while active, PREEMPT_SIGNALS set `signum` instead of ending the process.

    The first signal wins; later ones are remembered as already requested. Outside the main
    thread (where Python cannot install handlers) it does nothing and `active` is False.
    """

    def __init__(self, signals=PREEMPT_SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self.active = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            self.active = True
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.active = False

    def agreed(self, env) -> int | None:
        """The signal number if this rank or any other saw a stop signal, else None (a collective
        under torchrun: every rank must call it at the same step)."""
        if not getattr(env, "distributed", False):
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None
