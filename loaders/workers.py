"""How loader worker processes meet the signals of an interactive user and of a scheduler.

- Ctrl-C in a terminal goes to the whole process group. Workers ignore SIGINT: the main
  process stops the run and shuts its workers down (torch's DataLoader workers already
  swallow KeyboardInterrupt; DALI's are started with SIGINT ignored).
- SIGTERM (scancel, preemption, a scheduler's time limit) and SIGUSR1 (SLURM's warning) also
  reach every process of a job. The main process then finishes its step and checkpoints
  (training/preempt.py), which may still need batches: so a worker keeps serving, and exits
  by itself `GRACE_SECONDS` later if nobody has shut it down gently by then (the loaders'
  own forced shutdown after a failure also sends SIGTERM, and must not wait forever).
- SIGKILL of the main process (the OOM killer, a scheduler past its grace period) leaves no
  one to shut the workers down: on Linux a worker asks the kernel to kill it when its parent
  dies (torch's DataLoader workers already watch their parent).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

GRACE_SECONDS = 60.0
TERMINATION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1")
                            if hasattr(signal, name))


def _serve_on(signum, frame) -> None:
    timer = threading.Timer(GRACE_SECONDS, os._exit, args=(0,))
    timer.daemon = True
    timer.start()


def keep_serving_on_termination(worker_id: int | None = None) -> None:
    """Install the worker's SIGTERM/SIGUSR1 handling (a DataLoader worker_init_fn; DALI's
    spawned workers call it when they unpickle their source)."""
    for signum in TERMINATION_SIGNALS:
        signal.signal(signum, _serve_on)


@contextmanager
def worker_signals():
    """While worker processes are forked or spawned from this (main) thread: SIGINT ignored
    (inherited by forked and by spawned workers alike) and SIGTERM/SIGUSR1 handled as in
    `keep_serving_on_termination` (inherited by forked workers); the main process's own
    handlers are back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    for signum in TERMINATION_SIGNALS:
        previous[signum] = signal.signal(signum, _serve_on)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """In a worker process (Linux): SIGKILL this process when its parent dies, and exit now if
    the parent died already. Without it a DALI source worker outlives a SIGKILLed main
    process for as long as it waits, holding the cache's files and shared memory."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent went before the request took effect
        os._exit(0)
