"""A SIGKILLed main process leaves no loader worker behind (loaders/workers.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cachefab import blocky_cache

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from loaders.contract import AugmentConfig
from loaders.factory import build_loader
loader = build_loader(sys.argv[1], "train", sys.argv[2], train=True, batch_size=2,
                      aug=AugmentConfig(crop=(64, 64)), num_workers=1)
next(iter(loader))
print("ready", flush=True)
time.sleep(600)
"""


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        found |= {int(c) for c in text.split()}
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG and /proc are Linux's")
@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torch"])
def test_workers_die_with_a_sigkilled_main_process(tmp_path, kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    cache = blocky_cache(tmp_path / "c.zarr", n_train=4, n_val=1, height=64, width=128, tile=64)
    main = subprocess.Popen([sys.executable, "-c", HOLDER, str(cache), kind], cwd=REPO,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    try:
        assert main.stdout.readline().strip() == "ready"
        workers = children(main.pid)
        assert workers, "the loader started no worker process"
        main.send_signal(signal.SIGKILL)
        main.wait(timeout=30)
        deadline = time.monotonic() + 20   # torch's workers look at their parent every 5 s
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [w for w in workers if alive(w)]
        assert not left, f"worker(s) {left} outlived the main process"
    finally:
        if main.poll() is None:
            main.kill()
        for w in children(main.pid) if main.poll() is None else ():
            os.kill(w, signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="sigwaitinfo and /proc are Linux's")
def test_a_worker_serves_through_a_schedulers_sigterm_and_stops_on_its_parents(tmp_path):
    """SIGTERM from another process (a scheduler) is survived; from the loader's own process
    (its forced shutdown) it ends the worker at once, so shutting down never waits."""
    from loaders.contract import AugmentConfig
    from loaders.factory import build_loader

    cache = blocky_cache(tmp_path / "c.zarr", n_train=8, n_val=1, height=64, width=128, tile=64)
    loader = build_loader(cache, "train", "torch", train=True, batch_size=2,
                          aug=AugmentConfig(crop=(64, 64)), num_workers=1)
    batches = iter(loader)
    next(batches)
    worker = loader._stream._workers[0].pid       # the DataLoader's one worker process
    subprocess.run(["kill", "-TERM", str(worker)], check=True)       # not the parent
    time.sleep(1.0)
    assert alive(worker)
    assert next(batches).image.shape == (2, 3, 64, 64)               # still serving
    os.kill(worker, signal.SIGTERM)                                   # the parent
    deadline = time.monotonic() + 5
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker)
