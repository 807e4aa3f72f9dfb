"""How loader worker processes meet the signals of an interactive user and of a scheduler.

- Ctrl-C in a terminal goes to the whole process group. Workers ignore SIGINT: the main
  process stops the run and shuts its workers down (torch's DataLoader workers already
  swallow KeyboardInterrupt; DALI's are started with SIGINT ignored).
- SIGTERM (scancel, preemption, a scheduler's time limit) and SIGUSR1 (SLURM's warning) also
  reach every process of a job. The main process then finishes its step and checkpoints
  (training/train/preempt.py), which may still need batches: so a worker keeps serving, and exits
  by itself `GRACE_SECONDS` later if nobody has shut it down gently by then. A SIGTERM from
  the worker's own parent (the loader's forced shutdown) ends it at once, as torch's own
  worker handler does: a thread in the worker reads the sender of each signal.
- SIGKILL of the main process (the OOM killer, a scheduler past its grace period) leaves no
  one to shut the workers down: on Linux a worker asks the kernel to kill it when its parent
  dies (torch's DataLoader workers already watch their parent).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from contextlib import contextmanager

GRACE_SECONDS = 60.0
TERMINATION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1")
                            if hasattr(signal, name))


_watching_pid: int | None = None   # the process whose watcher thread runs
_starting_workers = False          # set in the main process while it forks DALI's workers


def keep_serving_on_termination(worker_id: int | None = None) -> None:
    """In a worker process (a DataLoader worker_init_fn; DALI's workers when they are forked
    or unpickle their source): SIGTERM/SIGUSR1 are taken by a thread that reads who sent them
    (sigwaitinfo). From the parent (its loader shutting it down): exit at once. From anyone
    else (a scheduler signalling the whole job): keep serving, and exit GRACE_SECONDS later
    if not shut down gently by then."""
    global _watching_pid
    if _watching_pid == os.getpid():
        return
    _watching_pid = os.getpid()
    if not hasattr(signal, "sigwaitinfo"):   # not POSIX: leave the default behaviour
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATION_SIGNALS)
    parent = os.getppid()

    def watch() -> None:
        grace = None
        while True:
            info = signal.sigwaitinfo(TERMINATION_SIGNALS)
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(0)
            if grace is None:
                grace = threading.Timer(GRACE_SECONDS, os._exit, args=(0,))
                grace.daemon = True
                grace.start()

    threading.Thread(target=watch, name="termination-watch", daemon=True).start()


def _after_fork_in_child() -> None:
    if _starting_workers:
        keep_serving_on_termination()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def worker_signals():
    """While DALI forks or spawns its workers from this (main) thread: SIGINT ignored, which
    forked and spawned workers inherit (a Ctrl-C in these few seconds is dropped: press it
    again); SIGTERM/SIGUSR1 blocked in this thread only, so that the workers start with them
    blocked (the mask survives fork and exec) until their watcher takes them, while this
    process still gets them on its other threads, or right after, in its own handlers."""
    global _starting_workers
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_mask = None
    if hasattr(signal, "pthread_sigmask"):
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATION_SIGNALS)
    _starting_workers = True
    try:
        yield
    finally:
        _starting_workers = False
        if previous_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        signal.signal(signal.SIGINT, previous_int)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """In a worker process (Linux): SIGKILL this process when its parent dies, and exit now if
    the parent died already. Without it a DALI source worker outlives a SIGKILLed main
    process for as long as it waits, holding the cache's files and shared memory."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent went before the request took effect
        os._exit(0)
