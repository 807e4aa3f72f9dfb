"""StopSignals turns SIGTERM/SIGUSR1 into a flag, restores the handlers, and ranks agree on it."""
from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch

from training.train.preempt import REQUEUE_EXIT_STATUS, Preempted, StopSignals

LOCAL = SimpleNamespace(distributed=False, device=torch.device("cpu"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_sets_the_flag_instead_of_ending_the_process(sig):
    before = signal.getsignal(sig)
    with StopSignals() as stop:
        assert stop.active and not stop.requested and stop.agreed(LOCAL) is None
        os.kill(os.getpid(), sig)           # the handler runs before kill returns to Python
        assert stop.requested and stop.signum == sig and stop.agreed(LOCAL) == sig
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == sig           # the first signal wins
    assert signal.getsignal(sig) is before and not stop.active


def test_handlers_are_restored_after_an_exception():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        with pytest.raises(RuntimeError):
            with StopSignals():
                assert signal.getsignal(signal.SIGUSR1) is not mine
                raise RuntimeError("boom")
        assert signal.getsignal(signal.SIGUSR1) is mine
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_outside_the_main_thread_it_stays_inactive():
    import threading

    seen = {}

    def body():
        with StopSignals() as stop:
            seen["active"] = stop.active

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == {"active": False}


def test_preempted_names_the_signal_step_checkpoint_and_status():
    stop = Preempted(signal.SIGUSR1, 42, "runs/a/last.pt")
    assert stop.exit_status == REQUEUE_EXIT_STATUS == 75
    text = str(stop)
    assert "SIGUSR1" in text and "step 42" in text and "runs/a/last.pt" in text and "--resume" in text


def _agree_worker(rank: int, world: int, init_file: str, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stop = StopSignals()
        if rank == 1:
            stop.signum = int(signal.SIGTERM)     # only rank 1 saw the signal
        env = SimpleNamespace(distributed=True, device=torch.device("cpu"))
        results[rank] = stop.agreed(env)
    finally:
        dist.destroy_process_group()


def test_ranks_agree_when_only_one_saw_the_signal(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_agree_worker, args=(2, str(tmp_path / "rdzv"), results), nprocs=2, join=True)
    assert dict(results) == {0: int(signal.SIGTERM), 1: int(signal.SIGTERM)}
