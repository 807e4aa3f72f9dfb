"""Ctrl-C in a terminal signals the whole foreground process group: the training process and
its loader workers. The run must stop with one line that names its real run dir, no worker
tracebacks, and resume from there."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.cachefab import blocky_cache

TRAIN = [sys.executable, "-c", "from training.cli import train_main; train_main()"]


def tiny_train_args(cache, out, loader):
    return ["--cache", str(cache), "--out", str(out), "--loader", loader, "--arch", "unet",
            "--encoder", "resnet18", "--encoder-weights", "none", "--model-arg", "encoder_depth=3",
            "--model-arg", "decoder_channels=[8,8,8]", "--res", "64", "--batch-size", "2",
            "--workers", "1", "--log-every", "1", "--checkpoint-every", "1", "--no-plots"]


@pytest.mark.slow
@pytest.mark.parametrize("loader", [pytest.param("dali", marks=pytest.mark.dali), "torch"])
def test_ctrl_c_stops_cleanly_and_names_the_run_dir(tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    cache = blocky_cache(tmp_path / "c.zarr", n_train=8, n_val=1, height=64, width=128, tile=64)
    out = tmp_path / "my-run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(TRAIN + tiny_train_args(cache, out, loader) + ["--iters", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").is_file():    # training (and the loader workers) running
            assert proc.poll() is None, proc.communicate()[1]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)          # what a terminal's Ctrl-C does
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert f"train --out {out} --resume" in stderr
    resumed = subprocess.run(TRAIN + ["--out", str(out), "--resume", "--iters", "1"],
                             capture_output=True, text=True, timeout=120, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {out / 'last.pt'} at step" in resumed.stderr
    again = subprocess.run(TRAIN + ["--out", str(out), "--resume", "--iters", "1"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and "finished already" in again.stderr, again.stderr
